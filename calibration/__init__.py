"""Calibration: NVIDIA ModelOpt W8A8 SmoothQuant for the SigLIP tower, W4A16 AWQ for the Qwen2 LLM.

    from nvila_edge.calibration import calibrate, load_calibrated
    result = calibrate("ckpt/", "calibrated/", vision="w8a8-smoothquant", llm="w4a16-awq", data="data/train.jsonl")
    print(result.fidelity.table())

Attributes load lazily so ``nvila-edge --help`` does not import torch / ModelOpt.
"""

from __future__ import annotations

from nvila_edge.lazy import lazy_attributes

_LAZY = {
    **{n: "calibrator" for n in ("calibrate", "load_calibrated", "save_calibrated", "quantize_model", "quantizer_summary",
                                "read_recipes", "is_calibrated", "CalibrationResult")},
    "FidelityReport": "fidelity",
    "load_calibration_data": "data",
    **{n: "recipes" for n in ("QuantRecipe", "RECIPES", "get_recipe", "list_recipes", "register")},
}


__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
