"""Named model presets (``NVILAConfig.from_preset``): the published NVILA sizes and the small models the
tests and the embedded demo build in code. Each preset is the fields of an ``NVILAConfig``."""

from __future__ import annotations

from .subconfigs import LLMConfig, PreprocessingConfig, ProjectorConfig, VideoConfig, VisionConfig

_SIGLIP_SO400M = VisionConfig()  # so400m patch14-448
_QWEN2_7B = LLMConfig()
_QWEN25_1_5B = LLMConfig(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, tie_word_embeddings=True,
)
# tiny: a 496-token byte-level BPE (NVILATokenizer.train default) + the 8 NVILA special tokens after it
TINY_BASE_VOCAB = 496
# tiny: same structure, a few layers, hidden sizes multiples of 128 (AWQ group 128 later)
_TINY_VISION = VisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2)
_TINY_LLM = LLMConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=8192, context_length=8192,
)
_S2 = PreprocessingConfig()
_LITE = PreprocessingConfig(image_aspect_ratio="dynamic", s2_scales=(448,))

PRESET_FIELDS: dict[str, dict] = {
    "nvila-8b": dict(
        name="nvila-8b", vision=_SIGLIP_SO400M, projector=ProjectorConfig("mlp_downsample"), llm=_QWEN2_7B,
        preprocessing=_S2,
    ),
    "nvila-lite-2b": dict(
        name="nvila-lite-2b", vision=_SIGLIP_SO400M, projector=ProjectorConfig("mlp_downsample_3x3_fix"),
        llm=_QWEN25_1_5B, preprocessing=_LITE,
    ),
    "nvila-lite-8b": dict(
        name="nvila-lite-8b", vision=_SIGLIP_SO400M, projector=ProjectorConfig("mlp_downsample_3x3_fix"),
        llm=_QWEN2_7B, preprocessing=_LITE,
    ),
    "tiny": dict(
        name="tiny", vision=_TINY_VISION, projector=ProjectorConfig("mlp_downsample_2x2_fix"), llm=_TINY_LLM,
        preprocessing=_S2, video=VideoConfig(num_frames=8, pool_sizes=((2, 1, 1),)), model_dtype="float32",
        image_token_id=TINY_BASE_VOCAB + 6, video_token_id=TINY_BASE_VOCAB + 7,
    ),
    # the embedded demo model (`nvila-edge demo`): NVILA-8B's structure (Dynamic-S2, 2x2 projector, TSP) at
    # 112-pixel tiles of 28-pixel patches and two scales (5-7 tiles, 16-24 visual tokens an image) so it
    # trains on 2 CPU cores in minutes; 4 layers (3 used: hidden_states[-2]) read words better than 3
    # (held-out OCR 50 -> 60 % in the VEP probe, docs/BENCHMARKS.md)
    "demo": dict(
        name="demo",
        vision=VisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                            image_size=112, patch_size=28),
        projector=ProjectorConfig("mlp_downsample_2x2_fix"),
        llm=LLMConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, context_length=2048),
        preprocessing=PreprocessingConfig(s2_scales=(112, 224), max_tiles=6),
        video=VideoConfig(num_frames=8, pool_sizes=((2, 1, 1),), num_time_tokens=8),
        image_token_id=TINY_BASE_VOCAB + 6, video_token_id=TINY_BASE_VOCAB + 7, model_dtype="float32",
    ),
    "tiny-lite": dict(
        name="tiny-lite", vision=_TINY_VISION, projector=ProjectorConfig("mlp_downsample_3x3_fix"), llm=_TINY_LLM,
        preprocessing=_LITE, model_dtype="float32",
        image_token_id=TINY_BASE_VOCAB + 6, video_token_id=TINY_BASE_VOCAB + 7,
    ),
}
