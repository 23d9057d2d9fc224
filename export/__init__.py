"""Export: calibrated directory → deployment bundle (vision ONNX with INT8 Q/DQ, Qwen2 int4 decoder ONNX,
TensorRT / TensorRT-LLM for GPUs, a plain checkpoint for torch).

    from nvila_edge.export import export_bundle
    export_bundle("calibrated/", "bundle/", target="cpu")

Attributes load lazily so ``nvila-edge --help`` does not import torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "export_bundle": "writer", "ExportResult": "writer",
    "TARGETS": "targets", "ExportTarget": "targets", "get_target": "targets", "register": "targets",
    "baked_state_dict": "targets",
    "export_vision": "vision_onnx", "export_projector": "vision_onnx", "qdq_summary": "vision_onnx",
    "fold_weight_quantizers": "vision_onnx",
    "export_decoder": "llm_onnx", "export_embeddings": "llm_onnx",
    "export_trtllm_checkpoint": "trtllm", "check_trtllm_checkpoint": "trtllm", "build_trtllm_engine": "trtllm",
    "build_vision_engine": "tensorrt",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
