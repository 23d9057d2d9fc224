"""Session: KV cache kept between turns, only new tokens prefilled, same answers as a fresh full prompt."""

from __future__ import annotations

import pytest

from conftest import random_image, write_bundle
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
    held = s.cache.length
    rt.generate("unrelated question", max_new_tokens=3)  # a one-shot request: its own (pooled) cache
    assert s.cache.length == held
    before = len(rt.backend.prefill_lengths)
    a2 = s.generate("Tell me more.", max_new_tokens=5)
    fresh = _fresh(rt, ["What is in the image?"], [a1.text], "Tell me more.", [img], 5)
    assert a2.token_ids == fresh.token_ids
    # the history was not prefilled again: only the closing of the answer and the new turn
    assert rt.backend.prefill_lengths[before] < fresh.usage.prompt_tokens - held + 12


@pytest.fixture(scope="module")
def ort_bundle(tmp_path_factory, tiny_model, tokenizer):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    return write_bundle(tmp_path_factory.mktemp("session") / "bundle", tiny_model, tokenizer)


def _runtime(backend: str, request, tiny_model, tokenizer) -> Runtime:
    if backend == "torch":
        return make_runtime(tiny_model, tokenizer)
    return Runtime.load(request.getfixturevalue("ort_bundle"), backend=backend, threads=1)


def _interleaved(ga, gb) -> tuple[list[int], list[int]]:
    """One event of each stream in turn (the two decode loops alternate on one backend); their token ids."""
    ids = {id(ga): [], id(gb): []}
    live = [ga, gb]
    while live:
        for g in list(live):
            ev = next(g, None)
            if ev is None:
                live.remove(g)
            elif getattr(ev, "type", None) == "finish":
                ids[id(g)] = ev.token_ids
    return ids[id(ga)], ids[id(gb)]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_interleaved_sessions_answer_as_each_alone(backend, request, tiny_model, tokenizer, one_thread):
    """Two sessions' turns stepped in turn, and a one-shot request between them: each answers as it would
    alone, on every backend (each holds its own cache)."""
    rt, ref = (_runtime(backend, request, tiny_model, tokenizer) for _ in range(2))
    img = random_image(420, 300, seed=11)
    qa = [("What is in the image?", [img]), ("And the colour?", None)]
    qb = [("Count to three.", None), ("Again, backwards.", None)]

    def alone(turns):
        s = ref.session(system=SYSTEM)
        return [s.generate(q, images=i, max_new_tokens=5).token_ids for q, i in turns]

    want_a, want_b = alone(qa), alone(qb)
    one_shot = ref.generate("One-shot question.", max_new_tokens=4).token_ids
    a, b = rt.session(system=SYSTEM), rt.session(system=SYSTEM)
    got_a, got_b = [], []
    for turn, ((q1, i1), (q2, i2)) in enumerate(zip(qa, qb)):
        ta, tb = _interleaved(a.stream(q1, images=i1, max_new_tokens=5), b.stream(q2, images=i2, max_new_tokens=5))
        got_a.append(ta)
        got_b.append(tb)
        if turn == 0:  # between the turns: a request on a borrowed cache touches neither session's
            assert rt.generate("One-shot question.", max_new_tokens=4).token_ids == one_shot
    assert got_a == want_a and got_b == want_b
    assert a.cache is not b.cache and a.cache.length != b.cache.length


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
    used = s.cache.length
    assert used > 0
    k = 1
    while rt.plan("what? " * k).event.prompt_tokens < 200 - used // 2:
        k += 1
    q = "what? " * k  # fits a fresh prompt, not after the conversation so far
    with pytest.raises(ContextOverflowError) as err:
        s.stream(q)
    assert "already in the conversation" in str(err.value)
    assert s.cache.length == used  # refused before compute: the cache is untouched
    s.reset()
    assert s.cache.length == 0 and len(s.messages) == 1
    res = s.generate("hello there", max_new_tokens=4)
    assert res.token_ids == rt.generate([{"role": "user", "content": "hello there"}], max_new_tokens=4).token_ids
