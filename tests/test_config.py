"""Config presets (real sizes on the meta device only), serialisation and validation."""

from __future__ import annotations

import pytest
import torch

from nvila_edge import ConfigError, NVILAConfig, vila_format


def _meta_params(name: str) -> int:
    from nvila_edge import NVILAModel

    with torch.device("meta"):
        model = NVILAModel(NVILAConfig.from_preset(name))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,low,high", [("nvila-lite-2b", 1.9e9, 2.2e9), ("nvila-8b", 8.0e9, 8.6e9), ("nvila-lite-8b", 8.0e9, 8.6e9)])
def test_real_presets_parameter_count_on_meta(name, low, high):
    n = _meta_params(name)
    assert low < n < high, n


def test_real_preset_sizes_match_reference():
    c = NVILAConfig.from_preset("nvila-8b")
    assert (c.vision.hidden_size, c.vision.num_hidden_layers, c.vision.image_size, c.vision.patch_size) == (1152, 27, 448, 14)
    assert c.mm_hidden_size == 3456 and c.tokens_per_tile == 256
    assert (c.llm.hidden_size, c.llm.num_hidden_layers, c.llm.num_attention_heads, c.llm.num_key_value_heads) == (3584, 28, 28, 4)
    assert c.llm.intermediate_size == 18944 and c.llm.rope_theta == 1e6
    assert c.preprocessing.s2_scales == (448, 896, 1344) and c.preprocessing.image_aspect_ratio == "dynamic_s2"
    lite = NVILAConfig.from_preset("nvila-lite-2b")
    assert lite.mm_hidden_size == 1152 and lite.tokens_per_tile == 121 and lite.llm.tie_word_embeddings
    assert (lite.image_token_id, lite.video_token_id) == (151649, 151650)


@pytest.mark.parametrize("name", ["tiny", "tiny-lite"])
def test_tiny_hidden_sizes_are_multiples_of_128(name):
    c = NVILAConfig.from_preset(name)
    for v in (c.vision.hidden_size, c.vision.intermediate_size, c.llm.hidden_size, c.llm.intermediate_size):
        assert v % 128 == 0


@pytest.mark.parametrize("name", ["nvila-8b", "nvila-lite-2b", "tiny", "tiny-lite"])
def test_dict_and_vila_round_trip(name):
    c = NVILAConfig.from_preset(name)
    assert NVILAConfig.from_dict(c.to_dict()) == c
    v = vila_format.to_vila_dict(c)
    assert v["model_type"] == "llava_llama" and v["mm_projector_cfg"]["model_type"] == "v2l_projector"
    back = NVILAConfig.from_vila_dict(v)
    assert back == c


def test_overrides_and_errors():
    c = NVILAConfig.from_preset("tiny", llm={"context_length": 300})
    assert c.llm.context_length == 300 and c.llm.hidden_size == 128
    with pytest.raises(ConfigError, match="unknown preset"):
        NVILAConfig.from_preset("nvila-70b")
    with pytest.raises(ConfigError, match="projector"):
        NVILAConfig.from_preset("tiny", projector={"type": "mlp_downsample_4x4"})
    with pytest.raises(ConfigError, match="multiple"):
        NVILAConfig.from_preset("tiny", video={"num_frames": 7})
    with pytest.raises(ConfigError):
        NVILAConfig.from_dict({"vision": {"no_such_field": 1}})


def test_media_token_ids_follow_the_tokenizer(tokenizer):
    """The reference rule: ids from the tokenizer unless the config states them; stated ids must agree."""
    top = vila_format.to_vila_dict(NVILAConfig.from_preset("tiny"))
    top.pop("nvila_edge")  # a published VILA config: no ids
    assert NVILAConfig.from_vila_dict(top).image_token_id == 151649  # no tokenizer: the stock Qwen2 ids
    got = NVILAConfig.from_vila_dict(top, tokenizer=tokenizer)
    assert (got.image_token_id, got.video_token_id, got.end_token_ids) == (502, 503, (198,))
    assert NVILAConfig.from_vila_dict({**top, "image_token_id": 502, "video_token_id": -1}, tokenizer=tokenizer) == got
    with pytest.raises(ConfigError, match="image_token_id = 151649 but the checkpoint's tokenizer gives 502"):
        NVILAConfig.from_vila_dict({**top, "image_token_id": 151649}, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="end_token_ids"):
        NVILAConfig.from_vila_dict({**top, "nvila_edge": {"end_token_ids": [13]}}, tokenizer=tokenizer)


@pytest.mark.parametrize("model_type, aspect, projector", [("nvila", "dynamic_s2", "mlp_downsample_2x2_fix"),
                                                           ("nvila_lite", "dynamic", "mlp_downsample_3x3_fix")])
def test_hf_configs_default_like_sglang(model_type, aspect, projector):
    c = NVILAConfig.from_preset("tiny")
    top = {"model_type": model_type, "text_config": vila_format.llm_hf_config(c), "vision_config": vila_format.vision_hf_config(c)}
    got = NVILAConfig.from_vila_dict(top)
    assert got.preprocessing.image_aspect_ratio == aspect and got.projector.type == projector
    assert got.preprocessing.s2_scales == ((448, 896, 1344) if aspect == "dynamic_s2" else (448,))
