"""Vision half of the bundle in ONNX: SigLIP (only the layers NVILA uses) and the MLP projector.

A ModelOpt-calibrated tower exports with Q/DQ nodes (TorchScript exporter + ModelOpt's symbolic
functions). ``fold_weight_quantizers`` then turns each ``QuantizeLinear(fp32 weight)`` into an INT8
initializer feeding its ``DequantizeLinear`` (the file is ~4× smaller), and ``fold_weight_transposes`` stores
each INT8 weight already transposed for its MatMul (``W → DQ → Transpose → MatMul`` becomes ``Wᵀ → DQ → MatMul``),
so ONNX Runtime has nothing to fold at load: left to it, the transposes cost 4.0 GB of RSS (3.2 GB of it
never returned) and 17 s of start-up on SigLIP-400M, against 0.8 GB and 0.9 s (AMD EPYC 2-core, 2026-12-07).

The Dynamic-S2 merge and the projector's token order depend on each image's tiling plan, so they stay
outside the graph (numpy, ``nvila_edge.visual``); the graphs take a dynamic number of tiles / frames.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17
VISION_IO = {"input": "pixel_values", "output": "features"}
PROJECTOR_IO = {"input": "features", "output": "embeds"}
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GB


class VisionEncoder(nn.Module):
    """pixel_values (N, 3, S, S) → SigLIP ``hidden_states[select_layer]`` (N, grid², C)."""

    def __init__(self, model):
        super().__init__()
        self.embeddings = model.vision_tower.embeddings
        layers = model.vision_tower.encoder.layers
        keep = model.config.vision.select_layer % (len(layers) + 1)
        self.layers = nn.ModuleList(layers[:keep])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(pixel_values)
        for layer in self.layers:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
        return h


def _onnx_export(module: nn.Module, example: torch.Tensor, path: Path, names: dict, axis_name: str) -> None:
    module.eval()
    with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from ModelOpt's quantizers: expected, not actionable
        # the TorchScript exporter is the one ModelOpt's Q/DQ symbolic functions plug into
        torch.onnx.export(module, (example,), str(path), input_names=[names["input"]], output_names=[names["output"]],
                          dynamic_axes={names["input"]: {0: axis_name}, names["output"]: {0: axis_name}},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _const_value(inits: dict, name: str, producers: dict) -> np.ndarray | None:
    from onnx import numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
    return None


def _quantize_like_onnx(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    """QuantizeLinear semantics: round half to even, add the zero point, saturate to int8."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * w.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    q = np.rint(w.astype(np.float32) / scale) + zero.astype(np.float32)
    return np.clip(q, -128, 127).astype(np.int8)


def fold_weight_quantizers(model) -> int:
    """Replace ``QuantizeLinear(constant fp32)`` by an INT8 initializer; return how many were folded."""
    from onnx import numpy_helper

    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    drop, folded = [], 0
    for node in g.node:
        if node.op_type != "QuantizeLinear":
            continue
        w = _const_value(inits, node.input[0], producers)
        if w is None or w.dtype != np.float32:
            continue  # an activation quantizer
        scale = _const_value(inits, node.input[1], producers)
        zero = _const_value(inits, node.input[2], producers) if len(node.input) > 2 else np.zeros((), np.int8)
        if scale is None or zero is None or zero.dtype != np.int8:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        q = _quantize_like_onnx(w, scale, zero, axis if axis >= 0 else axis + w.ndim)
        g.initializer.append(numpy_helper.from_array(q, node.output[0]))
        drop.append(node)
        folded += 1
    for node in drop:
        g.node.remove(node)
    # fp32 weights only the folded quantizers read are dead now
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return folded


def fold_weight_transposes(model) -> int:
    """``INT8 W → DequantizeLinear(axis a) → Transpose(1, 0)`` → ``INT8 Wᵀ → DequantizeLinear(axis 1 - a)``;
    return how many were folded. Exact (a permutation); only weights read by that one chain are touched."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer if i.data_type == 3}  # INT8
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in g.output}
    drop = []
    for dq in g.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or len(consumers[dq.input[0]]) != 1:
            continue
        users = consumers.get(dq.output[0], [])
        if len(users) != 1 or users[0].op_type != "Transpose" or users[0].output[0] in outputs:
            continue
        tr = users[0]
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), [1, 0])
        w = numpy_helper.to_array(inits[dq.input[0]])
        if w.ndim != 2 or perm != [1, 0]:
            continue
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), dq.input[0]))
        axis = next((a for a in dq.attribute if a.name == "axis"), None)
        if axis is not None:  # per-channel scales follow their axis; a per-tensor scale needs nothing
            axis.i = 1 - (axis.i % 2)
        for node in consumers.get(tr.output[0], []):
            node.input[:] = [dq.output[0] if x == tr.output[0] else x for x in node.input]
        drop.append(tr)
    for node in drop:
        g.node.remove(node)
    return len(drop)


def _save(model, path: Path) -> None:
    import onnx

    large = model.ByteSize() > _EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data" if large else None)


def qdq_summary(path: str | os.PathLike) -> dict:
    """Per MatMul / Gemm: does it read an INT8 weight through DequantizeLinear, and is its activation Q/DQ'd?"""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    producers = {o: n for n in g.node for o in n.output}
    int8_inits = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.INT8}

    def through(name, ops=("Transpose", "Identity", "Reshape")):
        n = producers.get(name)
        while n is not None and n.op_type in ops:
            n = producers.get(n.input[0])
        return n

    matmuls = [n for n in g.node if n.op_type in ("MatMul", "Gemm")]
    int8_weight = act_qdq = 0
    for n in matmuls:
        srcs = [through(i) for i in n.input[:2]]
        if any(s is not None and s.op_type == "DequantizeLinear" and s.input[0] in int8_inits for s in srcs):
            int8_weight += 1
        if any(s is not None and s.op_type == "DequantizeLinear" and producers.get(s.input[0]) is not None
               and producers[s.input[0]].op_type == "QuantizeLinear" for s in srcs):
            act_qdq += 1
    ops = Counter(n.op_type for n in g.node)
    return {"matmuls": len(matmuls), "int8_weight_matmuls": int8_weight, "qdq_activation_matmuls": act_qdq,
            "quantize_linear": ops["QuantizeLinear"], "dequantize_linear": ops["DequantizeLinear"],
            "int8_initializers": len(int8_inits)}


def export_vision(model, out_dir: str | os.PathLike, *, name: str = "vision.onnx", example_tiles: int = 2) -> dict:
    """Export the SigLIP tower; Q/DQ with INT8 weight initializers when the model was calibrated."""
    import onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    size = model.config.vision.image_size
    example = torch.zeros(example_tiles, 3, size, size, dtype=model.dtype, device=model.device)
    _onnx_export(VisionEncoder(model), example, path, VISION_IO, "tiles")
    graph = onnx.load(str(path))
    folded = fold_weight_quantizers(graph)
    transposed = fold_weight_transposes(graph)
    _save(graph, path)
    return {"file": name, "io": dict(VISION_IO), "int8_weights": folded, "transposes_folded": transposed,
            "opset": OPSET, **qdq_summary(path)}


def export_projector(model, out_dir: str | os.PathLike, *, name: str = "projector.onnx") -> dict:
    """Export the MLP projector: features (B, grid², scales·C) → embeddings (B, t², H)."""
    import onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    cfg = model.config
    example = torch.zeros(2, cfg.vision.grid ** 2, cfg.mm_hidden_size, dtype=model.dtype, device=model.device)
    _onnx_export(model.mm_projector, example, path, PROJECTOR_IO, "blocks")
    graph = onnx.load(str(path))
    folded = fold_weight_quantizers(graph)
    transposed = fold_weight_transposes(graph)
    _save(graph, path)
    return {"file": name, "io": dict(PROJECTOR_IO), "int8_weights": folded, "transposes_folded": transposed,
            "opset": OPSET, **qdq_summary(path)}
