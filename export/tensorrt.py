"""TensorRT engine for the vision ONNX (explicit INT8 from the Q/DQ nodes + FP16 elsewhere).

UNTESTED: TensorRT cannot be installed on the machines this project is built on (no wheel for them, and
the lent GPU machine has none either). The code follows the TensorRT 10 Python API; ``tensorrt`` is imported
here only, and a missing one raises ``BackendUnavailable`` naming the ``[gpu]`` extra.
"""

from __future__ import annotations

import os
from pathlib import Path

from nvila_edge.errors import ExportError
from nvila_edge.optional import require


def _tensorrt():
    return require("tensorrt", "gpu", "building TensorRT engines")


def build_vision_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, max_tiles: int,
                        image_size: int, input_name: str = "pixel_values", int8: bool = True,
                        workspace_gb: float = 4.0) -> dict:
    """Build a serialized engine with one optimization profile for 1…``max_tiles`` tiles (or frames)."""
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.set_flag(trt.BuilderFlag.FP16)
    if int8:  # explicit quantization: the scales come from the Q/DQ nodes, no calibrator
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    shape = (3, image_size, image_size)
    opt = max(1, min(max_tiles, 4))
    profile.set_shape(input_name, (1, *shape), (opt, *shape), (max_tiles, *shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path}")
    Path(engine_path).write_bytes(bytes(engine))
    return {"file": Path(engine_path).name, "precision": "int8+fp16" if int8 else "fp16",
            "profile": {"min": 1, "opt": opt, "max": max_tiles}, "tensorrt": trt.__version__}
