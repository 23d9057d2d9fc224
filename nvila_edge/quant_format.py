"""The quantized formats every writer and reader shares: ModelOpt's symmetric scale rule, int4 nibble packing,
per-row int8 tables, and one handler per scheme that reads a ModelOpt-calibrated linear back into codes and
scales (gpt-fast's ``WeightOnlyInt4QuantHandler`` shape). The export targets (``cpu``: ONNX ``MatMulNBits``;
``cuda``: ``modeling/quantized.py``'s modules) and the bench's random-weight layout all go through here, so a
bundle's two targets hold the very same codes.

Importing it pulls no torch (the rule and the packing work on numpy arrays too); the handlers and the torch
helpers import torch when called. It reads ModelOpt's quantizer objects by attribute and never imports modelopt.
"""

from __future__ import annotations

import numpy as np

from .errors import ExportError

ZERO_AMAX = 2.0 ** -24  # ModelOpt: an amax at or below this quantizes to zero (its scale is set to 1)
INT4_MAX, INT8_MAX = 7, 127
OTHER_QUANTIZERS = ("output_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "q_bmm_quantizer")


# ---- the rules (numpy arrays or torch tensors) ------------------------------------------------------------------
def symmetric_scale(amax, qmax: int):
    """ModelOpt's scale for codes round(w / scale) in [-qmax-1, qmax]: amax / qmax, 1 where amax <= ZERO_AMAX."""
    scale = amax / qmax
    scale[amax <= ZERO_AMAX] = 1.0
    return scale


def pack_nibbles(q):
    """Unsigned 4-bit codes (N, K) uint8 → (N, K/2) uint8, the low nibble holding the even k (MatMulNBits' order)."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


# ---- torch layouts (modeling/quantized.py's buffers) -------------------------------------------------------------
def pack_int4(codes):
    """Signed codes (N, K) in [-8, 7] → uint8 (N, K/2): q = c + 8 (``pack_nibbles``)."""
    import torch

    return pack_nibbles((codes.to(torch.int16) + 8).to(torch.uint8))


def unpack_int4(packed):
    """uint8 (N, K/2) → signed int8 codes (N, K) (the inverse of ``pack_int4``)."""
    import torch

    lo, hi = (packed & 0x0F).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed, scales):
    """Packed codes (N, K/2) and group scales (N, K/g) → the float32 weight (N, K)."""
    codes = unpack_int4(packed).float()
    n, k = codes.shape
    g = k // scales.shape[1]
    return (codes.reshape(n, -1, g) * scales.float()[..., None]).reshape(n, k)


def quantize_int4_groups(w, group_size: int):
    """Round-to-nearest int4 per group with ModelOpt's rule (what its INT4 RTN computes): (codes (N, K) int8,
    scales (N, K/g) float32)."""
    import torch

    n, k = w.shape
    blocks = w.detach().float().reshape(n, k // group_size, group_size)
    scale = symmetric_scale(blocks.abs().amax(-1), INT4_MAX)
    codes = torch.clamp(torch.round(blocks / scale[..., None]), -8, 7)
    return codes.reshape(n, k).to(torch.int8), scale


def quantize_int8_channels(w):
    """Symmetric int8 per output channel (ModelOpt's per-channel weight rule): (int8 codes, float32 scales)."""
    import torch

    w = w.detach().float()
    scale = symmetric_scale(w.abs().amax(1), INT8_MAX)
    return torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8), scale


def quantize_int8_rows(w, chunk: int = 8192):
    """``quantize_int8_channels`` for large tables (token embeddings, LM heads), ``chunk`` rows at a time so no
    full-size float copy is made: (int8 codes, float32 row scales)."""
    import torch

    q = torch.empty(tuple(w.shape), dtype=torch.int8)
    scales = torch.empty(w.shape[0])
    for s in range(0, w.shape[0], chunk):
        q[s:s + chunk], scales[s:s + chunk] = quantize_int8_channels(w[s:s + chunk].cpu())
    return q, scales


# ---- ModelOpt-calibrated modules -------------------------------------------------------------------------------
def enabled_quantizer(module, name: str):
    """``module``'s ModelOpt quantizer ``name`` when it is enabled, else None."""
    q = getattr(module, name, None)
    return q if q is not None and getattr(q, "is_enabled", False) else None


def pre_quant_scale(lin):
    """The AWQ / SmoothQuant input scale of a calibrated linear (float32 (K,)), None when absent or all ones."""
    import torch

    q = getattr(lin, "input_quantizer", None)
    pqs = getattr(q, "pre_quant_scale", None) if q is not None else None
    if pqs is None or bool(torch.all(pqs == 1)):
        return None  # an all-ones scale (AWQ chose alpha 0) needs no op
    return pqs.detach().float().reshape(-1)


def shared_pre_quant_scale(mods):
    """The one pre-quant scale every linear of ``mods`` shares (foldable into the norm before them), else None."""
    import torch

    s = [pre_quant_scale(m) for m in mods]
    if s[0] is not None and all(x is not None and torch.equal(x, s[0]) for x in s[1:]):
        return s[0]
    return None


def fake_quant_weight(lin):
    """The weight as ModelOpt's enabled weight quantizer computes with it (float32)."""
    import torch

    with torch.no_grad():
        return lin.weight_quantizer(lin.weight.detach()).float()


class Int4Handler:
    """W4A16 blockwise (ModelOpt INT4 AWQ / RTN): signed codes c = round(w * 7 / amax) in [-8, 7] per block of
    ``block_size`` input channels, scale = amax / 7. The codes are read back from the fake-quantized weight
    itself (checked on its grid), so every target dequantizes to those very values."""

    scheme = "int4"

    def __init__(self, name: str, lin, block_size: int | None = None):
        import torch

        wq = lin.weight_quantizer
        bs = int(wq.block_sizes[-1])
        if block_size is not None and bs != block_size:
            raise ExportError(f"{name}: calibrated with INT4 block size {bs}; export it with block_size={bs}")
        fq = fake_quant_weight(lin)
        n, k = fq.shape
        if k % bs:
            raise ExportError(f"{name}: in_features {k} is not a multiple of the quantization block size {bs}")
        amax = wq.amax.detach().float().reshape(n, k // bs)
        scale = symmetric_scale(amax, INT4_MAX)
        blocks = fq.reshape(n, k // bs, bs)
        codes = torch.round(blocks / scale[..., None])
        err = (codes * scale[..., None] - blocks).abs().max().item()
        if codes.min() < -8 or codes.max() > 7 or err > 1e-5 * max(1.0, float(amax.max())):
            raise ExportError(f"{name}: the fake-quantized weight is not on its INT4 grid (error {err:.2e}); "
                              "unsupported quantizer settings")
        self.name, self.lin, self.block_size = name, lin, bs
        self.codes, self.scales = codes.reshape(n, k).to(torch.int8), scale

    def unsigned_codes(self) -> np.ndarray:
        """The codes as stored by the int4 formats (code + 8, 0..15): (N, K) uint8."""
        return (self.codes.numpy().astype(np.int16) + 8).astype(np.uint8)

    def dequantized(self):
        """codes * scale: the float32 (N, K) weight every target computes with."""
        n, k = self.codes.shape
        return (self.codes.float().reshape(n, -1, self.block_size) * self.scales[..., None]).reshape(n, k)

    def matmulnbits(self) -> tuple[np.ndarray, np.ndarray]:
        """ONNX ``MatMulNBits`` B (N, K/block, block/2) uint8 and its scales (N, K/block) float32."""
        n, k = self.codes.shape
        return (pack_nibbles(self.unsigned_codes()).reshape(n, k // self.block_size, self.block_size // 2),
                self.scales.numpy())

    def tensors(self) -> dict:
        """The ``Int4Linear`` buffers: qweight (N, K/2) uint8 (the MatMulNBits bytes), scales, pre_quant_scale."""
        out = {f"{self.name}.qweight": pack_int4(self.codes), f"{self.name}.scales": self.scales.float()}
        pqs = pre_quant_scale(self.lin)
        if pqs is not None:
            out[f"{self.name}.pre_quant_scale"] = pqs
        return out


class W8A8Handler:
    """W8A8 SmoothQuant (ModelOpt INT8 per-channel weights, static per-tensor INT8 input): codes
    round(w * 127 / amax) read back from the fake-quantized weight, the SmoothQuant pre-quant scale and the
    static activation amax."""

    scheme = "w8a8"

    def __init__(self, name: str, lin):
        import torch

        iq, wq = lin.input_quantizer, lin.weight_quantizer
        amax = iq.amax.detach().float().reshape(-1) if iq.amax is not None else None
        if iq.num_bits != 8 or amax is None or amax.numel() != 1 or iq.block_sizes or getattr(iq, "_unsigned", False):
            raise ExportError(f"{name}: the int8 kernel needs a static per-tensor signed INT8 input quantizer "
                              "(SmoothQuant, e.g. mtq.INT8_SMOOTHQUANT_CFG); re-calibrate with w8a8-smoothquant")
        if getattr(iq, "_narrow_range", False):
            raise ExportError(f"{name}: narrow-range INT8 activations are not supported")
        fq = fake_quant_weight(lin)
        n = fq.shape[0]
        wamax = wq.amax.detach().float().reshape(-1)
        if wamax.numel() == 1:
            wamax = wamax.expand(n).clone()
        if wamax.numel() != n:
            raise ExportError(f"{name}: INT8 weight quantizer with amax of {wamax.numel()} values for {n} channels: "
                              "only per-channel (axis 0) or per-tensor weights map to the int8 kernel")
        scale = symmetric_scale(wamax, INT8_MAX)
        codes = torch.round(fq / scale[:, None])
        if codes.abs().max() > 128 or (codes * scale[:, None] - fq).abs().max() > 1e-5 * max(1.0, float(wamax.max())):
            raise ExportError(f"{name}: the fake-quantized INT8 weight is not on its grid; unsupported quantizer settings")
        self.name, self.codes, self.scales, self.input_amax = name, codes.to(torch.int8), scale, amax.reshape(())
        pqs = iq.pre_quant_scale
        self.pre_quant_scale = None if pqs is None else pqs.detach().float().reshape(-1)

    def tensors(self) -> dict:
        """The ``Int8Linear`` buffers: weight int8 (N, K), weight_scale (N,), input_amax (), pre_quant_scale."""
        out = {f"{self.name}.weight": self.codes, f"{self.name}.weight_scale": self.scales,
               f"{self.name}.input_amax": self.input_amax}
        if self.pre_quant_scale is not None:
            out[f"{self.name}.pre_quant_scale"] = self.pre_quant_scale
        return out


HANDLERS = {"int4": Int4Handler, "w8a8": W8A8Handler}  # scheme → handler: what every target writer reads

__all__ = ["ZERO_AMAX", "INT4_MAX", "INT8_MAX", "OTHER_QUANTIZERS", "HANDLERS", "Int4Handler", "W8A8Handler",
           "symmetric_scale", "pack_nibbles", "pack_int4", "unpack_int4", "dequantize_int4", "quantize_int4_groups",
           "quantize_int8_channels", "quantize_int8_rows", "enabled_quantizer", "pre_quant_scale", "shared_pre_quant_scale",
           "fake_quant_weight"]
