"""The ``cuda`` target: the calibrated model's real low-bit tensors for the torch backend's kernels.

- LLM linears with a ModelOpt INT4 block quantizer (AWQ / RTN): packed int4 codes + per-group scales, read
  back from the fake-quantized weight by the handler that fills the cpu target's ``MatMulNBits`` too
  (``nvila_edge.quant_format.Int4Handler``: the very bytes), plus the AWQ pre-quant scale. No re-quantization.
- Vision (and projector) linears with INT8 weight + INT8 static input quantizers (SmoothQuant): int8
  weights, per-channel weight scales, the SmoothQuant pre-quant scale and the static activation amax
  (``quant_format.W8A8Handler``).
- The token table (and the LM head, when the calibration left it float) int8 per row — the one tensor
  quantized here, as the cpu target's int8 LM head is; everything else fp16.

One safetensors file, ``cuda/model.safetensors``, hashed in the manifest like every target; the layout is
``nvila_edge.modeling.quantized`` (which the runtime loads without importing export).
"""

from __future__ import annotations

import torch

from nvila_edge.errors import ExportError
from nvila_edge.quant_format import HANDLERS, OTHER_QUANTIZERS, Int4Handler, enabled_quantizer, quantize_int8_rows

WEIGHTS_FILE = "cuda/model.safetensors"


def linear_kind(name: str, lin) -> str:
    """How one linear maps to the cuda target: "int4", "w8a8" or "fp16" (``ExportError`` otherwise)."""
    for q in OTHER_QUANTIZERS:
        if enabled_quantizer(lin, q) is not None:
            raise ExportError(f"{name}.{q} is enabled: the cuda target runs W4A16 weight-only and W8A8 "
                              "(static activations) only; re-calibrate with w4a16-awq / w8a8-smoothquant")
    wq, iq = enabled_quantizer(lin, "weight_quantizer"), enabled_quantizer(lin, "input_quantizer")
    if wq is None:
        if iq is not None:
            raise ExportError(f"{name}: activation-only quantization is not supported by the cuda target")
        return "fp16"
    if wq.num_bits == 4 and (wq.block_sizes or {}).get(-1) and iq is None:
        return "int4"
    if wq.num_bits == 8 and not (wq.block_sizes or {}).get(-1) and iq is not None:
        return "w8a8"
    raise ExportError(f"{name}: weight quantizer {wq.num_bits}-bit (block_sizes={wq.block_sizes}) with input "
                      f"quantizer {'on' if iq else 'off'}: the cuda target runs INT4 blockwise weight-only or "
                      "INT8 per-channel W8A8")


def quantized_tensors(model) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The calibrated model → the cuda target's tensors (``modeling.quantized`` layout) and per-kind counts."""
    out: dict[str, torch.Tensor] = {}
    counts = {"int4": 0, "w8a8": 0, "fp16": 0}
    done: set[str] = set()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or name == "llm.lm_head":
                continue
            kind = linear_kind(name, mod)
            counts[kind] += 1
            if kind == "fp16":
                continue
            out.update(HANDLERS[kind](name, mod).tensors())
            if mod.bias is not None:
                out[f"{name}.bias"] = mod.bias.detach().float()
            done |= {f"{name}.weight", f"{name}.bias"}
        emb = model.llm.get_input_embeddings().weight.detach()
        q, s = quantize_int8_rows(emb)
        out.update({"llm.model.embed_tokens.weight": q, "llm.model.embed_tokens.scales": s})
        done.add("llm.model.embed_tokens.weight")
        head = model.llm.lm_head
        kind = linear_kind("llm.lm_head", head)
        if kind == "int4":
            out.update(Int4Handler("llm.lm_head", head).tensors())
            counts["int4"] += 1
        elif kind == "w8a8":
            raise ExportError("llm.lm_head: W8A8 on the LM head is not supported by the cuda target")
        elif not model.config.llm.tie_word_embeddings:
            q, s = quantize_int8_rows(head.weight)
            out.update({"llm.lm_head.weight": q, "llm.lm_head.scales": s})
        done.add("llm.lm_head.weight")
        for k, v in model.state_dict().items():
            if "_quantizer." in k or k in done or k in out:
                continue
            out[k] = v.detach().to(torch.float16) if v.is_floating_point() else v.detach()
    return {k: v.contiguous() for k, v in out.items()}, counts


def llm_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith("llm."))


def build_cuda(model, writer, recipes, limits: dict) -> None:
    """The ``cuda`` export target (registered in ``targets.py``, which passes the bundle's ``limits``)."""
    from safetensors.torch import save_file

    tensors, counts = quantized_tensors(model)
    path = writer.path_for(WEIGHTS_FILE)
    save_file(tensors, str(path), metadata={"format": "nvila-edge-quantized", "layout": "1"})
    fp16_llm = sum(p.numel() for n, p in model.llm.named_parameters() if "_quantizer" not in n) * 2
    writer.add_target("cuda", files={"weights": WEIGHTS_FILE}, limits=limits,
                      precision={"vision": recipes["vision"].name, "llm": recipes["llm"].name,
                                 "layers": counts, "embeddings": "int8", "other": "float16"},
                      layout={"format": "nvila-edge-quantized", "version": 1,
                              "group_size": recipes["llm"].block_size if counts["int4"] else None},
                      sizes={"llm_bytes": llm_bytes(tensors), "llm_fp16_bytes": fp16_llm})


__all__ = ["quantized_tensors", "linear_kind", "build_cuda", "WEIGHTS_FILE"]
