"""The parts of an ``NVILAConfig``: vision tower, projector, LLM, preprocessing and video settings, each a
dataclass that reads / writes its transformers (``SiglipVisionConfig`` / ``Qwen2Config``) dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError

PROJECTOR_DOWNSAMPLE = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}
ASPECT_MODES = ("dynamic_s2", "dynamic", "resize")

# Reference special tokens of the Qwen2-based NVILA tokenizers (see docs/ARCHITECTURE.md).
QWEN2_NEWLINE_ID = 198


@dataclass
class VisionConfig:
    """SigLIP vision tower (transformers ``SiglipVisionModel``)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 448
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    select_layer: int = -2  # NVILA feature = hidden_states[-2], all patch tokens
    use_head: bool = True  # the pooling head is unused but present in real checkpoints
    extra: dict = field(default_factory=dict)  # other SiglipVisionConfig fields, passed through

    @property
    def grid(self) -> int:
        """Patch tokens per side of one tile (448 / 14 = 32)."""
        return self.image_size // self.patch_size

    def to_hf_dict(self) -> dict:
        d = dict(self.extra)
        d.update(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            patch_size=self.patch_size,
            image_size=self.image_size,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
            vision_use_head=self.use_head,
            num_channels=3,
            model_type="siglip_vision_model",
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "VisionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: d[k] for k in known & d.keys() if k not in ("extra", "use_head", "select_layer")}
        if "vision_use_head" in d:
            kw["use_head"] = bool(d["vision_use_head"])
        skip = _HF_BOOKKEEPING | {"vision_use_head", "num_channels"}
        extra = {k: v for k, v in d.items() if k not in known and k not in skip}
        return cls(**kw, extra=extra)


@dataclass
class ProjectorConfig:
    """Multimodal projector (``mlp_downsample*``), reference state-dict keys ``layers.N.*``."""

    type: str = "mlp_downsample_2x2_fix"

    @property
    def downsample(self) -> int:
        return PROJECTOR_DOWNSAMPLE[self.type]


@dataclass
class LLMConfig:
    """Qwen2 language model (transformers ``Qwen2ForCausalLM``)."""

    vocab_size: int = 151648
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    context_length: int = 32768  # model_max_length: the prompt + answer limit we enforce
    extra: dict = field(default_factory=dict)

    def to_hf_dict(self) -> dict:
        d = dict(self.extra)
        d.update(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=self.hidden_act,
            model_type="qwen2",
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, context_length: int | None = None) -> "LLMConfig":
        d = dict(d)
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        if "rope_theta" not in d and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: d[k] for k in known & d.keys() if k not in ("extra", "context_length")}
        extra = {k: v for k, v in d.items() if k not in known and k not in _HF_BOOKKEEPING}
        if rope and rope.get("rope_type", "default") != "default":
            extra["rope_scaling"] = rope
        ctx = context_length or d.get("model_max_length") or kw.get("max_position_embeddings", 32768)
        return cls(**kw, context_length=int(ctx), extra=extra)


@dataclass
class PreprocessingConfig:
    """Image preprocessing: Dynamic-S2 (NVILA), InternVL-style dynamic tiling (NVILA-Lite) or plain resize."""

    image_aspect_ratio: str = "dynamic_s2"
    s2_scales: tuple[int, ...] = (448, 896, 1344)
    s2_max_split_size: int = 448
    s2_resize_output_to_scale_idx: int = -1
    max_tiles: int = 12
    min_tiles: int = 1
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_image_pixels: int = 178_956_970  # 2x Pillow's default bomb limit; larger inputs raise MediaError


@dataclass
class VideoConfig:
    """Video sampling and temporal pooling (TSP)."""

    num_frames: int = 8
    fps: float = 0.0
    # TSP pool sizes (t, h, w); empty = one group per frame (reference BasicVideoEncoder)
    pool_sizes: tuple[tuple[int, int, int], ...] = ()
    num_time_tokens: int = 0
    time_token_format: str = "<t{t}>"

    def effective_pool_sizes(self) -> tuple[tuple[int, int, int], ...]:
        return self.pool_sizes or ((1, 1, 1),)


# transformers bookkeeping fields that never describe the architecture
_HF_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
    "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "use_cache", "model_max_length", "layer_types",
    "auto_map", "tokenizer_padding_side",
}


def _dataclass_from_dict(cls, d: dict):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kw = {}
    for k, v in d.items():
        if isinstance(v, list):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        kw[k] = v
    return cls(**kw)
