"""NVILAConfig: one dataclass with sub-configs, named presets, and translation to/from the VILA config.json.

Pure Python (no torch / transformers import) so the runtime and the processor can read it anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class NVILAConfig:
    """The whole model: vision tower → projector → LLM, plus preprocessing and video settings."""

    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    image_token_id: int = 151649
    video_token_id: int = 151650
    end_token_ids: tuple[int, ...] = (QWEN2_NEWLINE_ID,)  # tokenizer("\n"): appended after each media item
    model_dtype: str = "bfloat16"  # dtype of the released weights

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def num_scales(self) -> int:
        return len(self.preprocessing.s2_scales) if self.preprocessing.image_aspect_ratio == "dynamic_s2" else 1

    @property
    def mm_hidden_size(self) -> int:
        """Projector input channels: SigLIP hidden x number of Dynamic-S2 scales."""
        return self.vision.hidden_size * self.num_scales

    @property
    def tokens_per_tile(self) -> int:
        """Projected tokens for one 448 tile (32x32 patches → 16x16 = 256 or 11x11 = 121)."""
        side = math.ceil(self.vision.grid / self.projector.downsample)
        return side * side

    @property
    def pooled_side(self) -> int:
        return math.ceil(self.vision.grid / self.projector.downsample)

    def validate(self) -> None:
        p = self.preprocessing
        if self.projector.type not in PROJECTOR_DOWNSAMPLE:
            raise ConfigError(
                f"unknown projector type {self.projector.type!r}; supported: {sorted(PROJECTOR_DOWNSAMPLE)}"
            )
        if p.image_aspect_ratio not in ASPECT_MODES:
            raise ConfigError(f"unknown image_aspect_ratio {p.image_aspect_ratio!r}; supported: {ASPECT_MODES}")
        if self.vision.image_size % self.vision.patch_size:
            raise ConfigError("vision image_size must be a multiple of patch_size")
        if p.image_aspect_ratio == "dynamic_s2":
            scales = list(p.s2_scales)
            if scales != sorted(scales) or any(s % scales[0] for s in scales):
                raise ConfigError(f"s2_scales must be ascending multiples of the first scale, got {scales}")
            if scales[0] != self.vision.image_size:
                raise ConfigError(f"the first s2 scale ({scales[0]}) must equal the tile size ({self.vision.image_size})")
            if p.s2_resize_output_to_scale_idx not in (-1, len(scales) - 1):
                raise ConfigError("only s2_resize_output_to_scale_idx = -1 (resize to the largest scale) is supported")
            if (scales[-1] // scales[0]) ** 2 > p.max_tiles:
                raise ConfigError("max_tiles is smaller than the tile count of the largest s2 scale")
        if not 1 <= p.min_tiles <= p.max_tiles:
            raise ConfigError(f"need 1 <= min_tiles <= max_tiles, got {p.min_tiles}, {p.max_tiles}")
        for t, h, w in self.video.pool_sizes:
            if min(t, h, w) < 1 or self.pooled_side % h or self.pooled_side % w:
                raise ConfigError(f"pool size {(t, h, w)} does not divide the {self.pooled_side}x{self.pooled_side} token map")
        if self.video.num_frames < 1:
            raise ConfigError("video.num_frames must be >= 1")
        for t, _, _ in self.video.pool_sizes:
            if self.video.num_frames % t:
                raise ConfigError(f"video.num_frames ({self.video.num_frames}) must be a multiple of the pool size {t}")
        if self.llm.num_attention_heads % self.llm.num_key_value_heads:
            raise ConfigError("llm.num_attention_heads must be a multiple of num_key_value_heads")

    # ---- presets -------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "NVILAConfig":
        """A named preset (``nvila-8b``, ``nvila-lite-2b``, ``nvila-lite-8b``, ``tiny``, ``tiny-lite``).

        ``overrides`` replace top-level fields or, given a dict, fields of a sub-config
        (``from_preset("tiny", llm={"vocab_size": 600})``).
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
        cfg = copy.deepcopy(PRESETS[name])
        return cfg.replace(**overrides) if overrides else cfg

    def replace(self, **overrides: Any) -> "NVILAConfig":
        d = self.to_dict()
        for key, value in overrides.items():
            if key not in d:
                raise ConfigError(f"NVILAConfig has no field {key!r}")
            if isinstance(d[key], dict) and isinstance(value, dict):
                d[key].update(value)
            else:
                d[key] = value
        return NVILAConfig.from_dict(d)

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "NVILAConfig":
        try:
            d = dict(d)
            subs = {
                "vision": VisionConfig,
                "projector": ProjectorConfig,
                "llm": LLMConfig,
                "preprocessing": PreprocessingConfig,
                "video": VideoConfig,
            }
            kw = {}
            for key, sub in subs.items():
                kw[key] = _dataclass_from_dict(sub, d.pop(key, {}) or {})
            for key in ("end_token_ids",):
                if key in d:
                    d[key] = tuple(d[key])
            return cls(**kw, **d)
        except TypeError as e:
            raise ConfigError(f"invalid nvila-edge config: {e}") from e

    # ---- VILA config.json ----------------------------------------------------------------------------
    def to_vila_dict(self) -> dict:
        """Top-level VILA ``config.json`` (``LlavaLlamaModel``) with the sub-configs inline."""
        p, v = self.preprocessing, self.video
        video_encoder = {"_target_": "llava.model.encoders.BasicVideoEncoder"}
        if v.pool_sizes:
            video_encoder = {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [list(s) for s in v.pool_sizes]}
        return {
            "architectures": ["LlavaLlamaModel"],
            "model_type": "llava_llama",
            "llm_cfg": self.llm_hf_config(),
            "vision_tower_cfg": self.vision_hf_config(),
            "mm_projector_cfg": self.projector_hf_config(),
            "hidden_size": self.llm.hidden_size,
            "mm_hidden_size": self.mm_hidden_size,
            "mm_projector_type": self.projector.type,
            "mm_vision_select_layer": self.vision.select_layer,
            "mm_vision_select_feature": "cls_patch",
            "image_aspect_ratio": p.image_aspect_ratio,
            "dynamic_s2": p.image_aspect_ratio == "dynamic_s2",
            "s2": False,
            "s2_scales": ",".join(str(s) for s in p.s2_scales),
            "s2_max_split_size": p.s2_max_split_size,
            "s2_resize_output_to_scale_idx": p.s2_resize_output_to_scale_idx,
            "max_tiles": p.max_tiles,
            "min_tiles": p.min_tiles,
            "num_video_frames": v.num_frames,
            "fps": v.fps,
            "num_time_tokens": v.num_time_tokens,
            "time_token_format": v.time_token_format,
            "image_encoder": json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder"}),
            "video_encoder": json.dumps(video_encoder),
            "model_max_length": self.llm.context_length,
            "model_dtype": f"torch.{self.model_dtype}",
            "nvila_edge": {
                "name": self.name,
                "image_token_id": self.image_token_id,
                "video_token_id": self.video_token_id,
                "end_token_ids": list(self.end_token_ids),
            },
        }

    def llm_hf_config(self) -> dict:
        d = self.llm.to_hf_dict()
        d["architectures"] = ["Qwen2ForCausalLM"]
        d["model_max_length"] = self.llm.context_length
        return d

    def vision_hf_config(self) -> dict:
        d = self.vision.to_hf_dict()
        d["architectures"] = ["SiglipVisionModel"]
        return d

    def projector_hf_config(self) -> dict:
        return {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector", "mm_projector_type": self.projector.type}

    @classmethod
    def from_vila_dict(
        cls,
        top: dict,
        llm: dict | None = None,
        vision: dict | None = None,
        projector: dict | None = None,
        tokenizer: Any = None,
    ) -> "NVILAConfig":
        """Build from a VILA / ``-hf`` top config plus (optionally) the sub-folder configs.

        Sub-configs are looked up in the arguments first, then inline in ``top`` under the VILA
        (``llm_cfg``, ``vision_tower_cfg``, ``mm_projector_cfg``) or the ``-hf`` (``text_config``,
        ``vision_config``) names. ``tokenizer`` (the checkpoint's): media / end token ids come from it
        unless ``top`` states them (see ``media_token_ids``).
        """
        llm = llm or _sub(top, "llm_cfg", "text_config")
        vision = vision or _sub(top, "vision_tower_cfg", "vision_config")
        projector = projector or _sub(top, "mm_projector_cfg") or {}
        if not llm or not vision:
            raise ConfigError("config.json has no LLM or vision-tower sub-config (llm_cfg / vision_tower_cfg)")
        ptype = projector.get("mm_projector_type") or top.get("mm_projector_type")
        if ptype is None:
            ptype = "mlp_downsample_3x3_fix" if top.get("model_type") == "nvila_lite" else "mlp_downsample_2x2_fix"
        aspect = top.get("image_aspect_ratio")
        if aspect is None:  # the -hf configs state none: NVILA is Dynamic-S2, NVILA-Lite tiles (as SGLang reads them)
            aspect = {"nvila": "dynamic_s2", "nvila_lite": "dynamic"}.get(top.get("model_type"))
            aspect = aspect or ("dynamic_s2" if top.get("dynamic_s2") else "resize")
        if aspect not in ASPECT_MODES:
            raise ConfigError(f"image_aspect_ratio {aspect!r} is not supported; supported: {ASPECT_MODES}")
        scales = top.get("s2_scales", "448,896,1344")
        if isinstance(scales, str):
            scales = [int(s) for s in scales.split(",") if s.strip()]
        vcfg = VisionConfig.from_hf_dict(vision)
        vcfg.select_layer = int(top.get("mm_vision_select_layer", -2))
        pre = PreprocessingConfig(
            image_aspect_ratio=aspect,
            s2_scales=tuple(sorted(scales)) if aspect == "dynamic_s2" else (vcfg.image_size,),
            s2_max_split_size=int(top.get("s2_max_split_size", vcfg.image_size)),
            s2_resize_output_to_scale_idx=int(top.get("s2_resize_output_to_scale_idx", -1)),
            max_tiles=int(top.get("max_tiles", 12)),
            min_tiles=int(top.get("min_tiles", 1)),
        )
        video_encoder = top.get("video_encoder") or {}
        if isinstance(video_encoder, str):
            video_encoder = json.loads(video_encoder)
        pools = tuple(tuple(int(x) for x in s) for s in video_encoder.get("pool_sizes", ()))
        vid = VideoConfig(
            num_frames=int(top.get("num_video_frames", 8)),
            fps=float(top.get("fps", 0.0) or 0.0),
            pool_sizes=pools,
            num_time_tokens=int(top.get("num_time_tokens", 0) or 0),
            time_token_format=top.get("time_token_format") or "<t{t}>",
        )
        ours = top.get("nvila_edge", {})
        dtype = str(top.get("model_dtype") or llm.get("dtype") or llm.get("torch_dtype") or "bfloat16")
        return cls(
            name=ours.get("name", top.get("_name_or_path") or top.get("model_type", "custom")),
            vision=vcfg,
            projector=ProjectorConfig(type=ptype),
            llm=LLMConfig.from_hf_dict(llm, context_length=top.get("model_max_length")),
            preprocessing=pre,
            video=vid,
            model_dtype=dtype.replace("torch.", ""),
            **media_token_ids(top, tokenizer),
        )


# Stock Qwen2 NVILA ids: used only when neither the config nor a tokenizer gives them (weights-only folders).
_STOCK_TOKEN_IDS = {"image_token_id": 151649, "video_token_id": 151650, "end_token_ids": (QWEN2_NEWLINE_ID,)}


def tokenizer_token_ids(tokenizer: Any) -> dict:
    """The reference's ids from a tokenizer: ``<image>``, ``<vila/video>`` and the tokenization of "\n"
    (an ``NVILATokenizer`` or a transformers tokenizer)."""
    if hasattr(tokenizer, "newline_ids"):
        return {"image_token_id": tokenizer.image_token_id, "video_token_id": tokenizer.video_token_id,
                "end_token_ids": tuple(tokenizer.newline_ids)}
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<image>"), ("video_token_id", "<vila/video>"))}
    ids["end_token_ids"] = tuple(tokenizer.encode("\n", add_special_tokens=False))
    return ids


def media_token_ids(top: dict, tokenizer: Any = None) -> dict:
    """The one rule for ``image_token_id`` / ``video_token_id`` / ``end_token_ids`` (the reference's):
    the tokenizer gives them; a config that states one (the ``-hf`` layouts, our ``nvila_edge`` block)
    must agree with it, else ``ConfigError``. Without a tokenizer: the stated ids, else the stock ones."""
    ours = top.get("nvila_edge") or {}
    stated = {}
    for key in _STOCK_TOKEN_IDS:
        value = ours.get(key, top.get(key))
        if value is not None and value != -1:  # SGLang writes -1 for "not given"
            stated[key] = tuple(int(v) for v in value) if key == "end_token_ids" else int(value)
    if tokenizer is None:
        return {**_STOCK_TOKEN_IDS, **stated}
    found = tokenizer_token_ids(tokenizer)
    for key, value in stated.items():
        if value != found[key]:
            raise ConfigError(
                f"config.json states {key} = {value} but the checkpoint's tokenizer gives {found[key]}; the config and "
                f"tokenizer come from different models: remove {key} from config.json (the tokenizer's id is used, "
                "as in the reference) or put back the tokenizer the model was trained with"
            )
    return found


# transformers bookkeeping fields that never describe the architecture
_HF_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
    "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "use_cache", "model_max_length", "layer_types",
    "auto_map", "tokenizer_padding_side",
}


def _sub(top: dict, *names: str) -> dict | None:
    for n in names:
        v = top.get(n)
        if isinstance(v, dict):
            return v
    return None


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


# ---- presets ---------------------------------------------------------------------------------------------
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

PRESETS: dict[str, NVILAConfig] = {
    "nvila-8b": NVILAConfig(
        name="nvila-8b", vision=_SIGLIP_SO400M, projector=ProjectorConfig("mlp_downsample"), llm=_QWEN2_7B,
        preprocessing=_S2,
    ),
    "nvila-lite-2b": NVILAConfig(
        name="nvila-lite-2b", vision=_SIGLIP_SO400M, projector=ProjectorConfig("mlp_downsample_3x3_fix"),
        llm=_QWEN25_1_5B, preprocessing=_LITE,
    ),
    "nvila-lite-8b": NVILAConfig(
        name="nvila-lite-8b", vision=_SIGLIP_SO400M, projector=ProjectorConfig("mlp_downsample_3x3_fix"),
        llm=_QWEN2_7B, preprocessing=_LITE,
    ),
    "tiny": NVILAConfig(
        name="tiny", vision=_TINY_VISION, projector=ProjectorConfig("mlp_downsample_2x2_fix"), llm=_TINY_LLM,
        preprocessing=_S2, video=VideoConfig(num_frames=8, pool_sizes=((2, 1, 1),)), model_dtype="float32",
        image_token_id=TINY_BASE_VOCAB + 6, video_token_id=TINY_BASE_VOCAB + 7,
    ),
    # the embedded demo model (`nvila-edge demo`): NVILA-8B's structure (Dynamic-S2, 2x2 projector, TSP) at
    # 112-pixel tiles of 28-pixel patches and two scales (5-7 tiles, 16-24 visual tokens an image) so it
    # trains on 2 CPU cores in minutes; 4 layers (3 used: hidden_states[-2]) read words better than 3
    # (held-out OCR 50 -> 60 % in the VEP probe, docs/BENCHMARKS.md)
    "demo": NVILAConfig(
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
    "tiny-lite": NVILAConfig(
        name="tiny-lite", vision=_TINY_VISION, projector=ProjectorConfig("mlp_downsample_3x3_fix"), llm=_TINY_LLM,
        preprocessing=_LITE, model_dtype="float32",
        image_token_id=TINY_BASE_VOCAB + 6, video_token_id=TINY_BASE_VOCAB + 7,
    ),
}
