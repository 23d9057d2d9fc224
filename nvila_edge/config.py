"""NVILAConfig: the whole model in one dataclass (sub-configs in ``subconfigs.py``), its named presets
(``presets.py``) and its VILA ``config.json`` form (``vila_format.py``).

Pure Python (no torch / transformers import) so the runtime and the processor can read it anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from . import vila_format
from .errors import ConfigError
from .presets import PRESET_FIELDS
from .subconfigs import (ASPECT_MODES, PROJECTOR_DOWNSAMPLE, QWEN2_NEWLINE_ID, LLMConfig, PreprocessingConfig,
                         ProjectorConfig, VideoConfig, VisionConfig, _dataclass_from_dict)


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

    # ---- VILA config.json (vila_format.py) -----------------------------------------------------------
    @classmethod
    def from_vila_dict(cls, top: dict, llm: dict | None = None, vision: dict | None = None,
                       projector: dict | None = None, tokenizer: Any = None) -> "NVILAConfig":
        """Build from a VILA / ``-hf`` top config plus (optionally) the sub-folder configs; ``tokenizer``
        (the checkpoint's) gives the media / end token ids unless ``top`` states them (``media_token_ids``)."""
        return cls(**vila_format.vila_fields(top, llm, vision, projector, tokenizer))


PRESETS: dict[str, NVILAConfig] = {name: NVILAConfig(**fields) for name, fields in PRESET_FIELDS.items()}

__all__ = ["NVILAConfig", "PRESETS"]
