"""Session: KV cache kept between turns, only new tokens prefilled, same answers as a fresh full prompt."""

from __future__ import annotations

import pytest

from conftest import random_image
from nvila_edge.errors import ContextOverflowError
from nvila_edge.runtime import Runtime
from conftest import Counting, make_runtime

SYSTEM = "You are a careful assistant"


@pytest.fixture()
def rt(tiny_model, tokenizer):
    return make_runtime(tiny_model, tokenizer)


@pytest.fixture()
def ref(tiny_model, tokenizer):
    """A second runtime (own cache) on the same weights for the fresh-prompt answers."""
    return make_runtime(tiny_model, tokenizer)


def _fresh(rt: Runtime, turns, answers, question, images, n, **kw):
    conv = [{"role": "system", "content": SYSTEM}]
    for i, (q, a) in enumerate(zip(turns, answers)):
        conv += [{"role": "user", "content": ("<image>" if i == 0 and images else "") + q},
                 {"role": "assistant", "content": a}]
    conv.append({"role": "user", "content": question})
    return rt.generate(conv, images=images, max_new_tokens=n, **kw)


@pytest.mark.parametrize("stop", [(), ("OX",)])  # a stop string mid-answer: the cache rolls back
def test_session_answers_equal_fresh_prompts(rt, ref, one_thread, stop):
    img = random_image(500, 300, seed=7)
    s = rt.session(system=SYSTEM)
    questions = ["What is in the image?", "And what color is it?", "How many are there?"]
    answers = []
    for i, q in enumerate(questions):
        before = len(rt.backend.prefill_lengths)
        res = s.generate(q, images=[img] if i == 0 else None, max_new_tokens=6, stop=stop)
        fresh = _fresh(ref, questions[:i], answers, q, [img], 6, stop=stop) if i else None
        if fresh is not None:
            assert res.token_ids == fresh.token_ids, f"turn {i}"
            # only the new turn was prefilled, not the whole conversation
            assert rt.backend.prefill_lengths[before] < fresh.usage.prompt_tokens / 2
            assert res.usage.prompt_tokens == fresh.usage.prompt_tokens
        answers.append(res.text)
        assert not stop or stop[0] not in res.text
    assert [m.role for m in s.messages] == ["system"] + ["user", "assistant"] * 3


def test_session_keeps_its_cache_across_another_call(rt, one_thread):
    img = random_image(400, 400, seed=8)
    s = rt.session(system=SYSTEM)
    a1 = s.generate("What is in the image?", images=[img], max_new_tokens=5)
    held = s.cache_length
    rt.generate("unrelated question", max_new_tokens=3)  # a one-shot request: its own (pooled) cache
    assert s.cache_length == held
    before = len(rt.backend.prefill_lengths)
    a2 = s.generate("Tell me more.", max_new_tokens=5)
    fresh = _fresh(rt, ["What is in the image?"], [a1.text], "Tell me more.", [img], 5)
    assert a2.token_ids == fresh.token_ids
    # the history was not prefilled again: only the closing of the answer and the new turn
    assert rt.backend.prefill_lengths[before] < fresh.usage.prompt_tokens - held + 12


def test_two_interleaved_sessions_answer_as_each_alone(rt, ref, one_thread):
    img = random_image(420, 300, seed=11)
    qa = [("What is in the image?", [img]), ("And the colour?", None)]
    qb = [("Count to three.", None), ("Again, backwards.", None)]

    def alone(turns):
        s = ref.session(system=SYSTEM)
        return [s.generate(q, images=i, max_new_tokens=5).token_ids for q, i in turns]

    want_a, want_b = alone(qa), alone(qb)
    a, b = rt.session(system=SYSTEM), rt.session(system=SYSTEM)
    got_a, got_b = [], []
    for (q1, i1), (q2, i2) in zip(qa, qb):
        ga, gb = a.stream(q1, images=i1, max_new_tokens=5), b.stream(q2, images=i2, max_new_tokens=5)
        ids = {id(ga): [], id(gb): []}
        live = [ga, gb]
        while live:  # one event of each in turn: the two decode loops alternate on one backend
            for g in list(live):
                ev = next(g, None)
                if ev is None:
                    live.remove(g)
                elif getattr(ev, "type", None) == "finish":
                    ids[id(g)] = ev.token_ids
        got_a.append(ids[id(ga)])
        got_b.append(ids[id(gb)])
    assert got_a == want_a and got_b == want_b
    assert a.cache is not b.cache and a.cache_length != b.cache_length


def test_interleaved_one_shot_streams_answer_as_each_alone(rt, one_thread):
    prompts = ["What is here?", "Name a colour.", "Say hello."]
    alone = [rt.generate(p, max_new_tokens=6).token_ids for p in prompts]
    gens = [rt.stream(p, max_new_tokens=6) for p in prompts]
    done = {}
    while len(done) < len(gens):
        for k, g in enumerate(gens):
            if k in done:
                continue
            ev = next(g)
            if getattr(ev, "type", None) == "finish":
                done[k] = ev.token_ids
                g.close()
    assert [done[k] for k in range(len(prompts))] == alone
    assert 1 <= len(rt._pool) <= 2  # the caches went back to the pool, which stays small


def test_abandoned_stream_keeps_the_session_consistent(rt, ref, one_thread):
    s = rt.session(system=SYSTEM)
    gen = s.stream("Count to ten.", max_new_tokens=8)
    for ev in gen:
        if getattr(ev, "index", -1) == 2:
            break
    gen.close()
    assert s.messages[-1].role == "assistant"
    res = s.generate("Go on.", max_new_tokens=4)
    fresh = _fresh(ref, ["Count to ten."], [s.messages[2].content], "Go on.", [], 4)
    assert res.token_ids == fresh.token_ids
    assert rt.backend.prefill_lengths[-1] < fresh.usage.prompt_tokens - 20  # the cache was reused


def test_reset_and_context_overflow(tiny_model, tokenizer, one_thread):
    rt = Runtime(tiny_model.config, tokenizer, Counting(tiny_model), limits={"context_length": 200})
    s = rt.session()
    s.generate("hello there", max_new_tokens=4)
    used = s.cache_length
    assert used > 0 and s.cache.length == used
    k = 1
    while rt.plan("what? " * k).event.prompt_tokens < 200 - used // 2:
        k += 1
    q = "what? " * k  # fits a fresh prompt, not after the conversation so far
    with pytest.raises(ContextOverflowError) as err:
        s.stream(q)
    assert "already in the conversation" in str(err.value)
    assert s.cache.length == used  # refused before compute: the cache is untouched
    s.reset()
    assert s.cache_length == 0 and s.cache.length == 0 and len(s.messages) == 1
    res = s.generate("hello there", max_new_tokens=4)
    assert res.token_ids == rt.generate([{"role": "user", "content": "hello there"}], max_new_tokens=4).token_ids
