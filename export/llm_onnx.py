"""LLM half of the CPU bundle: the Qwen2 decoder as ONNX and the token-embedding table.

``decoder.onnx`` takes ``inputs_embeds`` (the runtime splices vision embeddings in) plus a KV cache and
returns last-position logits and the new cache. The graph uses the same ONNX Runtime contrib ops and the
same input/output names as onnxruntime-genai's model builder for Qwen2 on CPU (SimplifiedLayerNormalization,
MatMulNBits, GroupQueryAttention with rotary inside, ``past_key_values.{i}.key`` / ``present.{i}.key``),
so it runs as fast as genai's own output. We emit the graph ourselves instead of calling the builder
because (a) the builder cannot carry ModelOpt AWQ weights (its own RTN uses other scales and it has no
pre-quant-scale), (b) it loads a second copy of the model, while here weights stream from the torch
model to the external-data file one tensor at a time, and (c) it needs a tokenizer and a full HF folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from nvila_edge.errors import ExportError
from nvila_edge.quant_format import (OTHER_QUANTIZERS, Int4Handler, enabled_quantizer, fake_quant_weight, pre_quant_scale,
                                     quantize_int8_rows, shared_pre_quant_scale)

PRECISIONS = ("fp32", "int4")
LM_HEAD_PRECISIONS = ("fp32", "int8", "int4")
EMBEDDING_DTYPES = ("float32", "float16", "int8")
DECODER_FILE = "decoder.onnx"
EMBEDDINGS_FILE = "embeddings.safetensors"
EXTERNAL_DATA_MIN_BYTES = 64 << 20  # smaller graphs keep weights inline: one file, faster to load
OPSET = 21


def llm_of(model):
    llm = getattr(model, "llm", model)
    if not hasattr(llm, "model") or not hasattr(llm.model, "layers"):
        raise ExportError(f"expected an NVILAModel or a Qwen2ForCausalLM, got {type(model).__name__}")
    return llm


# ---- quantization ----------------------------------------------------------------------------------------
def _check_quantizers(llm) -> None:
    """Only W4A16 blockwise weight quantizers map to MatMulNBits; say so for anything else ModelOpt enabled."""
    for name, mod in llm.named_modules():
        for qname in ("input_quantizer", *OTHER_QUANTIZERS):
            if enabled_quantizer(mod, qname) is not None:
                raise ExportError(f"{name}.{qname} is enabled: the CPU decoder supports weight-only INT4 (W4A16, "
                                  "e.g. mtq.INT4_AWQ_CFG) only; re-calibrate with a weight-only recipe")
        wq = enabled_quantizer(mod, "weight_quantizer")
        if wq is not None and (wq.num_bits != 4 or not (wq.block_sizes or {}).get(-1)):
            raise ExportError(f"{name}: weight quantizer is {wq.num_bits}-bit with block_sizes={wq.block_sizes}; "
                              "the CPU decoder needs INT4 blockwise along the input dim (INT4_AWQ_CFG)")


def _rtn(weight: torch.Tensor, bits: int, block: int):
    """Round-to-nearest blockwise, symmetric, with ONNX Runtime's own C++ quantizer (the builder's RTN)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = weight.shape
    nb = -(-k // block)
    wt = np.zeros((nb * block, n), np.float32)  # MatMul B layout (K, N), zero-padded to whole blocks
    wt[:k] = weight.detach().float().numpy().T
    packed = np.zeros((n, nb, block * bits // 8), np.uint8)
    scales = np.zeros((n, nb), np.float32)
    zp = np.zeros((n, -(-nb * bits // 8)), np.uint8)
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, wt, scales, zp, block, n, nb * block, True)
    return packed, scales


# ---- graph writer --------------------------------------------------------------------------------------
class _Graph:
    """Nodes + initializers; with ``data_path`` every weight goes straight to the external-data file."""

    def __init__(self, data_path: Path | None):
        from onnx import helper

        self.h = helper
        self.nodes, self.inits = [], []
        self.data_path = data_path
        self.f = open(data_path, "wb") if data_path else None

    def close(self):
        if self.f:
            self.f.close()

    def init(self, name: str, array) -> str:
        from onnx import TensorProto, numpy_helper

        if isinstance(array, torch.Tensor):
            array = array.detach().float().numpy()
        array = np.ascontiguousarray(array)
        if self.f is None or array.nbytes < 1024:
            self.inits.append(numpy_helper.from_array(array, name))
            return name
        pad = -self.f.tell() % 4096  # page-aligned offsets let ONNX Runtime map the weights
        self.f.write(b"\0" * pad)
        offset = self.f.tell()
        self.f.write(memoryview(array).cast("B"))
        t = TensorProto(name=name, dims=list(array.shape), data_type=self.h.np_dtype_to_tensor_dtype(array.dtype),
                        data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            t.external_data.add(key=key, value=value)
        self.inits.append(t)
        return name

    def node(self, op: str, inputs, name: str, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(self.h.make_node(op, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs

    def const_i64(self, name: str, values) -> str:
        return self.init(name, np.asarray(values, np.int64))


class _DecoderBuilder:
    def __init__(self, llm, g: _Graph, precision: str, block_size: int, accuracy_level: int, lm_head: str):
        self.llm, self.g, self.precision = llm, g, precision
        self.block, self.acc, self.lm_head = block_size, accuracy_level, lm_head
        c = llm.config
        self.hidden, self.heads, self.kv_heads = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or self.hidden // self.heads
        self.eps = float(c.rms_norm_eps)

    # one linear: MatMul (``bits`` None) or MatMulNBits; ``mods`` share the input and are fused along N
    def linear(self, x: str, mods, name: str, bits: int | None) -> str:
        g = self.g
        quantized = [enabled_quantizer(m, "weight_quantizer") is not None for m in mods]
        if any(quantized) and not all(quantized):
            raise ExportError(f"{name}: fused linears are partly quantized")
        pname = name[1:].replace("/", ".")
        if bits is None:  # calibrated layers keep their fake-quantized values, so fp32 matches torch too
            ws = [fake_quant_weight(m) if q else m.weight.detach().float() for m, q in zip(mods, quantized)]
            w = torch.cat(ws) if len(ws) > 1 else ws[0]
            out = g.node("MatMul", [x, g.init(f"{pname}.weight", w.numpy().T)], f"{name}/MatMul")[0]
            del ws, w
        else:
            bits = 4 if any(quantized) else bits
            parts = [Int4Handler(pname, m, self.block).matmulnbits() if q else _rtn(m.weight, bits, self.block)
                     for m, q in zip(mods, quantized)]
            codes = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
            scales = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
            del parts
            out = g.node("MatMulNBits", [x, g.init(f"{pname}.MatMul.weight_Q{bits}", codes),
                                         g.init(f"{pname}.MatMul.weight_scales", scales)],
                         f"{name}/MatMul_Q{bits}", domain="com.microsoft", K=int(mods[0].weight.shape[1]),
                         N=int(codes.shape[0]), bits=bits, block_size=self.block, accuracy_level=self.acc)[0]
        biases = [m.bias for m in mods]
        if any(b is not None and bool(torch.count_nonzero(b)) for b in biases):
            b = torch.cat([bb.detach().float() if bb is not None else torch.zeros(m.weight.shape[0])
                           for bb, m in zip(biases, mods)])
            out = g.node("Add", [out, g.init(f"{pname}.bias", b)], f"{name}/Add")[0]
        return out

    def scaled_input(self, x: str, lin, name: str) -> str:
        """ModelOpt's AWQ pre-quant scale that could not be folded into a norm: a Mul on the activation."""
        pqs = pre_quant_scale(lin)
        if pqs is None:
            return x
        return self.g.node("Mul", [x, self.g.init(name[1:].replace("/", ".") + ".pre_quant_scale", pqs)], name)[0]

    def norm(self, residual: str, skip: str | None, weight, name: str, fold=None):
        g, w = self.g, weight.detach().float()
        if fold is not None:
            w = w * fold  # AWQ scale shared by every consumer: exact to rounding, no extra op
        wname = g.init(name[1:].replace("/", ".") + ".weight", w)
        if skip is None:
            out = g.node("SimplifiedLayerNormalization", [residual, wname], f"{name}/LayerNorm", axis=-1,
                         epsilon=self.eps, stash_type=1)[0]
            return out, residual
        outs = g.node("SkipSimplifiedLayerNormalization", [residual, skip, wname], f"{name}/SkipLayerNorm", 4,
                      domain="com.microsoft", epsilon=self.eps)
        g.nodes[-1].output[1] = g.nodes[-1].output[2] = ""  # mean / inv-std are not needed
        return outs[0], outs[3]

    def build(self, max_length: int):
        g, llm, c = self.g, self.llm, self.llm.config
        # attention-mask → GQA's seqlens_k (valid length - 1) and total_sequence_length, as genai's builder
        one = g.const_i64("/model/constants/INT64/[1]", [1])
        rs = g.node("ReduceSum", ["attention_mask", one], "/model/attn_mask_reformat/ReduceSum", keepdims=0)[0]
        sub = g.node("Sub", [rs, g.const_i64("/model/constants/INT64/1", 1)], "/model/attn_mask_reformat/Sub")[0]
        seqlens_k = g.node("Cast", [sub], "/model/attn_mask_reformat/Sub/Cast", to=6)[0]
        shape = g.node("Shape", ["attention_mask"], "/model/attn_mask_reformat/Shape")[0]
        total = g.node("Gather", [shape, "/model/constants/INT64/1"], "/model/attn_mask_reformat/Gather", axis=0)[0]
        total = g.node("Cast", [total], "/model/attn_mask_reformat/Gather/Cast", to=6)[0]
        cos, sin = rope_cache(c, self.head_dim, max_length)
        g.init("cos_cache", cos)
        g.init("sin_cache", sin)

        B = None if self.precision == "fp32" else 4
        residual, skip = "inputs_embeds", None
        for i, layer in enumerate(llm.model.layers):
            p, at, mlp = f"/model/layers.{i}", layer.self_attn, layer.mlp
            qkv = [at.q_proj, at.k_proj, at.v_proj]
            fold = shared_pre_quant_scale(qkv)
            x, residual = self.norm(residual, skip, layer.input_layernorm.weight, f"{p}/input_layernorm", fold)
            if fold is not None or all(pre_quant_scale(m) is None for m in qkv):
                q, k, v = self.linear(x, qkv, f"{p}/attn/qkv_proj", B), "", ""
            else:  # different AWQ scales per projection: separate MatMulNBits, each on its scaled input
                q, k, v = (self.linear(self.scaled_input(x, m, f"{p}/attn/{n}/pre_quant_scale/Mul"), [m],
                                       f"{p}/attn/{n}", B) for m, n in zip(qkv, ("q_proj", "k_proj", "v_proj")))
            attn = g.node("GroupQueryAttention", [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                                  seqlens_k, total, "cos_cache", "sin_cache"],
                          f"{p}/attn/GroupQueryAttention", 3, domain="com.microsoft", num_heads=self.heads,
                          kv_num_heads=self.kv_heads, scale=1.0 / math.sqrt(self.head_dim), local_window_size=-1,
                          softcap=0.0, do_rotary=1, rotary_interleaved=0)
            g.nodes[-1].output[1:] = [f"present.{i}.key", f"present.{i}.value"]
            o = self.linear(self.scaled_input(attn[0], at.o_proj, f"{p}/attn/o_proj/pre_quant_scale/Mul"),
                            [at.o_proj], f"{p}/attn/o_proj", B)
            gu = [mlp.gate_proj, mlp.up_proj]
            fold = shared_pre_quant_scale(gu)
            x, residual = self.norm(residual, o, layer.post_attention_layernorm.weight,
                                    f"{p}/post_attention_layernorm", fold)
            gate, up = (self.linear(x if fold is not None else self.scaled_input(x, m, f"{p}/mlp/{n}/pre_quant_scale/Mul"),
                                    [m], f"{p}/mlp/{n}", B) for m, n in zip(gu, ("gate_proj", "up_proj")))
            sig = g.node("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")[0]
            act = g.node("Mul", [gate, sig], f"{p}/mlp/act_fn/Mul")[0]
            h = g.node("Mul", [act, up], f"{p}/mlp/Mul")[0]
            skip = self.linear(self.scaled_input(h, mlp.down_proj, f"{p}/mlp/down_proj/pre_quant_scale/Mul"),
                               [mlp.down_proj], f"{p}/mlp/down_proj", B)
        n = len(llm.model.layers)
        wname = g.init(f"model.layers.{n}.final_norm_layernorm.weight", llm.model.norm.weight)
        x = g.node("SkipSimplifiedLayerNormalization", [residual, skip, wname],
                   f"/model/layers.{n}/final_norm_layernorm/SkipLayerNorm", domain="com.microsoft", epsilon=self.eps)[0]
        # only the last position reaches the LM head (the builder's prune_lm_head): prefill cost and output
        # size stop growing with the prompt's vocab-sized logits
        big = np.iinfo(np.int64).max
        x = g.node("Slice", [x, g.const_i64("/lm_head/starts", [-1]), g.const_i64("/lm_head/ends", [big]),
                             g.const_i64("/lm_head/axes", [1])], "/lm_head/Slice")[0]
        bits = None if self.lm_head == "fp32" else {"int8": 8, "int4": 4}[self.lm_head]
        logits = self.linear(x, [llm.lm_head], "/lm_head", bits)
        for nd in g.nodes:  # the graph output is called "logits"
            nd.output[:] = ["logits" if s == logits else s for s in nd.output]


def rope_cache(c, head_dim: int, max_length: int):
    """cos/sin tables (max_length, head_dim/2), computed like transformers' default RoPE in float32."""
    rope = c.rope_parameters if isinstance(getattr(c, "rope_parameters", None), dict) else {}
    rope = rope or (getattr(c, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ExportError(f"RoPE type {kind!r} is not supported by the CPU decoder export (default RoPE only)")
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return freqs.cos().numpy(), freqs.sin().numpy()


# ---- public API --------------------------------------------------------------------------------------------
def export_decoder(model, out_dir: str | os.PathLike, *, precision: str = "int4", block_size: int = 128,
                   accuracy_level: int = 4, lm_head: str | None = None, max_length: int | None = None) -> dict:
    """Write ``out_dir/decoder.onnx`` (+ ``decoder.onnx.data`` when large); return the graph's io contract.

    ``precision``: "fp32" or "int4" (W4A16 MatMulNBits, symmetric, ``block_size`` along the input dim).
    Layers calibrated with ModelOpt (INT4 weight quantizers, AWQ pre-quant scales) keep their calibrated
    codes and scales; other layers are quantized round-to-nearest. ``lm_head``: "int8" (default for int4:
    near-exact logits at a quarter of fp32's bytes), "int4" (fastest) or "fp32". ``accuracy_level`` is
    MatMulNBits' compute type (4 = int8 activations, the fast CPU path; 1 = fp32). ``max_length`` bounds the
    positions (RoPE table) and is the KV-buffer size the runtime should allocate at most."""
    from onnx import TensorProto, helper, save_model

    if precision not in PRECISIONS:
        raise ExportError(f"unsupported decoder precision {precision!r}; supported: {', '.join(PRECISIONS)}")
    lm_head = lm_head or ("fp32" if precision == "fp32" else "int8")
    if lm_head not in LM_HEAD_PRECISIONS:
        raise ExportError(f"unsupported lm_head precision {lm_head!r}; supported: {', '.join(LM_HEAD_PRECISIONS)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"block_size must be a power of two >= 16 (MatMulNBits), got {block_size}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ExportError(f"accuracy_level must be 0-4, got {accuracy_level}")
    llm = llm_of(model)
    _check_quantizers(llm)
    c = llm.config
    if getattr(c, "use_sliding_window", False) or getattr(c, "hidden_act", "silu") != "silu":
        raise ExportError("the CPU decoder export supports Qwen2 with full attention and SiLU only")
    nv = getattr(model, "config", None)
    limit = min(int(c.max_position_embeddings), int(getattr(getattr(nv, "llm", None), "context_length", 1 << 62)))
    max_length = int(max_length or limit)
    if not 0 < max_length <= limit:
        raise ExportError(f"max_length must be in 1..{limit}, got {max_length}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path, data_path = out_dir / DECODER_FILE, out_dir / (DECODER_FILE + ".data")
    body = sum(m.weight.numel() for layer in llm.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    head = llm.lm_head.weight.numel()
    est = body * (4 if precision == "fp32" else 0.53) + head * {"fp32": 4, "int8": 1.03, "int4": 0.53}[lm_head]
    external = est >= EXTERNAL_DATA_MIN_BYTES
    for stale in (path, data_path):
        stale.unlink(missing_ok=True)

    g = _Graph(data_path if external else None)
    builder = _DecoderBuilder(llm, g, precision, block_size, accuracy_level, lm_head)
    try:
        with torch.no_grad():
            builder.build(max_length)
    finally:
        g.close()
    L, K, D, V = len(llm.model.layers), builder.kv_heads, builder.head_dim, int(llm.lm_head.weight.shape[0])
    f32 = TensorProto.FLOAT
    kv_in = ["batch_size", K, "past_sequence_length", D]
    kv_out = ["batch_size", K, "total_sequence_length", D]
    inputs = [helper.make_tensor_value_info("inputs_embeds", f32, ["batch_size", "sequence_length", builder.hidden]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", 1, V])]
    for i in range(L):
        inputs += [helper.make_tensor_value_info(f"past_key_values.{i}.{s}", f32, kv_in) for s in ("key", "value")]
        outputs += [helper.make_tensor_value_info(f"present.{i}.{s}", f32, kv_out) for s in ("key", "value")]
    graph = helper.make_graph(g.nodes, "nvila_edge_qwen2_decoder", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10, producer_name="nvila-edge")
    save_model(proto, str(path))
    awq = any(pre_quant_scale(m) is not None for m in llm.modules())
    calibrated = any(enabled_quantizer(m, "weight_quantizer") is not None for m in llm.modules())
    return {
        "file": DECODER_FILE, "external_data": data_path.name if external else None,
        "inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask", "position_ids": None,
        "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
        "present_key": "present.{i}.key", "present_value": "present.{i}.value",
        "logits": "logits", "logits_positions": "last",
        "num_layers": L, "num_heads": builder.heads, "num_kv_heads": K, "head_dim": D,
        "hidden_size": builder.hidden, "vocab_size": V,
        "kv_dtype": "float32", "past_present_share_buffer": True, "max_length": max_length,
        "precision": precision, "block_size": block_size if precision == "int4" else None,
        "accuracy_level": accuracy_level if precision == "int4" else None, "lm_head": lm_head,
        "weights": "modelopt" if calibrated else ("rtn" if precision == "int4" else "fp32"), "awq": awq,
    }


def export_embeddings(model, out_dir: str | os.PathLike, *, dtype: str = "float16") -> dict:
    """Write the token-embedding table to ``out_dir/embeddings.safetensors`` ("weight", plus per-row
    "scales" for int8) for the torch-free lookup in ``nvila_edge.embeddings``."""
    from safetensors.numpy import save_file

    if dtype not in EMBEDDING_DTYPES:
        raise ExportError(f"unsupported embedding dtype {dtype!r}; supported: {', '.join(EMBEDDING_DTYPES)}")
    llm = llm_of(model)
    w = llm.get_input_embeddings().weight.detach()
    tensors = {}
    if dtype == "int8":  # symmetric per row, in chunks (the cuda target's token table is the same numbers)
        q, scales = quantize_int8_rows(w)
        tensors = {"weight": q.numpy(), "scales": scales.numpy()}
    else:
        tensors = {"weight": w.to(torch.float16 if dtype == "float16" else torch.float32).numpy()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nv = getattr(model, "config", None)
    end_ids = [int(t) for t in getattr(nv, "end_token_ids", ())]
    save_file(tensors, str(out_dir / EMBEDDINGS_FILE), metadata={"dtype": dtype, "end_token_ids": ",".join(map(str, end_ids))})
    return {"file": EMBEDDINGS_FILE, "dtype": dtype, "vocab_size": int(w.shape[0]), "hidden_size": int(w.shape[1]),
            "end_token_ids": end_ids}
