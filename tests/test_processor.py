"""NVILAProcessor end to end: placeholders, token budgets, pixel partitions, context limit, config checks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nvila_edge import ContextOverflowError, NVILAConfig, NVILAProcessor, NVILATokenizer, vila_format
from nvila_edge.errors import ConfigError, TokenizerError
from nvila_edge.media.image import load_image
from nvila_edge.media.video import VideoClip

try:
    import _media_helpers as H
except ImportError:  # tests/ is a package
    from tests import _media_helpers as H

IMG, VID, NL = 502, 503, 198


@pytest.fixture(scope="module")
def tok():
    return H.train_tokenizer()


@pytest.fixture(scope="module")
def s2(tok):
    return NVILAProcessor(NVILAConfig.from_preset("tiny"), tok)


@pytest.fixture(scope="module")
def lite(tok):
    return NVILAProcessor(NVILAConfig.from_preset("tiny-lite"), tok)


@pytest.fixture(scope="module")
def wide():
    return H.random_image(700, 300, seed=1)


@pytest.fixture(scope="module")
def small():
    return H.random_image(100, 100, seed=2)  # square and small: one tile on NVILA-Lite


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    return H.write_video(tmp_path_factory.mktemp("pv") / "clip", H.video_colours(30), size=(64, 48))


def _ids(out):
    return out.input_ids[0].tolist()


def _check_budget(out):
    ids = _ids(out)
    placeholders = ids.count(IMG) + ids.count(VID)
    assert placeholders == sum(m.num_placeholders for m in out.media)
    assert out.num_tokens == len(ids) - placeholders + sum(m.num_tokens for m in out.media)


def _check_partition(out):
    start = 0
    for m in out.media:
        assert m.tile_start == start
        assert m.num_tiles == m.plan.num_tiles
        start += m.num_tiles
    assert out.pixel_values.shape[0] == start


def test_one_image_dynamic_s2(s2, wide):
    out = s2("What?", images=[wide])
    ids = _ids(out)
    assert out.input_ids.dtype == np.int64 and out.input_ids.shape == (1, len(ids))
    assert ids.count(IMG) == 1
    assert len(out.media) == 1 and out.media[0].kind == "image"
    plan = out.media[0].plan
    assert plan.mode == "dynamic_s2" and plan.num_tiles == 15 and plan.num_tokens == 256 * 10 + 1
    assert out.pixel_values.shape == (15, 3, 448, 448) and out.pixel_values.dtype == np.float32
    assert out.num_tokens == len(ids) - 1 + 2561
    assert out.num_text_tokens == len(ids)
    _check_budget(out)
    _check_partition(out)
    np.testing.assert_array_equal(out.pixel_values, s2.image_tiles(wide, plan))
    assert ids == s2.tokenizer.encode(out.prompt)


def test_one_image_lite_placeholder_per_tile(lite, wide):
    out = lite("What?", images=[wide])
    ids = _ids(out)
    plan = out.media[0].plan
    n = plan.num_tiles
    assert n == 11 and plan.thumbnail
    assert out.prompt.count("<image>\n") == n
    assert "<|im_start|>user\n" + "<image>\n" * n + "What?<|im_end|>" in out.prompt
    pos = [i for i, t in enumerate(ids) if t == IMG]
    assert len(pos) == n
    assert all(ids[p + 1] == NL for p in pos)  # each tile placeholder is followed by the text "\n"
    assert pos == list(range(pos[0], pos[0] + 2 * n, 2))  # consecutive "<image>\n" pairs
    assert len(out.media) == 1 and out.media[0].num_placeholders == n
    assert out.num_tokens == len(ids) - n + n * 122
    assert out.pixel_values.shape[0] == n
    _check_budget(out)
    _check_partition(out)


def test_one_small_image_lite_single_tile(lite, small):
    out = lite("What?", images=[small])
    assert _ids(out).count(IMG) == 1
    assert out.pixel_values.shape[0] == 1
    assert out.num_tokens == len(_ids(out)) - 1 + 122
    assert "<image>What?" in out.prompt  # a single tile gets no extra "\n"


@pytest.mark.parametrize("which,per_image", [("s2", 257), ("lite", 122)])
def test_two_images_single_plan_each(request, which, per_image, wide, small):
    proc = request.getfixturevalue(which)
    out = proc("Compare.", images=[wide, small])
    ids = _ids(out)
    assert ids.count(IMG) == 2
    assert [m.plan.mode for m in out.media] == ["single", "single"]
    assert [(m.tile_start, m.num_tiles) for m in out.media] == [(0, 1), (1, 1)]
    assert out.pixel_values.shape == (2, 3, 448, 448)
    assert out.num_tokens == len(ids) - 2 + 2 * per_image
    _check_budget(out)
    for k, im in enumerate((wide, small)):
        np.testing.assert_allclose(out.pixel_values[k], H.ref_normalize([im.resize((448, 448))])[0], atol=1e-6)


def test_video_file(s2, video_file):
    out = s2("What happens?", videos=[video_file])
    ids = _ids(out)
    assert ids.count(VID) == 1 and ids.count(IMG) == 0
    assert "<|im_start|>user\n<vila/video>What happens?" in out.prompt
    m = out.media[0]
    assert m.kind == "video" and m.num_placeholders == 1
    assert m.clip.indices == np.round(np.linspace(0, 29, 8)).astype(int).tolist()
    assert m.plan.num_tokens == 1028
    assert out.pixel_values.shape == (8, 3, 448, 448)
    assert out.num_tokens == len(ids) - 1 + 1028
    _check_budget(out)
    _check_partition(out)
    np.testing.assert_array_equal(out.pixel_values, s2.video_tiles(m.clip))


def test_video_frame_list_and_clip(s2, lite):
    frames = [np.full((30, 40, 3), c, np.uint8) for c in H.video_colours(12)]
    out = lite("Describe.", videos=[frames])
    assert out.media[0].plan.num_tokens == 8 * 122
    assert out.num_tokens == len(_ids(out)) - 1 + 976
    clip = VideoClip(frames[:4], [0, 1, 2, 3])
    out = s2("Describe.", videos=[clip])
    assert out.media[0].clip is clip
    assert out.media[0].plan.num_tokens == 2 * 257  # 4 frames, pooled in 2s
    assert out.pixel_values.shape[0] == 4
    # solid-colour frames stay solid: channel 0 is the frame's red value
    np.testing.assert_allclose(out.pixel_values[:, 0, 0, 0], [(c[0] / 255 - 0.5) / 0.5 for c in H.video_colours(4)], atol=1e-6)


def test_mixed_video_then_image_in_placeholder_order(s2, wide):
    frames = [np.full((30, 40, 3), c, np.uint8) for c in H.video_colours(8)]
    out = s2("<vila/video>Compare it with <image>", images=[wide], videos=[frames])
    ids = _ids(out)
    assert ids.index(VID) < ids.index(IMG)
    assert [m.kind for m in out.media] == ["video", "image"]
    assert [(m.tile_start, m.num_tiles) for m in out.media] == [(0, 8), (8, 15)]
    assert out.media[1].plan.mode == "dynamic_s2"  # one image: full plan even with a video
    assert out.pixel_values.shape[0] == 23
    assert out.num_tokens == len(ids) - 2 + 1028 + 2561
    _check_budget(out)
    np.testing.assert_array_equal(out.pixel_values[8:], s2.image_tiles(wide, out.media[1].plan))
    np.testing.assert_array_equal(out.pixel_values[:8], s2.video_tiles(out.media[0].clip))


def test_mixed_without_placeholders_images_first(lite, wide, small):
    frames = [np.zeros((30, 40, 3), np.uint8)] * 8
    out = lite("Tell me.", images=[wide, small], videos=[frames])
    assert [m.kind for m in out.media] == ["image", "image", "video"]
    assert [(m.tile_start, m.num_tiles) for m in out.media] == [(0, 1), (1, 1), (2, 8)]
    assert out.num_tokens == len(_ids(out)) - 3 + 122 + 122 + 976
    _check_budget(out)


def test_text_only(s2):
    out = s2("Hello there")
    assert out.pixel_values is None and out.media == []
    assert out.num_tokens == len(_ids(out))


def test_inputs_mapping_protocol(s2, small):
    out = s2("hi", images=[small])
    d = dict(out)
    assert {"input_ids", "pixel_values", "media", "prompt", "num_tokens"} <= set(d)
    assert d["input_ids"] is out.input_ids
    assert {**out}["num_tokens"] == out.num_tokens
    with pytest.raises(KeyError):
        out["nope"]


def test_image_inputs_of_every_kind_give_same_pixels(s2, small, tmp_path):
    p = tmp_path / "s.png"
    small.save(p)
    ref = s2("x", images=[small]).pixel_values
    for src in (p, str(p), p.read_bytes(), np.asarray(small)):
        np.testing.assert_array_equal(s2("x", images=[src]).pixel_values, ref)


def test_context_overflow(tok, wide):
    proc = NVILAProcessor(NVILAConfig.from_preset("tiny", llm={"context_length": 300}), tok)
    expected = proc("What?", images=[wide], check_context=False).num_tokens
    assert expected > 300
    with pytest.raises(ContextOverflowError) as ei:
        proc("What?", images=[wide])
    assert ei.value.num_tokens == expected
    assert ei.value.limit == 300
    assert "300" in str(ei.value) and str(expected) in str(ei.value)
    # text-only prompt fits
    assert proc("What?").num_tokens < 300


def test_context_limit_boundary_leaves_room_for_answer(tok, small):
    n = NVILAProcessor(NVILAConfig.from_preset("tiny"), tok)("What?", images=[small]).num_tokens
    ok = NVILAProcessor(NVILAConfig.from_preset("tiny", llm={"context_length": n + 1}), tok)
    assert ok("What?", images=[small]).num_tokens == n
    full = NVILAProcessor(NVILAConfig.from_preset("tiny", llm={"context_length": n}), tok)
    with pytest.raises(ContextOverflowError):
        full("What?", images=[small])


def test_context_overflow_from_video(tok):
    proc = NVILAProcessor(NVILAConfig.from_preset("tiny-lite", llm={"context_length": 500}), tok)
    with pytest.raises(ContextOverflowError) as ei:
        proc("x", videos=[[np.zeros((8, 8, 3), np.uint8)] * 8])
    assert ei.value.num_tokens > 976 and ei.value.limit == 500


@pytest.mark.parametrize(
    "overrides",
    [{"image_token_id": 999}, {"video_token_id": 10}, {"image_token_id": 151649, "video_token_id": 151650}, {"end_token_ids": (199,)}],
)
def test_config_token_ids_must_match_tokenizer(tok, overrides):
    cfg = NVILAConfig.from_preset("tiny", **overrides)
    with pytest.raises(ConfigError):
        NVILAProcessor(cfg, tok)


def test_real_preset_with_tiny_tokenizer_is_config_error(tok):
    with pytest.raises(ConfigError, match="image_token_id"):
        NVILAProcessor(NVILAConfig.from_preset("nvila-8b"), tok)


def test_save_and_load_pretrained_round_trip(lite, wide, tmp_path):
    lite.save_pretrained(tmp_path)
    assert (tmp_path / "llm" / "tokenizer.json").is_file() and (tmp_path / "config.json").is_file()
    back = NVILAProcessor.from_pretrained(tmp_path)
    assert back.config == lite.config
    a, b = lite("What?", images=[wide]), back("What?", images=[wide])
    assert _ids(a) == _ids(b) and a.num_tokens == b.num_tokens
    np.testing.assert_array_equal(a.pixel_values, b.pixel_values)


def test_from_pretrained_without_tokenizer_raises(tmp_path, lite):
    import json

    (tmp_path / "config.json").write_text(json.dumps(vila_format.to_vila_dict(lite.config)))
    with pytest.raises(TokenizerError):
        NVILAProcessor.from_pretrained(tmp_path)


def test_decode(s2):
    ids = s2.tokenizer.encode("<|im_start|>assistant\nA red cat.<|im_end|>")
    assert s2.decode(ids) == "assistant\nA red cat."
    assert isinstance(s2.tokenizer, NVILATokenizer)


def test_processor_plans_match_module_functions(s2):
    plan = s2.plan_image((1920, 1080))
    assert plan.num_tiles == 17 and plan.num_tokens == 3073
    assert s2.plan_video().num_tokens == 1028
    assert s2.plan_video(16).num_tokens == 8 * 257


def test_loaded_image_not_mutated(s2):
    img = Image.new("RGBA", (50, 40), (1, 2, 3, 4))
    s2("x", images=[img])
    assert img.mode == "RGBA" and img.size == (50, 40)
    assert load_image(img).mode == "RGB"
