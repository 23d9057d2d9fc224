"""Real low-bit modules for the bundle's ``cuda`` target: W4A16 (int4 groups) and W8A8 (SmoothQuant, static
activation scale) linears, int8 embeddings, and the model that holds them.

Export writes these tensors and the runtime reads them, and neither may import the other, so the one
definition lives here. The bundle holds a portable layout (its codes and rules: ``nvila_edge.quant_format``); ``prepare``
converts it to the kernel's layout on the device at load:

- ``Int4Linear``: ``qweight`` uint8 (N, K/2), two unsigned codes q = c + 8 a byte (low nibble = even k: the
  very bytes of the cpu target's ``MatMulNBits``), ``scales`` float32 (N, K/g); w = c * scale. Kernel:
  PyTorch's tinygemm ``_weight_int4pack_mm`` (CUDA sm_80+, bf16) / ``_weight_int4pack_mm_for_cpu``. tinygemm
  computes w = (q - 8) * scale + zero per group, so these symmetric codes run with zero = 0 exactly.
- ``Int8Linear``: ``weight`` int8 (N, K), ``weight_scale`` (N,), ``input_amax`` (static, from calibration),
  ``pre_quant_scale`` (K,) (SmoothQuant): x' = x * s, q = clamp(round(x' * 127 / amax)), y = (q @ w^T) *
  (amax / 127) * weight_scale + bias — ModelOpt's fake quantization computed with ``torch._int_mm``.
- ``Int8Embedding`` / ``Int8Head``: the token table int8 per row (+ row scales), shared by the lookup and,
  for tied models, the LM head. The head's kernel is a ``KernelOptions.head`` choice: on the CPU
  ``_weight_int8pack_mm``; on CUDA a dense bf16 copy through cuBLAS by default (int8mm.cu runs one thread per
  output with a serial K loop: at batch 1 most of the GPU idles), or a compiled dequantize-GEMV ("gemv").

Where the fast kernel depends on the device (the head, W8A8's elementwise work, the M from which W4A16 runs
cuBLAS on dequantized weights instead of tinygemm), ``KernelOptions`` names the alternatives and
scripts/gpu_check.sh measures each; the defaults stand until a lent GPU has measured them (docs/BENCHMARKS.md).

A kernel the device lacks (an int4 GEMM on a GPU older than sm_80, ``_int_mm`` shapes cuBLAS refuses) falls
back to the same numbers through dequantized weights, with a warning: never to different numbers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nvila_edge.errors import BundleError
from nvila_edge.quant_format import dequantize_int4, unpack_int4

GROUP_SIZES = (32, 64, 128, 256)  # tinygemm's
HEAD_KERNELS = ("dense", "gemv", "int8pack")
W8A8_KERNELS = ("eager", "compile")


@dataclass(frozen=True)
class KernelOptions:
    """The kernel choices that only a measurement on the device settles (None: that device's default).

    - ``head``: the int8 LM head — "dense" (a bf16 copy, cuBLAS; CUDA's default: +2 bytes a table entry of
      memory), "gemv" (``torch.compile`` of dequantize × x: one fused reduction over the int8 table), or
      "int8pack" (``_weight_int8pack_mm``; the CPU's default).
    - ``w8a8``: "compile" fuses the W8A8 quantize / dequantize elementwise work around ``_int_mm`` into two
      kernels (CUDA's default; eager runs ~12 launches a linear), "eager" runs it op by op (the CPU's default).
    - ``int4_dense_min_m``: from this many rows (prefill) W4A16 dequantizes its weight to bf16 and runs cuBLAS
      instead of tinygemm, a small-batch kernel (CUDA default 64; never on the CPU).
    """

    head: str | None = None
    w8a8: str | None = None
    int4_dense_min_m: int | None = None

    def resolve(self, device: torch.device) -> "KernelOptions":
        cuda = device.type == "cuda"
        r = replace(self, head=self.head or ("dense" if cuda else "int8pack"),
                    w8a8=self.w8a8 or ("compile" if cuda else "eager"),
                    int4_dense_min_m=self.int4_dense_min_m if self.int4_dense_min_m is not None
                    else (64 if cuda else 1 << 62))
        if r.head not in HEAD_KERNELS or r.w8a8 not in W8A8_KERNELS or r.int4_dense_min_m < 1:
            raise ValueError(f"KernelOptions: head in {HEAD_KERNELS}, w8a8 in {W8A8_KERNELS}, "
                             f"int4_dense_min_m >= 1; got {self}")
        return r


def _warn_fallback(what: str, why: str) -> None:
    warnings.warn(f"{what}: {why}; running it on dequantized weights instead (same numbers, no speed-up)",
                  RuntimeWarning, stacklevel=3)


def int4_kernel_support(device: torch.device) -> str | None:
    """None when tinygemm runs on ``device``, else why not."""
    if device.type == "cpu":
        return None if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") else \
            f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return (f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}) has no int4 tinygemm kernel "
                    "(it needs sm_80 or newer)")
        return None
    return f"no int4 kernel for device type {device.type}"


def inner_k_tiles(k: int) -> int | None:
    """tinygemm's inner k-tiles for K (the widest load that divides it: 8, 4 or 2 k-tiles of 16)."""
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)


def cuda_int4_bytes(qweight: torch.Tensor) -> torch.Tensor:
    """The portable bytes (low nibble = even k) as the CUDA converter reads them (high nibble = even k:
    int4mm.cu's ``matrix_to_m16n8k16_Bint4_layout`` on uint8 input)."""
    return (((qweight & 0x0F) << 4) | (qweight >> 4)).contiguous()


# ---- modules -------------------------------------------------------------------------------------------------
class Int4Linear(nn.Module):
    """W4A16 linear (AWQ codes and scales, optional AWQ pre-quant scale on the input)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False,
                 pre_quant_scale: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self.register_buffer("pre_quant_scale", torch.empty(in_features, device=device) if pre_quant_scale else None)
        self.mode = "unprepared"

    def dequantized_weight(self) -> torch.Tensor:
        """The dense weight this layer computes with (pre-quant scale folded in), float32."""
        w = dequantize_int4(self.qweight, self.scales)
        return w * self.pre_quant_scale.float()[None, :] if self.pre_quant_scale is not None else w

    def prepare(self, dtype: torch.dtype, kernel: bool = True, options: KernelOptions | None = None) -> str:
        """Convert to the device kernel's layout (``mode`` "int4"), or to a dense weight ("dense")."""
        dev = self.qweight.device
        self._dense_min_m = (options or KernelOptions()).resolve(dev).int4_dense_min_m
        why = int4_kernel_support(dev) if kernel else "kernels off"
        n, k = self.out_features, self.in_features
        if why is None and dev.type == "cuda":
            if dtype != torch.bfloat16:
                why = f"tinygemm on CUDA computes in bfloat16, not {dtype}"
            elif n % 8 or k % 32:
                why = f"shape {n}x{k} is not a multiple of tinygemm's tiles (N % 8, K % 32)"
        inner = inner_k_tiles(k)
        if why is None:
            try:
                sz = torch.stack([self.scales.t(), torch.zeros_like(self.scales.t())], -1).contiguous()
                if dev.type == "cuda":
                    packed = torch.ops.aten._convert_weight_to_int4pack(cuda_int4_bytes(self.qweight), inner)
                    self._mm = torch.ops.aten._weight_int4pack_mm
                else:
                    q = unpack_int4(self.qweight).to(torch.int32) + 8
                    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
                    self._mm = torch.ops.aten._weight_int4pack_mm_for_cpu
                self._packed, self._sz = packed, sz.to(dtype)
                self._pqs = None if self.pre_quant_scale is None else self.pre_quant_scale.to(dtype)
                self._bias = None if self.bias is None else self.bias.to(dtype)
                self._mm(torch.zeros(1, k, dtype=dtype, device=dev), packed, self.group_size, self._sz)  # probe
                self.mode = "int4"
            except (RuntimeError, NotImplementedError) as e:  # a build without the kernel
                why = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        if why is not None:
            if kernel:
                _warn_fallback("int4 linear", why)
            self._dense = self.dequantized_weight().to(dtype)
            self._bias = None if self.bias is None else self.bias.to(dtype)
            self.mode = "dense"
        self._dtype = dtype
        return self.mode

    def _dequantized(self) -> torch.Tensor:
        """The weight tinygemm computes with, (N, K) in the activations' dtype, made on the device."""
        codes = unpack_int4(self.qweight).to(self._dtype)
        n, k = codes.shape
        scale = self._sz[..., 0].t()  # (N, K/g), the kernel's own rounding of the scales
        return (codes.reshape(n, -1, self.group_size) * scale[..., None]).reshape(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return F.linear(x.to(self._dtype), self._dense, self._bias)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self._dtype)
        if self._pqs is not None:
            x2 = x2 * self._pqs
        if x2.shape[0] >= self._dense_min_m:  # prefill: cuBLAS on the weight dequantized for this call
            y = F.linear(x2, self._dequantized())
        else:
            y = self._mm(x2.contiguous(), self._packed, self.group_size, self._sz)
        if self._bias is not None:
            y = y + self._bias
        return y.reshape(*shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """W8A8 linear: SmoothQuant pre-scale, static per-tensor activation scale, per-channel int8 weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, pre_quant_scale: bool = False,
                 act_min: int = -128, device=None):
        super().__init__()
        self.in_features, self.out_features, self.act_min = in_features, out_features, act_min
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))
        self.register_buffer("input_amax", torch.empty((), device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self.register_buffer("pre_quant_scale", torch.empty(in_features, device=device) if pre_quant_scale else None)
        self.mode = "unprepared"

    def dequantized_weight(self) -> torch.Tensor:
        w = self.weight.float() * self.weight_scale.float()[:, None]
        return w * self.pre_quant_scale.float()[None, :] if self.pre_quant_scale is not None else w

    def prepare(self, dtype: torch.dtype, kernel: bool = True, options: KernelOptions | None = None) -> str:
        dev = self.weight.device
        self._fused = (options or KernelOptions()).resolve(dev).w8a8 == "compile"
        # ModelOpt's scale is 127 / amax in float32 (zero amax: everything quantizes to 0)
        amax = self.input_amax.float()
        tiny = amax <= 2.0 ** -24
        self._inv = torch.where(tiny, torch.zeros_like(amax), 127.0 / amax)
        self._div = torch.where(tiny, torch.ones_like(amax), 127.0 / amax)  # ModelOpt divides by this scale
        self._out_scale = torch.where(amax <= 2.0 ** -24, torch.zeros_like(amax), amax / 127.0) * self.weight_scale.float()
        self._pqs = self.pre_quant_scale
        self._bias = None if self.bias is None else self.bias.to(dtype)
        self._dtype = dtype
        why = None if kernel else "kernels off"
        if why is None and dev.type == "cuda" and (self.in_features % 8 or self.out_features % 8):
            why = f"torch._int_mm on CUDA needs K and N multiples of 8, got {self.in_features}, {self.out_features}"
        if why is None:
            try:
                self._wt = self.weight.t()  # (K, N) column-major: what cuBLASLt's int8 GEMM wants
                torch._int_mm(torch.zeros(32, self.in_features, dtype=torch.int8, device=dev), self._wt)
                self.mode = "int8"
            except (RuntimeError, NotImplementedError) as e:
                why = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        if why is not None:
            if kernel:
                _warn_fallback("int8 linear", why)
            self._dense = (self.weight.float() * self.weight_scale.float()[:, None]).to(dtype)
            self.mode = "dense"
        return self.mode

    def _quantize_input(self, x2: torch.Tensor) -> torch.Tensor:
        return _w8a8_quantize(x2, self._pqs, self._inv, self.act_min)

    def _call(self, fn, *args):
        """``fn`` fused by torch.compile where ``KernelOptions.w8a8`` says so; a compiler that fails here (no
        Triton, no C++ compiler) leaves the eager ops, once, with a warning."""
        if self._fused:
            try:
                return _compiled(fn)(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure leaves the same eager numbers
                self._fused = False
                warnings.warn(f"w8a8: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "running its elementwise ops eagerly", RuntimeWarning, stacklevel=2)
        return fn(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.mode == "dense":  # the fake-quant arithmetic itself
            q = self._quantize_input(x2)
            y = F.linear((q / self._div).to(self._dtype), self._dense)
            if self._bias is not None:
                y = y + self._bias
        else:
            m = x2.shape[0]
            pad = 17 - m if x2.is_cuda and m <= 16 else 0  # cuBLASLt's int8 GEMM needs M > 16
            qi = self._call(_w8a8_quantize_int8, x2, self._pqs, self._inv, self.act_min, pad)
            acc = torch._int_mm(qi, self._wt)[:m]
            y = self._call(_w8a8_dequantize, acc, self._out_scale, self._bias, self._dtype)
        return y.reshape(*shape[:-1], self.out_features)


def _w8a8_quantize(x2, pqs, inv, act_min: int):
    if pqs is not None:
        x2 = x2 * pqs.to(x2.dtype)  # in the activation's dtype first, as ModelOpt does
    return torch.clamp(torch.round(x2.float() * inv), act_min, 127)


def _w8a8_quantize_int8(x2, pqs, inv, act_min: int, pad: int):
    q = _w8a8_quantize(x2, pqs, inv, act_min).to(torch.int8)
    return (F.pad(q, (0, 0, 0, pad)) if pad else q).contiguous()


def _w8a8_dequantize(acc, out_scale, bias, dtype):
    y = (acc.float() * out_scale).to(dtype)
    return y + bias if bias is not None else y


_COMPILED: dict = {}  # a cache of compiled wrappers (torch.compile keeps its own per code object)


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _int8_gemv(x, w, scales):
    """The head as gpt-fast writes its int8 linear: torch.compile fuses the cast into the matmul's reduction."""
    return F.linear(x, w.to(x.dtype)) * scales


class Int8Embedding(nn.Module):
    """Token table int8 per row: row = weight[i] * scales[i]."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, device=device))
        self._dtype = torch.float32

    def prepare(self, dtype: torch.dtype, kernel: bool = True, options: KernelOptions | None = None) -> str:
        self._dtype = dtype
        return "int8"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight[ids].float() * self.scales[ids].float()[..., None]).to(self._dtype)


class Int8Head(nn.Module):
    """LM head on an int8 table (its own, or the tied embedding's)."""

    def __init__(self, table: Int8Embedding | None = None, in_features: int = 0, out_features: int = 0, device=None):
        super().__init__()
        if table is None:
            self.table = Int8Embedding(out_features, in_features, device=device)
            self._tied = None
        else:
            self._tied = [table]  # a list: not a submodule, so its tensors are saved once (as the embedding)
        self.mode = "unprepared"

    @property
    def source(self) -> Int8Embedding:
        return self._tied[0] if self._tied else self.table

    def prepare(self, dtype: torch.dtype, kernel: bool = True, options: KernelOptions | None = None) -> str:
        t = self.source
        dev = t.weight.device
        self._dtype = dtype
        choice = (options or KernelOptions()).resolve(dev).head if kernel else "dense"
        # int8mm.cu reads float32 scales (and casts A to float); the CPU kernel takes A's dtype
        self._scales = t.scales.float() if dev.type == "cuda" else t.scales.to(dtype)
        self.mode = "dense"
        if choice == "int8pack":
            try:
                torch.ops.aten._weight_int8pack_mm(torch.zeros(1, t.embedding_dim, dtype=dtype, device=dev),
                                                   t.weight, self._scales)
                self.mode = "int8"
            except (RuntimeError, NotImplementedError, AttributeError):  # a build without it: the dense copy
                pass
        elif choice == "gemv":
            self._scales, self.mode = t.scales.to(dtype), "gemv"
        if self.mode == "dense":  # the same numbers as a plain bf16 table: cuBLAS's GEMV
            self._dense = (t.weight.float() * t.scales.float()[:, None]).to(dtype)
        return self.mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.mode == "dense":
            return F.linear(x.to(self._dtype), self._dense)
        x2 = x.reshape(-1, shape[-1]).to(self._dtype).contiguous()
        if self.mode == "gemv":
            y = _compiled(_int8_gemv)(x2, self.source.weight, self._scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.source.weight, self._scales)
        return y.reshape(*shape[:-1], y.shape[-1])


QUANT_MODULES = (Int4Linear, Int8Linear, Int8Embedding, Int8Head)


# ---- the portable layout ↔ a model -----------------------------------------------------------------------------
def quantized_kinds(tensors) -> dict[str, str]:
    """Module name → "int4" | "w8a8" | "int8-embedding" | "int8-head", read from the tensor names."""
    kinds = {}
    for key in tensors:
        mod, _, leaf = key.rpartition(".")
        if leaf == "qweight":
            kinds[mod] = "int4"
        elif leaf == "input_amax":
            kinds[mod] = "w8a8"
        elif leaf == "scales" and f"{mod}.weight" in tensors:
            kinds[mod] = "int8-head" if mod.endswith("lm_head") else "int8-embedding"
    return kinds


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def _check(key: str, tensors, shape: tuple, where: str) -> None:
    got = tuple(tensors[key].shape) if key in tensors else None
    if got != tuple(shape):
        what = "is missing" if got is None else f"has shape {list(got)}"
        raise BundleError(f"{where}: tensor {key!r} {what}; the config needs {list(shape)} "
                          "(a bundle exported for another model? re-export it)")


def build_quantized(config, tensors, where: str = "cuda target"):
    """An ``NVILAModel`` (on meta) whose quantized linears / embeddings are replaced by the modules above,
    every shape checked against the config (``BundleError`` naming the tensor)."""
    from nvila_edge.modeling.model import NVILAModel

    with torch.device("meta"):
        model = NVILAModel(config)
    kinds = quantized_kinds(tensors)
    for name, kind in sorted(kinds.items(), key=lambda kv: kv[1] == "int8-head"):  # the table before the head
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise BundleError(f"{where}: tensors for {name!r}, which the model does not have") from None
        parent, leaf = _parent(model, name)
        if kind == "int4":
            n, k = old.out_features, old.in_features
            g = k // max(1, tensors[f"{name}.scales"].shape[-1]) if f"{name}.scales" in tensors else 0
            if g not in GROUP_SIZES or k % g:
                raise BundleError(f"{where}: tensor '{name}.scales' gives group size {g} for in_features {k}; "
                                  f"supported groups: {GROUP_SIZES}")
            _check(f"{name}.qweight", tensors, (n, k // 2), where)
            _check(f"{name}.scales", tensors, (n, k // g), where)
            new = Int4Linear(k, n, g, bias=f"{name}.bias" in tensors,
                             pre_quant_scale=f"{name}.pre_quant_scale" in tensors, device="meta")
        elif kind == "w8a8":
            n, k = old.out_features, old.in_features
            _check(f"{name}.weight", tensors, (n, k), where)
            _check(f"{name}.weight_scale", tensors, (n,), where)
            new = Int8Linear(k, n, bias=f"{name}.bias" in tensors, pre_quant_scale=f"{name}.pre_quant_scale" in tensors,
                             device="meta")
        elif kind == "int8-embedding":
            v, h = old.weight.shape
            _check(f"{name}.weight", tensors, (v, h), where)
            new = Int8Embedding(v, h, device="meta")
        else:  # int8-head, untied
            v, h = old.weight.shape
            _check(f"{name}.weight", tensors, (v, h), where)
            new = Int8Head(None, h, v, device="meta")
            new.table = Int8Embedding(v, h, device="meta")
        setattr(parent, leaf, new)
    embed = model.llm.get_input_embeddings()
    if isinstance(embed, Int8Embedding) and "llm.lm_head" not in kinds and config.llm.tie_word_embeddings:
        model.llm.lm_head = Int8Head(embed)
    return model


def _remap_head(tensors: dict) -> dict:
    """An untied int8 head's tensors live under ``lm_head.table`` in the module tree."""
    out = {}
    for k, v in tensors.items():
        if k.startswith("llm.lm_head.") and not k.startswith("llm.lm_head.table.") and "llm.lm_head.scales" in tensors:
            k = "llm.lm_head.table." + k[len("llm.lm_head."):]
        out[k] = v
    return out


def load_quantized(config, path: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, kernels: bool = True, options: KernelOptions | None = None):
    """The cuda target's weights → an ``NVILAModel`` on ``device`` running the low-bit kernels.

    ``dtype``: the activations' dtype (default bfloat16 on CUDA — tinygemm's — and float32 on CPU).
    ``kernels=False`` runs every quantized layer on its dequantized weights (the fp16 baseline on the same
    numbers); ``options``: the kernel choices a device measurement settles (``KernelOptions``)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - a corrupt file is a bundle problem, said as one
        raise BundleError(f"cannot read {path}: {e}") from e
    return from_tensors(config, tensors, device, dtype, kernels, where=str(path), options=options)


def from_tensors(config, tensors: dict, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 kernels: bool = True, where: str = "cuda target", options: KernelOptions | None = None):
    """``load_quantized`` on tensors already in memory (the layout of ``export/cuda.py``)."""
    from nvila_edge.checkpoint import materialize_buffers

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_quantized(config, tensors, where=where)
    expected = set(model.state_dict())
    tensors = _remap_head(tensors)
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise BundleError(f"{where}: tensors do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    params = dict(model.named_parameters())
    state = {}
    for k, v in tensors.items():
        ref = params[k] if k in params else model.get_buffer(k)
        if tuple(v.shape) != tuple(ref.shape):
            raise BundleError(f"{where}: tensor {k!r} has shape {list(v.shape)}; the config needs {list(ref.shape)}")
        keep = v.dtype in (torch.uint8, torch.int8) or _is_quant_meta(model, k)
        state[k] = (v if keep else v.to(dtype)).to(device)
    model.load_state_dict(state, strict=True, assign=True)
    materialize_buffers(model, device)
    model.eval()
    prepare(model, dtype, kernels, options)
    return model


def _is_quant_meta(model, key: str) -> bool:
    """Scales and amax of quantized modules stay float32 (the kernels cast what they need)."""
    mod, _, _ = key.rpartition(".")
    try:
        return isinstance(model.get_submodule(mod), QUANT_MODULES)
    except AttributeError:
        return False


def prepare(model: nn.Module, dtype: torch.dtype, kernels: bool = True,
            options: KernelOptions | None = None) -> dict[str, int]:
    """Every quantized module to its kernel layout; returns how many run in each mode."""
    modes: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in model.modules():
            if isinstance(m, QUANT_MODULES):
                mode = m.prepare(dtype, kernels, options)
                modes[f"{type(m).__name__}:{mode}"] = modes.get(f"{type(m).__name__}:{mode}", 0) + 1
    seen = set()
    for w in caught:  # one warning per reason, not one per layer
        if str(w.message) not in seen:
            seen.add(str(w.message))
            warnings.warn(w.message, w.category, stacklevel=2)
    model.quant_modes = modes
    model.kernel_options = options or KernelOptions()
    return modes


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every quantized module by a plain one with its dense weights (the same numbers in fp): the
    fp16 baseline on the same weights, and the torch target's layout."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (Int4Linear, Int8Linear)):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.scales.device
                            if isinstance(m, Int4Linear) else m.weight.device)
            with torch.no_grad():
                lin.weight.copy_(m.dequantized_weight())
                if m.bias is not None:
                    lin.bias.copy_(m.bias.float())
        elif isinstance(m, Int8Embedding) and not name.endswith("lm_head.table"):
            lin = nn.Embedding(m.num_embeddings, m.embedding_dim, device=m.weight.device)
            with torch.no_grad():
                lin.weight.copy_(m.weight.float() * m.scales.float()[:, None])
        else:
            continue
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, lin)
    model.__dict__.pop("quant_modes", None)  # plain weights now: not the cuda target's kernels (its label)
    head = getattr(getattr(model, "llm", None), "lm_head", None)
    if isinstance(head, Int8Head):
        if head._tied:
            model.llm.lm_head = nn.Linear(head.source.embedding_dim, head.source.num_embeddings, bias=False,
                                          device=model.llm.get_input_embeddings().weight.device)
            model.llm.lm_head.weight = model.llm.get_input_embeddings().weight
        else:
            t = head.table
            lin = nn.Linear(t.embedding_dim, t.num_embeddings, bias=False, device=t.weight.device)
            with torch.no_grad():
                lin.weight.copy_(t.weight.float() * t.scales.float()[:, None])
            model.llm.lm_head = lin
    return model


__all__ = ["KernelOptions", "cuda_int4_bytes", "inner_k_tiles", "Int4Linear", "Int8Linear", "Int8Embedding", "Int8Head",
           "build_quantized", "load_quantized", "from_tensors", "prepare", "dequantize", "quantized_kinds",
           "int4_kernel_support"]
