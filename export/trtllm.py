"""TensorRT-LLM checkpoint (and engine) for the W4A16 Qwen2.

The checkpoint is written with ModelOpt's ``export_tensorrt_llm_checkpoint`` — pure torch, so it is
produced and checked on CPU. Building the engine needs ``tensorrt_llm`` (``[gpu]`` extra) and a GPU;
that part is UNTESTED here (not installable on this project's machines).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

from nvila_edge.errors import ExportError
from nvila_edge.optional import require

REQUIRED_CONFIG_KEYS = ("architecture", "dtype", "num_hidden_layers", "hidden_size", "vocab_size", "quantization")


def export_trtllm_checkpoint(model, out_dir: str | os.PathLike, *, dtype: str = "float16") -> dict:
    """Write ``config.json`` + ``rank0.safetensors`` (INT4 AWQ weights + pre-quant scales when calibrated)."""
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # ModelOpt prints rank information
        export_tensorrt_llm_checkpoint(model.llm, "qwen", dtype=getattr(torch, dtype), export_dir=out_dir,
                                       inference_tensor_parallel=1)
    return check_trtllm_checkpoint(out_dir)


def check_trtllm_checkpoint(folder: str | os.PathLike) -> dict:
    """Well-formedness: the config has the fields TensorRT-LLM reads and every rank file is readable."""
    from safetensors import safe_open

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{folder} has no config.json: not a TensorRT-LLM checkpoint")
    cfg = json.loads(cfg_path.read_text())
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in cfg]
    if missing:
        raise ExportError(f"{cfg_path} lacks {missing}")
    ranks = sorted(folder.glob("rank*.safetensors"))
    if len(ranks) != cfg.get("mapping", {}).get("world_size", 1):
        raise ExportError(f"{folder}: {len(ranks)} rank files for world size {cfg.get('mapping', {}).get('world_size')}")
    keys = 0
    for r in ranks:
        with safe_open(str(r), "np") as f:
            keys += len(list(f.keys()))
    q = cfg.get("quantization") or {}
    return {"dir": folder.name, "architecture": cfg["architecture"], "dtype": cfg["dtype"],
            "quant_algo": q.get("quant_algo"), "group_size": q.get("group_size"), "tensors": keys}


def build_trtllm_engine(checkpoint_dir: str | os.PathLike, engine_dir: str | os.PathLike, *, max_input_len: int,
                        max_seq_len: int, max_batch_size: int = 1) -> dict:
    """Build the engine with the TensorRT-LLM Python API (the same as ``trtllm-build``). Prompt-table
    (visual embeddings) input is enabled so the runtime can feed image features."""
    purpose = "building TensorRT-LLM engines"
    builder = require("tensorrt_llm.builder", "gpu", purpose)
    BuildConfig, build = builder.BuildConfig, builder.build
    QWenForCausalLM = require("tensorrt_llm.models", "gpu", purpose).QWenForCausalLM
    model = QWenForCausalLM.from_checkpoint(str(checkpoint_dir))
    config = BuildConfig(max_input_len=max_input_len, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                         max_prompt_embedding_table_size=max_input_len)
    engine = build(model, config)
    engine.save(str(engine_dir))
    return {"dir": Path(engine_dir).name, "max_input_len": max_input_len, "max_seq_len": max_seq_len}
