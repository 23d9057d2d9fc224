"""Export targets as a registry: name → which recipes it can run + the function that writes its files.

- ``cpu``: vision ONNX (INT8 Q/DQ with int8 weight initializers, or fp32), projector ONNX, a Qwen2
  decoder ONNX (``MatMulNBits`` int4 from the AWQ calibration, or fp32) and an fp16 embedding table.
- ``tensorrt``: the same vision ONNX built into a TensorRT engine (INT8 + FP16, profiles 1…max tiles)
  and a TensorRT-LLM W4A16 checkpoint + engine. Checkpoint files are produced anywhere; the engines need
  the ``[gpu]`` extra on the target machine (``engines="auto"`` skips them, recorded in the manifest).
- ``cuda``: the real low-bit tensors (packed int4 AWQ codes + scales for the LLM linears, int8 SmoothQuant
  weights + static activation scales for the vision linears, int8 token table) for the torch backend's
  kernels (tinygemm int4, ``torch._int_mm``) on CUDA — and on CPU with their CPU variants (``export/cuda.py``).
- ``gguf``: the calibrated Qwen2 as a GGUF for llama.cpp (the AWQ codes as Q4_0 blocks, ``export/gguf.py``); the
  vision and projector graphs and the token table are the cpu target's (``--target cpu,gguf``), run by
  ``Runtime.load(bundle, llm_engine="llamacpp")``.
- ``torch``: a plain VILA checkpoint whose weights carry the quantization (fake-quantized, pre-quant
  scales folded) for the torch backend on CUDA fp16 or CPU.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Callable

import torch

from nvila_edge.errors import BackendUnavailable, ExportError
from nvila_edge.quant_format import enabled_quantizer, pre_quant_scale


@dataclass(frozen=True)
class ExportTarget:
    name: str
    vision_recipes: tuple[str, ...]
    llm_recipes: tuple[str, ...]
    build: Callable  # (model, writer, recipes, options) -> None; calls writer.add_target
    description: str = ""

    def check(self, recipes: dict) -> None:
        for part, allowed in (("vision", self.vision_recipes), ("llm", self.llm_recipes)):
            name = recipes[part].name
            if name not in allowed:
                raise ExportError(f"target '{self.name}' cannot run the {part} recipe '{name}' "
                                  f"(it runs: {', '.join(allowed)}); re-calibrate with one of those")


TARGETS: dict[str, ExportTarget] = {}


def register(target: ExportTarget) -> ExportTarget:
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> ExportTarget:
    if name not in TARGETS:
        raise ExportError(f"unknown export target {name!r}; known: {', '.join(TARGETS)}, all")
    return TARGETS[name]


def _limits(model, decoder_io: dict | None = None) -> dict:
    c = model.config
    return {"max_tiles": c.preprocessing.max_tiles, "max_frames": c.video.num_frames,
            "context_length": (decoder_io or {}).get("max_length", c.llm.context_length)}


def _build_cpu(model, writer, recipes, options) -> None:
    from .llm_onnx import export_decoder, export_embeddings
    from .vision_onnx import export_projector, export_vision

    root = writer.path_for("cpu/x").parent
    vision = export_vision(model, root)
    projector = export_projector(model, root)
    llm_quant = recipes["llm"].quantized
    decoder = export_decoder(model, root, precision="int4" if llm_quant else "fp32",
                             block_size=recipes["llm"].block_size or 128)
    embeddings = export_embeddings(model, root, dtype=options.get("embeddings_dtype", "float16"))
    files = {"vision": "cpu/vision.onnx", "projector": "cpu/projector.onnx", "decoder": "cpu/decoder.onnx",
             "embeddings": "cpu/embeddings.safetensors"}
    precision = {"vision": "int8-qdq" if vision["int8_weights"] else "fp32",
                 "projector": "int8-qdq" if projector["int8_weights"] else "fp32",
                 "llm": decoder["precision"], "embeddings": embeddings["dtype"]}
    writer.add_target("cpu", files=files, precision=precision, limits=_limits(model, decoder),
                      io={"vision": vision["io"], "projector": projector["io"], "decoder": decoder,
                          "embeddings": embeddings},
                      graphs={"vision": {k: v for k, v in vision.items() if k != "io"},
                              "projector": {k: v for k, v in projector.items() if k != "io"}})


def _build_tensorrt(model, writer, recipes, options) -> None:
    from .tensorrt import build_vision_engine
    from .trtllm import build_trtllm_engine, export_trtllm_checkpoint
    from .vision_onnx import export_vision

    root = writer.path_for("tensorrt/x").parent
    # the engine is built from the same Q/DQ graph as the cpu target: reuse it when that target is in the bundle
    vision_rel = writer.targets.get("cpu", {}).get("files", {}).get("vision")
    if vision_rel is None:
        export_vision(model, root)
        vision_rel = "tensorrt/vision.onnx"
    ckpt = export_trtllm_checkpoint(model, root / "trtllm_checkpoint")
    files = {"vision_onnx": vision_rel, "trtllm_checkpoint": "tensorrt/trtllm_checkpoint"}
    limits = _limits(model)
    engines: dict = {}
    mode = options.get("engines", "auto")
    try:
        if mode == "skip":
            raise BackendUnavailable("tensorrt", "gpu", "building TensorRT engines (skipped: engines='skip')")
        engines["vision"] = build_vision_engine(writer.root / vision_rel, root / "vision.plan", max_tiles=limits["max_tiles"],
                                                image_size=model.config.vision.image_size,
                                                int8=recipes["vision"].quantized)
        files["vision_engine"] = "tensorrt/vision.plan"
        engines["llm"] = build_trtllm_engine(root / "trtllm_checkpoint", root / "trtllm_engine",
                                             max_input_len=limits["context_length"], max_seq_len=limits["context_length"])
        files["llm_engine"] = "tensorrt/trtllm_engine"
    except BackendUnavailable as e:
        if mode == "build":
            raise
        shutil.rmtree(root / "trtllm_engine", ignore_errors=True)
        (root / "vision.plan").unlink(missing_ok=True)
        files.pop("vision_engine", None)
        engines = {"built": False, "reason": str(e),
                   "how": "run `nvila-edge export CALIBRATED -o BUNDLE --target tensorrt --engines build` on the GPU machine"}
    writer.add_target("tensorrt", files=files, limits=limits, engines=engines, trtllm=ckpt,
                      precision={"vision": "int8+fp16" if recipes["vision"].quantized else "fp16",
                                 "llm": ckpt["quant_algo"] or "fp16"})


def baked_state_dict(model) -> dict[str, torch.Tensor]:
    """Plain weights that carry the calibration: fake-quantized weights with pre-quant scales folded
    (exact for weight-only INT4; W8A8 loses only its activation rounding)."""
    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            wq = enabled_quantizer(module, "weight_quantizer")
            w = wq(module.weight) if wq is not None else module.weight
            pqs = pre_quant_scale(module)
            if pqs is not None:
                w = w * pqs.to(w.dtype)[None, :]
            out[f"{name}.weight"] = w.detach()
        for k, v in model.state_dict().items():
            if "_quantizer." not in k and k not in out:
                out[k] = v
    return out


def _build_torch(model, writer, recipes, options) -> None:
    from nvila_edge import NVILAModel
    from nvila_edge.checkpoint import materialize_buffers

    with torch.device("meta"):
        plain = NVILAModel(model.config)
    state = baked_state_dict(model)
    plain.load_state_dict(state, strict=False, assign=True)
    if model.config.llm.tie_word_embeddings:
        plain.llm.lm_head.weight = plain.llm.model.embed_tokens.weight
    materialize_buffers(plain, "cpu")
    plain.save_pretrained(writer.path_for("torch/checkpoint/x").parent, tokenizer=model.tokenizer)
    writer.add_target("torch", files={"checkpoint": "torch/checkpoint"}, limits=_limits(model),
                      precision={"vision": recipes["vision"].name, "llm": recipes["llm"].name,
                                 "weights": "fake-quantized fp32 (quantization baked in)"})


def _build_gguf(model, writer, recipes, options) -> None:
    from .gguf import export_gguf

    cpu = writer.targets.get("cpu")
    if cpu is None:
        raise ExportError("the gguf target uses the cpu target's vision, projector and token table: "
                          "export both (`--target cpu,gguf`)")
    root = writer.path_for("gguf/x").parent
    limits = dict(cpu["limits"])
    info = export_gguf(model, root, block_size=recipes["llm"].block_size or 128, lm_head=options.get("lm_head") or "int8",
                       context_length=limits["context_length"])
    files = {"llm": "gguf/llm.gguf", **{k: cpu["files"][k] for k in ("vision", "projector", "embeddings")}}
    writer.add_target("gguf", files=files, limits=limits, io={"llm": info, "embeddings": cpu["io"]["embeddings"]},
                      precision={"vision": cpu["precision"]["vision"], "projector": cpu["precision"]["projector"],
                                 "llm": "q4_0" if recipes["llm"].quantized else "f16", "lm_head": info["types"]["output.weight"],
                                 "embeddings": cpu["precision"]["embeddings"]})


def _build_cuda(model, writer, recipes, options) -> None:
    from .cuda import build_cuda

    build_cuda(model, writer, recipes, _limits(model))


_ALL_VISION = ("fp16", "w8a8-smoothquant", "w8a8-smoothquant-proj")
_ALL_LLM = ("fp16", "w4a16-awq", "w4a16-rtn")
register(ExportTarget("cpu", _ALL_VISION, _ALL_LLM, _build_cpu, "ONNX Runtime on CPU (or its CUDA provider)"))

register(ExportTarget("cuda", _ALL_VISION, _ALL_LLM, _build_cuda,
                      "int4 / int8 tensors for the torch backend's low-bit kernels (CUDA, or CPU)"))
register(ExportTarget("gguf", _ALL_VISION, _ALL_LLM, _build_gguf,
                      "the LLM as a GGUF for llama.cpp (AWQ codes as Q4_0), beside the cpu target's vision graphs"))
register(ExportTarget("torch", _ALL_VISION, _ALL_LLM, _build_torch, "plain checkpoint for the torch backend"))
register(ExportTarget("tensorrt", _ALL_VISION, _ALL_LLM, _build_tensorrt,
                      "TensorRT vision engine + TensorRT-LLM W4A16 (engines need the [gpu] extra)"))
