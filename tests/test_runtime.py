"""Runtime on the torch backend: same answers as the torch reference, budgets, tiling (its events:
test_generate.py's stream contract)."""

from __future__ import annotations

import pytest

from conftest import make_runtime, random_image
from nvila_edge.errors import ContextOverflowError, GenerationError


@pytest.fixture(scope="module")
def rt(tiny_model, tokenizer):
    return make_runtime(tiny_model, tokenizer)


def _reference(model, processor, tokenizer, prompt, n=8, **media):
    return model.generate(**processor(prompt, **media), tokenizer=tokenizer, max_new_tokens=n).token_ids


def test_image_answer_equals_torch_reference(rt, tiny_model, tiny_processor, tokenizer, one_thread):
    img = random_image(600, 340)
    res = rt.generate("What is in the image?", images=[img], max_new_tokens=8)
    assert res.token_ids == _reference(tiny_model, tiny_processor, tokenizer, "What is in the image?", images=[img])
    assert res.plan.media[0]["mode"] == "dynamic_s2" and res.plan.num_tiles == res.plan.media[0]["num_tiles"]
    assert res.usage.visual_tokens == res.plan.visual_tokens > 0


def test_video_and_multi_image_answers_equal_torch_reference(rt, tiny_model, tiny_processor, tokenizer, one_thread):
    frames = [random_image(64, 48, seed=s) for s in range(8)]
    res = rt.generate("What happens?", video=frames, max_new_tokens=6)
    assert res.token_ids == _reference(tiny_model, tiny_processor, tokenizer, "What happens?", videos=[frames], n=6)
    imgs = [random_image(300, 200, seed=3), random_image(200, 300, seed=4)]
    res = rt.generate("Compare them.", images=imgs, max_new_tokens=6)
    assert res.token_ids == _reference(tiny_model, tiny_processor, tokenizer, "Compare them.", images=imgs, n=6)


def test_lite_answer_equals_torch_reference(lite_model, lite_processor, tokenizer, one_thread):
    rt = make_runtime(lite_model, tokenizer)
    img = random_image(900, 400, seed=5)
    res = rt.generate("Describe.", images=img, max_new_tokens=6)
    assert res.token_ids == _reference(lite_model, lite_processor, tokenizer, "Describe.", images=[img], n=6)
    assert res.plan.media[0]["mode"] == "dynamic"


def test_bad_sampling_arguments_raise(rt):
    with pytest.raises(GenerationError):
        rt.stream("hi", max_new_tokens=0)
    with pytest.raises(GenerationError):
        rt.stream("hi", no_such_option=1)


def test_context_overflow_is_refused_before_compute(tiny_model, tokenizer):
    rt = make_runtime(tiny_model, tokenizer, limits={"context_length": 300})
    frames = [random_image(32, 32, seed=s) for s in range(8)]  # 8 frames → 4 TSP groups x 257 tokens
    with pytest.raises(ContextOverflowError) as err:
        rt.stream("What happens?", video=frames)
    assert err.value.limit == 300 and "drop_frames" in str(err.value)
    assert sum(rt.backend.calls.values()) == 0


def test_drop_frames_fits_the_video(tiny_model, tokenizer, one_thread):
    rt = make_runtime(tiny_model, tokenizer, limits={"context_length": 600})
    frames = [random_image(32, 32, seed=s) for s in range(8)]
    res = rt.generate("What happens?", video=frames, overflow="drop_frames", max_new_tokens=3)
    assert res.plan.dropped_frames == 4 and res.plan.media[0]["num_frames"] == 4  # 2 TSP groups fit
    assert res.usage.prompt_tokens < 600
    with pytest.raises(ContextOverflowError):  # even one TSP group is too long
        make_runtime(tiny_model, tokenizer, limits={"context_length": 200}).stream(
            "What happens?", video=frames, overflow="drop_frames")


def test_max_tiles_picks_the_largest_plan_that_fits(tiny_model, lite_model, tokenizer):
    img = random_image(1920, 1080)
    rt = make_runtime(tiny_model, tokenizer)
    full = rt.plan("q", images=[img]).event
    assert full.num_tiles == 1 + 4 + 12
    capped = rt.plan("q", images=[img], max_tiles=15).event  # 1 + 4 + 10 (5x2 last scale) fits, 4x3 does not
    assert capped.num_tiles == 15 and capped.tile_cap == 15 and capped.media[0]["mode"] == "dynamic_s2"
    tiny = rt.plan("q", images=[img], max_tiles=5).event  # below Dynamic-S2's minimum: one plain tile
    assert tiny.num_tiles == 1 and tiny.media[0]["mode"] == "single"
    lite = make_runtime(lite_model, tokenizer)
    p = lite.plan("q", images=[img], max_tiles=5).event  # 4x2+thumbnail and 3x2+thumbnail are too many
    assert p.media[0]["mode"] == "dynamic" and p.num_tiles == 3 and p.media[0]["num_placeholders"] == 3
    assert lite.plan("q", images=[img]).event.num_tiles == 9
    # the runtime-wide cap (Runtime.load(max_tiles=...) or the engine's limit) bounds every call
    assert make_runtime(lite_model, tokenizer, max_tiles=5).plan("q", images=[img], max_tiles=12).event.num_tiles == 3


def test_latency_budget_uses_measured_tile_cost(tiny_model, tokenizer, one_thread):
    img = random_image(1920, 1080)
    rt = make_runtime(tiny_model, tokenizer)
    ms = rt.measure_vision()
    assert ms > 0 and rt.planner.ms_per_tile == pytest.approx(ms)
    rt.planner.ms_per_tile = 100.0  # pin it: the test must not depend on this machine's load
    assert rt.plan("q", images=[img], latency_budget_ms=1500).event.num_tiles == 15  # cap 15
    ev = rt.plan("q", images=[img], latency_budget_ms=300).event
    assert ev.num_tiles == 1 and ev.tile_cap == 3 and ev.ms_per_tile == 100.0
    # the answer with the reduced plan runs and reports the plan it used
    res = rt.generate("q", images=[img], latency_budget_ms=300, max_new_tokens=2)
    assert res.plan.num_tiles == 1


def test_engine_limits_cap_frames_not_tiles(tiny_model, tokenizer):
    rt = make_runtime(tiny_model, tokenizer, limits={"max_frames": 4, "max_tiles": 12})
    frames = [random_image(32, 32, seed=s) for s in range(8)]
    ev = rt.plan("q", video=frames).event
    assert ev.media[0]["num_frames"] == 4
    # the engine's max_tiles is its batch size (tiles run in chunks), not a cap on the tiling plan
    assert rt.plan("q", images=[random_image(1920, 1080)]).event.num_tiles == 17
    assert make_runtime(tiny_model, tokenizer, max_tiles=15).plan("q", images=[random_image(1920, 1080)]).event.num_tiles == 15
