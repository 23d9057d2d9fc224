"""Quantization recipes as a registry: name → which part of NVILA it applies to + a ModelOpt config.

ModelOpt's stock configs (``mtq.INT8_SMOOTHQUANT_CFG``, ``mtq.INT4_AWQ_CFG``) are the base; the vision
recipes delete ModelOpt's default entries that switch off ``*vision_tower*`` / ``*vision_model*`` /
``*visual*`` / projector quantizers (they exist so LLM-only recipes leave vision towers alone — here the
vision tower IS the target) and keep the patch-embedding conv and LayerNorm inputs in float (ORT does
not fuse Q/DQ around LayerNorm: it costs speed for no accuracy).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from nvila_edge.errors import CalibrationError

PARTS = ("vision", "llm")
# ModelOpt default entries that would silently disable a vision recipe
_VISION_DISABLERS = {"*vision_tower*", "*vision_model*", "*visual*", "*embed_vision*", "*multi_modal_projector*"}


@dataclass(frozen=True)
class QuantRecipe:
    """One quantization scheme for one part of the model."""

    name: str
    part: str  # "vision" (SigLIP tower, optionally the projector) or "llm" (Qwen2 decoder layers)
    description: str
    weight_bits: int | None = None  # None: not quantized (fp16 deployment)
    act_bits: int | None = None
    block_size: int | None = None  # INT4 group size along the input dimension
    algorithm: str | None = None
    quantize_projector: bool = False
    make_config: Callable[[], dict] | None = field(default=None, compare=False, repr=False)

    @property
    def quantized(self) -> bool:
        return self.make_config is not None

    def modelopt_config(self) -> dict:
        if self.make_config is None:
            raise CalibrationError(f"recipe {self.name!r} does not quantize; it has no ModelOpt config")
        return self.make_config()

    def check(self, config) -> None:
        """Refuse shapes the scheme cannot handle, before any work."""
        if self.block_size and self.part == "llm":
            llm = config.llm
            bad = {n: v for n, v in (("hidden_size", llm.hidden_size), ("intermediate_size", llm.intermediate_size))
                   if v % self.block_size}
            if bad:
                raise CalibrationError(
                    f"recipe {self.name!r} quantizes in groups of {self.block_size} input channels but the LLM has "
                    + ", ".join(f"{k}={v}" for k, v in bad.items())
                    + f" (not a multiple of {self.block_size}); use llm='fp16' or a model with such sizes")

    def to_dict(self) -> dict:
        return {"name": self.name, "part": self.part, "description": self.description,
                "weight_bits": self.weight_bits, "act_bits": self.act_bits, "block_size": self.block_size,
                "algorithm": self.algorithm, "quantize_projector": self.quantize_projector}


RECIPES: dict[tuple[str, str], QuantRecipe] = {}


def register(recipe: QuantRecipe) -> QuantRecipe:
    if recipe.part not in PARTS:
        raise CalibrationError(f"recipe part must be one of {PARTS}, got {recipe.part!r}")
    RECIPES[(recipe.part, recipe.name)] = recipe
    return recipe


def get_recipe(name: str, part: str) -> QuantRecipe:
    try:
        return RECIPES[(part, name)]
    except KeyError:
        known = ", ".join(n for p, n in RECIPES if p == part)
        raise CalibrationError(f"unknown {part} recipe {name!r}; known {part} recipes: {known}") from None


def list_recipes(part: str | None = None) -> list[QuantRecipe]:
    return [r for (p, _), r in RECIPES.items() if part in (None, p)]


# ---- ModelOpt configs ---------------------------------------------------------------------------------
def _mtq():
    from nvila_edge.optional import require

    return require("modelopt.torch.quantization", "calib", "calibration", name="nvidia-modelopt")


def _vision_int8() -> Callable[[], dict]:
    def make() -> dict:
        cfg = copy.deepcopy(_mtq().INT8_SMOOTHQUANT_CFG)
        cfg["quant_cfg"] = [e for e in cfg["quant_cfg"] if e.get("quantizer_name") not in _VISION_DISABLERS]
        cfg["quant_cfg"] += [
            {"quantizer_name": "*patch_embedding*", "enable": False},  # conv stem: tiny, sensitive
            {"quantizer_name": "*layer_norm*", "enable": False},
            {"quantizer_name": "*layernorm*", "enable": False},
            {"quantizer_name": "*head*", "enable": False},  # SigLIP pooling head: NVILA never runs it
            {"quantizer_name": "*bmm_quantizer", "enable": False},
            {"quantizer_name": "*output_quantizer", "enable": False},
        ]
        return cfg
    return make


def _llm_int4(algorithm: str | dict, block: int) -> Callable[[], dict]:
    def make() -> dict:
        cfg = copy.deepcopy(_mtq().INT4_AWQ_CFG)
        for e in cfg["quant_cfg"]:
            if e.get("quantizer_name") == "*weight_quantizer":
                e["cfg"]["block_sizes"] = {-1: block, "type": "static"}
        cfg["quant_cfg"] += [{"quantizer_name": "*bmm_quantizer", "enable": False},
                             {"quantizer_name": "*output_quantizer", "enable": False}]
        cfg["algorithm"] = copy.deepcopy(algorithm)
        return cfg
    return make


register(QuantRecipe("fp16", "vision", "no quantization: fp16 engines (fp32 on CPU)"))
register(QuantRecipe(
    "w8a8-smoothquant", "vision", "INT8 per-channel weights, INT8 per-tensor activations, SmoothQuant (alpha 0.5)",
    weight_bits=8, act_bits=8, algorithm="smoothquant", make_config=_vision_int8()))
register(QuantRecipe(
    "w8a8-smoothquant-proj", "vision", "w8a8-smoothquant on the SigLIP tower and the MLP projector",
    weight_bits=8, act_bits=8, algorithm="smoothquant", quantize_projector=True, make_config=_vision_int8()))
register(QuantRecipe("fp16", "llm", "no quantization: fp16 engines (fp32 on CPU)"))
register(QuantRecipe(
    "w4a16-awq", "llm", "INT4 weights in groups of 128 input channels, AWQ-lite scales, fp16 activations",
    weight_bits=4, block_size=128, algorithm="awq_lite",
    make_config=_llm_int4({"method": "awq_lite", "alpha_step": 0.1}, 128)))
register(QuantRecipe(
    "w4a16-rtn", "llm", "INT4 weights in groups of 128, round-to-nearest (max calibration, no AWQ search)",
    weight_bits=4, block_size=128, algorithm="max", make_config=_llm_int4("max", 128)))
