"""Export: calibrated directory → deployment bundle (vision ONNX with INT8 Q/DQ, Qwen2 int4 decoder ONNX,
TensorRT / TensorRT-LLM for GPUs, a plain checkpoint for torch).

    from nvila_edge.export import export_bundle
    export_bundle("calibrated/", "bundle/", target="cpu")

Attributes load lazily so ``nvila-edge --help`` does not import torch.
"""

from __future__ import annotations

from nvila_edge.lazy import lazy_attributes

_LAZY = {
    "export_bundle": "writer", "ExportResult": "writer",
    "TARGETS": "targets", "ExportTarget": "targets", "get_target": "targets", "register": "targets",
    "baked_state_dict": "targets",
    "export_vision": "vision_onnx", "export_projector": "vision_onnx", "qdq_summary": "vision_onnx",
    "fold_weight_quantizers": "vision_onnx", "fold_weight_transposes": "vision_onnx",
    "export_decoder": "llm_onnx", "export_embeddings": "llm_onnx",
    "export_trtllm_checkpoint": "trtllm", "check_trtllm_checkpoint": "trtllm", "build_trtllm_engine": "trtllm",
    "build_vision_engine": "tensorrt",
}


__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
