"""``FinetuneConfig``: the LoRA / QLoRA + ViT-LayerNorm settings (paper Table 5) and the tile cap of an
example, kept apart from ``finetune.py`` so the memory estimate (``memory.py``) reads them without
importing the fine-tuning code that calls it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from nvila_edge import NVILAConfig
from nvila_edge.errors import ConfigError

QWEN2_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIT_FROZEN_NAME_PARTS = ("embedding", "mlp", "self_attn", "head")  # paper: everything but the LayerNorms
VIT_LR_RATIO_RANGE = (5.0, 50.0)
MODES = ("lora", "qlora")


@dataclass
class FinetuneConfig:
    """LoRA / QLoRA + ViT-LayerNorm fine-tuning settings (defaults: the paper's)."""

    mode: str = "qlora"  # "lora" (fp base) | "qlora" (NF4 base)
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = QWEN2_LINEARS
    learning_rate: float = 2e-4  # the LLM LoRA parameters
    vit_lr_ratio: float = 10.0  # ViT LayerNorm lr = learning_rate / vit_lr_ratio, within [5, 50]
    train_projector: bool = False
    projector_lr: float | None = None  # None: learning_rate
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4  # the effective batch: examples per optimizer step
    micro_batch_size: int = 1  # examples per forward; batch_size / micro_batch_size forwards accumulate
    max_tiles: int | None = None  # tiles per example (all scales / the thumbnail counted); None: the model's
    seed: int = 0
    gradient_checkpointing: bool = True  # per layer, LLM and vision tower
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # any transformers lr_scheduler_type ("constant", "linear", ...)

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        self.validate()

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"fine-tuning mode must be one of {MODES}, got {self.mode!r}")
        lo, hi = VIT_LR_RATIO_RANGE
        if not lo <= self.vit_lr_ratio <= hi:
            raise ConfigError(
                f"vit_lr_ratio must be within [{lo:g}, {hi:g}] (the ViT LayerNorm learning rate is 5-50x smaller "
                f"than the LLM's, NVILA paper), got {self.vit_lr_ratio:g}"
            )
        if self.r < 1 or self.alpha <= 0:
            raise ConfigError(f"LoRA needs r >= 1 and alpha > 0, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("target_modules is empty: name at least one LLM linear (e.g. q_proj)")
        if self.learning_rate <= 0 or (self.projector_lr is not None and self.projector_lr <= 0):
            raise ConfigError("learning rates must be > 0")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError(f"batch_size and micro_batch_size must be >= 1, got {self.batch_size}, {self.micro_batch_size}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch_size ({self.batch_size}, the effective batch) must be a multiple of "
                              f"micro_batch_size ({self.micro_batch_size}, examples per forward)")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ConfigError(f"max_tiles must be >= 1 (or None: the model's), got {self.max_tiles}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set epochs > 0 or max_steps > 0")

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    @property
    def vit_lr(self) -> float:
        return self.learning_rate / self.vit_lr_ratio

    @property
    def projector_learning_rate(self) -> float:
        return self.projector_lr if self.projector_lr is not None else self.learning_rate

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown FinetuneConfig fields: {sorted(unknown)}")
        return cls(**d)


def tile_capped_config(config: NVILAConfig, max_tiles: int | None) -> NVILAConfig:
    """``config`` with images cut into at most ``max_tiles`` tiles each, counted as the estimate counts them
    (Dynamic-S2: every scale's tiles, 1 + 4 + up to 12 for NVILA-8B; dynamic tiling: the grid + its
    thumbnail). ``None`` or a cap above the model's own leaves it unchanged."""
    p = config.preprocessing
    if max_tiles is None or p.image_aspect_ratio not in ("dynamic_s2", "dynamic"):
        return config
    if p.image_aspect_ratio == "dynamic_s2":
        small = sum((sc // p.s2_scales[0]) ** 2 for sc in p.s2_scales[:-1])
        least = small + (p.s2_scales[-1] // p.s2_scales[0]) ** 2
        if max_tiles < least:
            raise ConfigError(f"max_tiles {max_tiles} is below the {least} tiles every image takes in {config.name}'s "
                              f"Dynamic-S2 scales {list(p.s2_scales)}: use at least {least}")
        last = max_tiles - small
    else:
        last = 1 if max_tiles < 3 else max_tiles - 1  # a grid of more than one tile adds a thumbnail
    last = min(last, p.max_tiles)
    pre = dataclasses.replace(p, max_tiles=last, min_tiles=min(p.min_tiles, last))
    return dataclasses.replace(config, preprocessing=pre)
