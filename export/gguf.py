"""The ``gguf`` target: the calibrated Qwen2 as a GGUF that llama.cpp's stock ``qwen2`` graph loads.

The runtime feeds it our own embeddings (``llama_batch.embd``: vision features through the cpu target's projector,
text through the cpu target's table), so the vision and projector graphs are the cpu target's and this target adds
one file, ``gguf/llm.gguf``. What it holds:

- every AWQ int4 linear **exactly**: the codes are symmetric (scale = amax / 7, stored as code + 8), so each
  128-group is four Q4_0 blocks of 32 sharing ``d = fp16(scale)``. Q4_0 keeps element j of a block in the low nibble
  and j + 16 in the high one (MatMulNBits keeps even / odd: reordered here). Q4_0 is what llama.cpp repacks to its
  8×8 AVX2 / AVX-512 layout on load (Q4_1 / Q8_0 are not repacked on x86).
- AWQ pre-quant scales folded where it is exact: q/k/v's and gate/up's into their RMSNorm weights when the group
  shares one scale, down_proj's into up_proj's rows (a row's Q4_0 ``d`` times its scale: codes unchanged). What
  cannot be folded — o_proj's under GQA (the q-heads sharing a v-head carry different scales), and q/k/v or gate/up
  when ModelOpt's awq_lite gave each projection its own scale (it does: every layer of the demo) — is written as
  its dequantized weight times the scale, re-quantized (``UNFOLDABLE``): Q8_0 (default, near-exact, +0.5 byte a
  weight) or Q4_0 round-to-nearest per block of 32 (the bytes of the exact path; logits cosine 0.98 on the demo
  config). The manifest counts each. All-exact Q4_0 needs a calibration whose q/k/v and gate/up share one scale
  and whose o_proj is unscaled (not built yet).
- the LM head as Q8_0 (``lm_head="int8"``: its per-row int8 codes, ``d = fp16(row scale)``) or Q4_0
  (``lm_head="int4"``: round-to-nearest amax/7 per block of 32, fewer bytes a token);
- the token table as Q8_0 (per-row int8 codes): llama.cpp's loader requires ``token_embd``, the runtime never
  reads it (it feeds embeddings), so it costs disk (1.06 B a weight against f16's 2), no resident memory (mmap).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from nvila_edge.errors import ExportError
from nvila_edge.quant_format import (INT4_MAX, INT8_MAX, Int4Handler, enabled_quantizer, pre_quant_scale,
                                     quantize_int8_rows, shared_pre_quant_scale, symmetric_scale)

from .llm_onnx import llm_of, rope_cache

GGUF_FILE = "llm.gguf"
QK = 32  # elements a Q4_0 / Q8_0 block holds
LM_HEADS = ("int8", "int4")
# how a linear whose AWQ input scale cannot be folded exactly is written: its dequantized weight times the scale,
# re-quantized to Q8_0 (default: near-exact, +0.5 byte a weight) or Q4_0 (round-to-nearest, amax / 7 per block of
# 32). Demo config, ModelOpt awq_lite (own scale per projection: 6 of 7 linears a layer unfoldable), 2026-12-07:
# last-token logits cosine vs the ORT decoder on a 96-token prompt 0.99974 (q8_0, 2.55 MB file) vs 0.9816 (q4_0,
# 1.64 MB).
UNFOLDABLE = ("q4_0", "q8_0")


def _gguf():
    from nvila_edge.optional import require

    return require("gguf", "export", "the gguf export target")


# ---- blocks ----------------------------------------------------------------------------------------------
def q4_0_blocks(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(N, K) unsigned codes 0..15 (= code + 8) and (N, K/G) scales → (N, K/32 * 18) Q4_0 bytes.

    Each block: fp16 d, then 16 bytes whose low nibble is element j and high nibble element j + 16."""
    n, k = codes.shape
    if k % QK or k % scales.shape[1] or (k // scales.shape[1]) % QK:
        raise ExportError(f"a Q4_0 row needs whole 32-blocks inside each scale group; got K={k}, {scales.shape[1]} groups")
    c = codes.reshape(n, k // QK, QK).astype(np.uint8)
    qs = c[..., :16] | (c[..., 16:] << 4)
    d = np.repeat(scales.astype(np.float16), k // scales.shape[1] // QK, axis=1)
    return np.concatenate([d[..., None].view(np.uint8), qs], axis=-1).reshape(n, -1)


def q8_0_blocks(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(N, K) int8 codes and (N, K/G) scales (G a multiple of 32; G = K: per row) → (N, K/32 * 34) Q8_0 bytes."""
    n, k = codes.shape
    d = np.repeat(scales.reshape(n, -1).astype(np.float16), k // scales.reshape(n, -1).shape[1] // QK, axis=1)
    q = codes.reshape(n, k // QK, QK).astype(np.int8).view(np.uint8)
    return np.concatenate([d[..., None].view(np.uint8), q], axis=-1).reshape(n, -1)


def q8_0(w: torch.Tensor) -> np.ndarray:
    """Round-to-nearest Q8_0 of a float weight (amax / 127 per block of 32)."""
    w = w.detach().float()
    n, k = w.shape
    b = w.reshape(n, k // QK, QK)
    s = symmetric_scale(b.abs().amax(-1), INT8_MAX).half().float()  # rounded with the fp16 d llama.cpp applies
    q = torch.round(b / s[..., None]).clamp(-127, 127).to(torch.int8).reshape(n, k)
    return q8_0_blocks(q.numpy(), s.numpy())


def q4_0_rtn(w: torch.Tensor) -> np.ndarray:
    """Round-to-nearest Q4_0 with our amax / 7 rule per block of 32 (``lm_head="int4"``)."""
    w = w.detach().float()
    n, k = w.shape
    b = w.reshape(n, k // QK, QK)
    s = symmetric_scale(b.abs().amax(-1), INT4_MAX).half().float()  # rounded with the fp16 d llama.cpp applies
    q = (torch.round(b / s[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(n, k)
    return q4_0_blocks(q.numpy(), s.numpy())


# ---- the writer ------------------------------------------------------------------------------------------
class _Tensors:
    """What goes into the file, in order: name → (array, raw ggml type or None for f32 / f16)."""

    def __init__(self):
        self.items: list[tuple[str, np.ndarray, object]] = []

    def add(self, name: str, array, qtype=None) -> None:
        if isinstance(array, torch.Tensor):
            array = array.detach().float().numpy()
        self.items.append((name, np.ascontiguousarray(array), qtype))


def _linear(t: _Tensors, name: str, lin, block: int, row_scale: torch.Tensor | None = None,
            col_scale: torch.Tensor | None = None, unfoldable: str = "q8_0") -> str:
    """One linear: Q4_0 from its calibrated codes (``row_scale`` folded into d), or re-quantized to ``unfoldable``
    when an input scale has to be multiplied in (``col_scale``), or f16 for an uncalibrated layer. Returns the type
    written ("q4_0", "q4_0-requant", "q8_0-requant", "f16")."""
    G = _gguf()
    if enabled_quantizer(lin, "weight_quantizer") is None:
        w = lin.weight.detach().float()
        if col_scale is not None:
            w = w * col_scale[None, :]
        if row_scale is not None:
            w = w * row_scale[:, None]
        t.add(name, w.half().numpy())
        return "f16"
    h = Int4Handler(name, lin, block)
    codes, scale = h.unsigned_codes(), h.scales.numpy()
    if col_scale is not None:  # not foldable: the dequantized weight times the input scale, re-quantized
        w = h.dequantized() * col_scale[None, :]
        if row_scale is not None:
            w = w * row_scale[:, None]
        if unfoldable == "q8_0":
            t.add(name, q8_0(w), G.GGMLQuantizationType.Q8_0)
        else:
            t.add(name, q4_0_rtn(w), G.GGMLQuantizationType.Q4_0)
        return f"{unfoldable}-requant"
    if row_scale is not None:
        scale = scale * row_scale.numpy()[:, None]
    t.add(name, q4_0_blocks(codes, scale), G.GGMLQuantizationType.Q4_0)
    return "q4_0"


def _tokenizer(w, tokenizer, vocab: int) -> None:
    """The checkpoint's BPE vocabulary and merges (llama.cpp's loader wants one; our runtime tokenizes itself)."""
    G = _gguf()
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"the gguf target writes BPE tokenizers (Qwen2's); this one is {model.get('type')!r}")
    tokens = [f"[PAD{i}]" for i in range(vocab)]
    types = [G.TokenType.UNUSED] * vocab
    for tok, i in model["vocab"].items():
        if i < vocab:
            tokens[i], types[i] = tok, G.TokenType.NORMAL
    for a in data.get("added_tokens", []):
        if a["id"] < vocab:
            tokens[a["id"]], types[a["id"]] = a["content"], G.TokenType.CONTROL if a.get("special") else G.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = list(tokenizer.eos_token_ids)
    if eos:
        w.add_eos_token_id(int(eos[0]))
    w.add_pad_token_id(int(tokenizer.pad_token_id))
    w.add_add_bos_token(False)


def export_gguf(model, out_dir: str | os.PathLike, *, block_size: int = 128, lm_head: str = "int8",
                context_length: int | None = None, unfoldable: str = "q8_0") -> dict:
    """Write ``out_dir/llm.gguf``; return what the manifest records (types, folds, shapes the loader checks)."""
    G = _gguf()
    if lm_head not in LM_HEADS:
        raise ExportError(f"unsupported gguf lm_head {lm_head!r}; supported: {', '.join(LM_HEADS)}")
    if unfoldable not in UNFOLDABLE:
        raise ExportError(f"unsupported gguf unfoldable {unfoldable!r}; supported: {', '.join(UNFOLDABLE)}")
    llm = llm_of(model)
    c = llm.config
    if getattr(c, "use_sliding_window", False) or getattr(c, "hidden_act", "silu") != "silu":
        raise ExportError("the gguf target supports Qwen2 with full attention and SiLU only")
    heads, kv_heads, hidden = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        raise ExportError("llama.cpp's qwen2 graph needs head_dim * heads == hidden_size")
    rope_cache(c, head_dim, 1)  # refuses RoPE scalings llama.cpp's default rope would not match
    rope = c.rope_parameters if isinstance(getattr(c, "rope_parameters", None), dict) else {}
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    nv = getattr(model, "config", None)
    ctx = int(context_length or min(int(c.max_position_embeddings),
                                    int(getattr(getattr(nv, "llm", None), "context_length", 1 << 62))))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / GGUF_FILE
    t = _Tensors()
    types: dict[str, str] = {}
    folds = {"qkv_into_attn_norm": 0, "gate_up_into_ffn_norm": 0, "down_into_up_rows": 0, "requantized": 0,
             "unfoldable": unfoldable}
    with torch.no_grad():
        emb = llm.get_input_embeddings().weight
        q, s = quantize_int8_rows(emb)
        t.add("token_embd.weight", q8_0_blocks(q.numpy(), s.numpy()), G.GGMLQuantizationType.Q8_0)
        for i, layer in enumerate(llm.model.layers):
            at, mlp, p = layer.self_attn, layer.mlp, f"blk.{i}"
            qkv = [at.q_proj, at.k_proj, at.v_proj]
            fold = shared_pre_quant_scale(qkv)
            norm = layer.input_layernorm.weight.detach().float()
            if fold is not None:
                norm, folds["qkv_into_attn_norm"] = norm * fold, folds["qkv_into_attn_norm"] + 1
            t.add(f"{p}.attn_norm.weight", norm)
            for lin, n in zip(qkv, ("attn_q", "attn_k", "attn_v")):
                col = None if fold is not None else pre_quant_scale(lin)
                types[f"{p}.{n}.weight"] = _linear(t, f"{p}.{n}.weight", lin, block_size, col_scale=col, unfoldable=unfoldable)
                if lin.bias is not None:
                    t.add(f"{p}.{n}.bias", lin.bias.detach().float())
            types[f"{p}.attn_output.weight"] = _linear(t, f"{p}.attn_output.weight", at.o_proj, block_size,
                                                       col_scale=pre_quant_scale(at.o_proj), unfoldable=unfoldable)
            gu = [mlp.gate_proj, mlp.up_proj]
            fold = shared_pre_quant_scale(gu)
            norm = layer.post_attention_layernorm.weight.detach().float()
            if fold is not None:
                norm, folds["gate_up_into_ffn_norm"] = norm * fold, folds["gate_up_into_ffn_norm"] + 1
            t.add(f"{p}.ffn_norm.weight", norm)
            down = pre_quant_scale(mlp.down_proj)
            folds["down_into_up_rows"] += down is not None
            types[f"{p}.ffn_gate.weight"] = _linear(t, f"{p}.ffn_gate.weight", mlp.gate_proj, block_size,
                                                    col_scale=None if fold is not None else pre_quant_scale(mlp.gate_proj),
                                                    unfoldable=unfoldable)
            types[f"{p}.ffn_up.weight"] = _linear(t, f"{p}.ffn_up.weight", mlp.up_proj, block_size, row_scale=down,
                                                  col_scale=None if fold is not None else pre_quant_scale(mlp.up_proj),
                                                  unfoldable=unfoldable)
            types[f"{p}.ffn_down.weight"] = _linear(t, f"{p}.ffn_down.weight", mlp.down_proj, block_size)
        t.add("output_norm.weight", llm.model.norm.weight.detach().float())
        head = llm.lm_head.weight
        if lm_head == "int8":
            q, s = quantize_int8_rows(head)
            t.add("output.weight", q8_0_blocks(q.numpy(), s.numpy()), G.GGMLQuantizationType.Q8_0)
        else:
            t.add("output.weight", q4_0_rtn(head), G.GGMLQuantizationType.Q4_0)
        types["output.weight"] = {"int8": "q8_0", "int4": "q4_0"}[lm_head]
    folds["requantized"] = sum(v.endswith("-requant") for v in types.values())

    tmp = path.with_name(path.name + ".tmp")
    w = G.GGUFWriter(str(tmp), "qwen2")
    w.add_name("nvila-edge qwen2")
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(len(llm.model.layers))
    w.add_feed_forward_length(int(c.intermediate_size))
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_file_type(G.LlamaFileType.MOSTLY_Q4_0)
    _tokenizer(w, model.tokenizer, int(c.vocab_size))
    for name, arr, qtype in t.items:
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return {"file": GGUF_FILE, "arch": "qwen2", "context_length": ctx, "num_layers": len(llm.model.layers),
            "hidden_size": hidden, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
            "intermediate_size": int(c.intermediate_size), "vocab_size": int(c.vocab_size), "lm_head": lm_head,
            "token_table": "q8_0", "block_size": block_size, "types": types, "awq_folds": folds,
            "bytes": path.stat().st_size}
