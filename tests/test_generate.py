"""Reference generation: greedy parity with transformers generate, typed stream events (the reference's and
the runtime's, one contract), stops, overflow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nvila_edge import (ContextOverflowError, FinishEvent, GenerationError, GenerationResult, NVILAConfig,
                        NVILAProcessor, SamplingParams, TokenEvent)
from nvila_edge.sampling import Sampler

from conftest import make_model, make_runtime, random_image
from nvila_edge.runtime import PlanEvent


def _hf_greedy(model, embeds, eos, n):
    out = model.llm.generate(inputs_embeds=embeds, max_new_tokens=n, do_sample=False, eos_token_id=list(eos),
                             pad_token_id=eos[0], attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
    return out[0].tolist()


@pytest.mark.parametrize("which", ["tiny", "lite"])
@torch.no_grad()
def test_greedy_equals_transformers_generate(which, tiny_model, lite_model, tiny_processor, lite_processor, tokenizer):
    model, proc = (tiny_model, tiny_processor) if which == "tiny" else (lite_model, lite_processor)
    prompts = [("what color is the circle?", [random_image(640, 480)]), ("how many shapes?", None),
               ("left or right?", [random_image(300, 900, seed=3)])]
    for text, images in prompts:
        inputs = proc(text, images=images)
        ours = model.generate(**inputs, tokenizer=tokenizer, max_new_tokens=12)
        embeds = model.build_inputs_embeds(inputs)
        hf = _hf_greedy(model, embeds, tokenizer.eos_token_ids, 12)
        assert ours.token_ids == hf[:len(ours.token_ids)]
        if ours.finish_reason == "stop":
            assert hf[len(ours.token_ids)] in tokenizer.eos_token_ids
        else:
            assert len(ours.token_ids) == 12
        assert len(set(hf)) > 1  # a degenerate constant output would prove little


@pytest.mark.parametrize("source", ["model", "runtime"])
@torch.no_grad()
def test_stream_events_are_well_formed(source, tiny_model, tiny_processor, tokenizer, one_thread):
    """Both streams — ``NVILAModel.stream`` (the reference) and ``Runtime.stream`` (a ``PlanEvent`` first) — keep
    one contract: tokens indexed 0..n-1 (then at most a flush of held-back text), their text and the usage equal
    to the finish event's, timings filled in, sampling reproducible with a seed."""
    img, question = random_image(500, 500), "what color is the square?"
    kw = dict(max_new_tokens=8, temperature=0.8, seed=3)
    if source == "model":
        inputs = tiny_processor(question, images=[img])
        events = list(tiny_model.stream(**inputs, tokenizer=tokenizer, **kw))
        again = tiny_model.generate(**inputs, tokenizer=tokenizer, **kw)
        prompt_tokens, visual_tokens = inputs.num_tokens, inputs.media[0].num_tokens
    else:
        rt = make_runtime(tiny_model, tokenizer)
        events = list(rt.stream(question, images=[img], **kw))
        again = rt.generate(question, images=[img], **kw)
        plan = events.pop(0)
        assert isinstance(plan, PlanEvent) and plan.type == "plan" and plan.num_tiles >= 1
        prompt_tokens, visual_tokens = plan.prompt_tokens, plan.visual_tokens
    *tokens, fin = events
    assert isinstance(fin, FinishEvent) and all(isinstance(e, TokenEvent) and e.type == "token" for e in tokens)
    n = len(fin.token_ids)
    assert [e.index for e in tokens[:n]] == list(range(n)) and [e.token_id for e in tokens[:n]] == fin.token_ids
    assert all(e.index == n - 1 for e in tokens[n:])  # at most a final flush of held-back text
    assert "".join(e.text for e in tokens) == fin.text == tokenizer.decode(fin.token_ids)
    assert fin.reason in ("stop", "length") and fin.usage.completion_tokens == n <= 8
    assert (fin.usage.prompt_tokens, fin.usage.visual_tokens) == (prompt_tokens, visual_tokens) and visual_tokens > 0
    t = fin.timings
    assert t.vision_ms > 0 and t.prefill_ms > 0 and len(t.per_token_ms) == max(n - 1, 0) and t.ttft_ms >= t.prefill_ms
    assert source == "model" or t.preprocess_ms > 0  # the runtime times its own preprocessing
    assert again.token_ids == fin.token_ids


@torch.no_grad()
def test_stop_string_truncates_answer(tiny_model, tiny_processor, tokenizer):
    inputs = tiny_processor("how many shapes?")
    full = tiny_model.generate(**inputs, tokenizer=tokenizer, max_new_tokens=16)
    assert len(full.text) >= 4, full.text
    stop = full.text[2:4]
    cut = full.text.find(stop)
    res = tiny_model.generate(**inputs, tokenizer=tokenizer, max_new_tokens=16, stop=[stop])
    assert res.finish_reason == "stop"
    assert res.text == full.text[:cut]
    streamed = "".join(e.text for e in tiny_model.stream(**inputs, tokenizer=tokenizer, max_new_tokens=16, stop=stop)
                       if isinstance(e, TokenEvent))
    assert streamed == res.text and stop not in streamed


@torch.no_grad()
def test_length_finish_and_result_type(tiny_model, tiny_processor, tokenizer):
    res = tiny_model.generate(**tiny_processor("what?"), tokenizer=tokenizer, max_new_tokens=1)
    assert isinstance(res, GenerationResult)
    assert len(res.token_ids) <= 1
    if res.token_ids:
        assert res.finish_reason == "length"


def test_context_overflow_raised_before_compute(tokenizer, monkeypatch):
    cfg = NVILAConfig.from_preset("tiny", llm={"context_length": 300})
    model = make_model(cfg)
    proc = NVILAProcessor(cfg, tokenizer)
    with pytest.raises(ContextOverflowError) as e:
        proc("what?", images=[random_image(900, 600)])
    assert e.value.num_tokens > 300 and e.value.limit == 300 and "300" in str(e.value)
    inputs = proc("what?", images=[random_image(900, 600)], check_context=False)

    def boom(*a, **k):
        raise AssertionError("vision ran before the overflow check")

    monkeypatch.setattr(model, "encode_tiles", boom)
    with pytest.raises(ContextOverflowError):
        next(model.stream(**inputs, tokenizer=tokenizer))


@torch.no_grad()
def test_sampling_is_seeded_and_validated(tiny_model, tiny_processor, tokenizer):
    inputs = tiny_processor("what color?")
    kw = dict(tokenizer=tokenizer, max_new_tokens=8, temperature=1.5, top_k=50, top_p=0.9, seed=7)
    a = tiny_model.generate(**inputs, **kw)
    b = tiny_model.generate(**inputs, **kw)
    assert a.token_ids == b.token_ids
    with pytest.raises(GenerationError):
        tiny_model.generate(**inputs, tokenizer=tokenizer, top_p=0.0)
    with pytest.raises(GenerationError):
        tiny_model.generate(**inputs, tokenizer=tokenizer, max_new_tokens=0)
    assert tiny_model.tokenizer is None  # built in code, not loaded: no tokenizer attached
    with pytest.raises(GenerationError, match="tokenizer"):
        next(tiny_model.stream(**inputs))


def test_sampler_filters():
    logits = np.array([0.0, 5.0, 4.0, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams())(logits) == 1
    # top_k = 1 always picks the argmax whatever the temperature
    s = Sampler(SamplingParams(temperature=5.0, top_k=1, seed=0))
    assert {s(logits) for _ in range(50)} == {1}
    # top_p small keeps only the most likely token
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.1, seed=0))
    assert {s(logits) for _ in range(50)} == {1}
    # repetition penalty demotes a seen token
    assert Sampler(SamplingParams(repetition_penalty=10.0))(logits, previous=[1]) == 2


@pytest.mark.parametrize("kw", [
    {"temperature": 5e-324}, {"temperature": 1e-300}, {"temperature": 1e308}, {"temperature": 1.0, "top_p": 5e-324},
    {"temperature": 1e-4, "top_p": 1e-300, "top_k": 1, "repetition_penalty": 0.01},
    {"temperature": 1.0, "repetition_penalty": 100.0}, {"temperature": 2.0, "top_k": 10**30, "seed": 2**63 - 1},
])
def test_sampler_is_defined_at_the_admitted_extremes(kw):
    """Every value SamplingParams admits picks a token without a floating-point warning (issue 32 class 1);
    below GREEDY_BELOW the pick is the greedy one."""
    import warnings

    from nvila_edge.sampling import GREEDY_BELOW

    logits = np.random.default_rng(0).normal(size=300).astype(np.float32) * 30
    logits[5] = np.float32(3e38)  # an extreme logit too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = Sampler(SamplingParams(**kw))(logits, previous=[1, 2, 5])
    assert 0 <= tok < 300
    if kw.get("temperature", 0) < GREEDY_BELOW:
        assert tok == Sampler(SamplingParams(repetition_penalty=kw.get("repetition_penalty", 1.0)))(logits, [1, 2, 5])


@pytest.mark.parametrize("kw, field", [({"repetition_penalty": 1e-300}, "repetition_penalty"),
                                       ({"repetition_penalty": 1e3}, "repetition_penalty"), ({"seed": 2**64}, "seed"),
                                       ({"top_p": 0.0}, "top_p")])
def test_sampling_params_refuse_what_cannot_be_computed(kw, field):
    from nvila_edge.errors import GenerationError

    with pytest.raises(GenerationError, match=field):
        SamplingParams(**kw)
