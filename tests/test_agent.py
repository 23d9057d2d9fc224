"""Agent: futures resolve, newer requests cancel older ones (the generator is closed), timeouts fire,
callbacks get every event; JSON-answer validation; the robot sample on a tiny bundle."""

from __future__ import annotations

import runpy
import threading
import time
from pathlib import Path

import pytest

from conftest import random_image
from nvila_edge.events import FinishEvent, TokenEvent, Timings, Usage
from nvila_edge.apps.agent import Agent, AnswerCancelled, AnswerFormatError, AnswerTimeout, parse_json_answer

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "robot_agent.py"


class SlowRuntime:
    """``stream`` yields one token every ``step_s`` seconds; records which generators were closed early.
    ``gated=True``: the first request's prefill lasts until the test sets ``prefill_done``."""

    def __init__(self, step_s=0.05, tokens=5, text="tok", gated=False):
        self.step_s, self.tokens, self.text = step_s, tokens, text
        self.prefill_done = threading.Event()
        if not gated:
            self.prefill_done.set()
        self.started, self.closed, self.finished = [], [], []

    def stream(self, question, images=None, system=None, **sampling):
        def gen():
            self.started.append(question)
            done = False
            try:
                assert self.prefill_done.wait(timeout=30), "the test never ended the prefill"
                for i in range(self.tokens):
                    time.sleep(self.step_s)
                    yield TokenEvent(i, self.text if i == 0 else "", i, self.step_s * 1000)
                done = True
                self.finished.append(question)
                yield FinishEvent("stop", self.text, list(range(self.tokens)), Usage(1, 0, self.tokens), Timings())
            finally:
                if not done:
                    self.closed.append(question)

        return gen()


def test_future_resolves_with_events():
    rt = SlowRuntime(step_s=0.01)
    events = []
    with Agent(rt) as agent:
        res = agent.ask(None, "q1", on_event=events.append).result(timeout=5)
    assert res.text == "tok" and res.finish_reason == "stop" and len(res.token_ids) == 5
    assert [e.type for e in events] == ["token"] * 5 + ["finish"]
    assert agent.stats["answered"] == 1


def test_awaitable_from_asyncio():
    import asyncio

    async def main(agent):
        return await asyncio.wrap_future(agent.ask(None, "q"))

    with Agent(SlowRuntime(step_s=0.001)) as agent:
        assert asyncio.run(main(agent)).text == "tok"


def test_newer_request_cancels_running_and_queued():
    rt = SlowRuntime(step_s=0.05, tokens=20)
    with Agent(rt) as agent:
        first = agent.ask(None, "old")
        while not rt.started:
            time.sleep(0.005)
        second = agent.ask(None, "middle")  # queued behind "old" ...
        third = agent.ask(None, "new")  # ... and superseded before it starts
        with pytest.raises(AnswerCancelled):
            first.result(timeout=5)
        assert second.cancelled()
        assert third.result(timeout=5).text == "tok"
    assert rt.closed == ["old"] and rt.finished == ["new"] and "middle" not in rt.started
    assert agent.stats["cancelled"] == 2


def test_queue_mode_answers_in_order():
    rt = SlowRuntime(step_s=0.005, tokens=2)
    with Agent(rt, cancel_previous=False) as agent:
        futs = [agent.ask(None, f"q{i}") for i in range(3)]
        assert [f.result(timeout=5).text for f in futs] == ["tok"] * 3
    assert rt.finished == ["q0", "q1", "q2"]


def test_timeout_fires_even_during_a_long_prefill():
    rt = SlowRuntime(step_s=0.01, tokens=3, gated=True)
    with Agent(rt) as agent:
        fut = agent.ask(None, "slow", timeout=0.1)
        with pytest.raises(AnswerTimeout):
            fut.result(timeout=5)  # resolved at the deadline, while the prefill still runs
        assert rt.started == ["slow"] and not rt.prefill_done.is_set() and rt.closed == []
        rt.prefill_done.set()
        assert agent.ask(None, "next").result(timeout=5).text == "tok"  # the worker goes on
    assert rt.closed == ["slow"] and agent.stats["timed_out"] == 1


def test_callback_error_fails_the_future_and_close_cancels():
    rt = SlowRuntime(step_s=0.01)

    def boom(ev):
        raise RuntimeError("app bug")

    agent = Agent(rt)
    with pytest.raises(RuntimeError, match="app bug"):
        agent.ask(None, "q", on_event=boom).result(timeout=5)
    slow = SlowRuntime(step_s=0.2, tokens=50)
    agent2 = Agent(slow)
    fut = agent2.ask(None, "long")
    while not slow.started:
        time.sleep(0.005)
    agent2.close()
    with pytest.raises(AnswerCancelled):
        fut.result(timeout=5)
    agent.close()
    assert not agent._thread.is_alive() and not agent2._thread.is_alive()
    with pytest.raises(Exception, match="closed"):
        agent.ask(None, "after close")


def test_parse_json_answer():
    schema = {"action": {"left", "right", "stop"}, "confidence": float, "n": int}
    assert parse_json_answer('Sure! ```json\n{"action": "left", "confidence": 1, "n": 2}\n```', schema)["action"] == "left"
    assert parse_json_answer('ok {"action": "stop", "confidence": 0.5, "n": 0, "x": {"y": "}"}} done', schema)["n"] == 0
    ok = '"{" then {"action": "right", "confidence": 2, "n": 1, "why": "a \\"}\\" in a string"} and {"n": 9}'
    assert parse_json_answer(ok, schema) == {"action": "right", "confidence": 2, "n": 1, "why": 'a "}" in a string'}
    assert parse_json_answer('{"a": 1} then ```json\n{"a": 2}\n```')["a"] == 2  # the fence first
    assert parse_json_answer('{"a": ' * 3000 + ' {"b": 1}') == {"b": 1}  # past the parser's depth: skipped
    for bad, match in (("no json here", "no JSON"), ('{"action": "up", "confidence": 1, "n": 1}', "not one of"),
                       ('{"action": "left", "n": 1}', "lacks the key"),
                       ('{"action": "left", "confidence": "high", "n": 1}', "should be"),
                       ('{"action": "left", "confidence": 0.1, "n": true}', "should be"),
                       ('{"action": ["left"], "confidence": 0.1, "n": 1}', "not one of"),  # unhashable: still typed
                       ('{"action": "left", "confidence": 0.1, "n": 1.0}', "should be int, got float")):
        with pytest.raises(AnswerFormatError, match=match) as e:
            parse_json_answer(bad, schema)
        assert e.value.text == bad


def test_agent_on_a_real_runtime(tiny_model, tokenizer, one_thread):
    from conftest import make_runtime

    rt = make_runtime(tiny_model, tokenizer)
    seen = []
    with Agent(rt, max_new_tokens=4) as agent:
        res = agent.ask(random_image(64, 48), "What is it?", on_event=lambda e: seen.append(e.type)).result(timeout=60)
    assert seen[0] == "plan" and seen[-1] == "finish" and res.plan.num_tiles > 0
    assert res.token_ids == rt.generate("What is it?", images=[random_image(64, 48)], max_new_tokens=4).token_ids


def test_robot_sample_falls_back_safely(tmp_path, tiny_model, tokenizer, capsys, one_thread):
    pytest.importorskip("onnxruntime")
    from conftest import write_bundle

    bundle = write_bundle(tmp_path / "bundle", tiny_model, tokenizer)
    sample = runpy.run_path(str(SAMPLE))
    assert sample["main"]([str(bundle), "--steps", "3", "--hz", "5", "--timeout", "30", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("step ") == 3 and "stop" in out and "fallback: invalid answer" in out  # a random model: no JSON
    # a model that answers JSON is acted on; a late answer falls back
    good = SlowRuntime(step_s=0.001, tokens=1, text='{"action": "left", "confidence": 0.9}')
    with Agent(good) as agent:
        counts = sample["control_loop"](agent, sample["SimulatedCamera"](), 2, 20.0, 5.0, act=lambda s: None)
    assert counts == {"model": 2, "fallback": 0}
    late = SlowRuntime(text='{"action": "left", "confidence": 0.9}', gated=True)
    lines = []
    with Agent(late) as agent:
        counts = sample["control_loop"](agent, sample["SimulatedCamera"](), 1, 20.0, 0.05, act=lines.append)
        late.prefill_done.set()
    assert counts == {"model": 0, "fallback": 1} and "no answer in time" in lines[0]
