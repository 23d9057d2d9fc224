"""The CUDA branch of the cuda target, verified on the CPU (no GPU here): tinygemm's CUDA weight layout
emulated in numpy from int4mm.cu against what ``Int4Linear.prepare`` feeds the CUDA converter; the decode
step traced on FakeTensorMode with a ``cuda`` device (no host sync, no CPU tensor); the kernel choices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nvila_edge import quant_format as QF
from nvila_edge.modeling import quantized as Q
from nvila_edge.pipelines.bench.gpu import random_quantized_tensors


# ---- tinygemm's CUDA int4 layout, transcribed from aten/src/ATen/native/cuda/int4mm.cu ------------------------
def emulate_convert(inp: np.ndarray, inner: int) -> np.ndarray:
    """``_convert_weight_to_int4pack_cuda`` on uint8 (N, K/2): int32 [N/8][K/(inner*16)][32][inner/2]. Lane t of
    n-tile nt loads row nt*8 + t/4 and, per pair of k-tiles, bytes kb + t%4, +4 (first k-tile) and kb + 8 + t%4,
    +4 (second): the m16n8k16 mma B fragment. The high nibbles of the four bytes fill the low 16 bits."""
    n, kh = inp.shape
    out = np.zeros((-(-n // 8), kh * 2 // (inner * 16), 32, inner // 2), dtype=np.uint32)
    for nt in range(out.shape[0]):
        for ko in range(out.shape[1]):
            for t in range(32):
                n0 = nt * 8 + t // 4
                for j in range(0, inner, 2):
                    kb = (ko * inner + j) * 8
                    ks = [kb + t % 4, kb + t % 4 + 4, kb + 8 + t % 4, kb + 8 + t % 4 + 4]
                    v = [int(inp[n0, i]) if n0 < n and i < kh else 0 for i in ks]
                    pack = 0
                    for i in range(4):
                        pack |= ((v[i] & 0xF0) >> 4) << (4 * i)  # high nibbles: bits 0-15
                        pack |= (v[i] & 0x0F) << (16 + 4 * i)  # low nibbles: bits 16-31
                    out[nt, ko, t, j // 2] = pack
    return out


def emulate_weight(packed: np.ndarray, sz: np.ndarray, n: int, k: int, group: int) -> np.ndarray:
    """The (N, K) bf16-exact weight the mma reads: each lane's fields decoded back to (n, k), the code
    recovered as the bf16 trick does (bf16(128 + q) - 136 = q - 8), then (q - 8) * scale + zero per group."""
    q = np.full((n, k), -1, dtype=np.int64)
    inner = packed.shape[3] * 2
    for nt in range(packed.shape[0]):
        for ko in range(packed.shape[1]):
            for t in range(32):
                n0 = nt * 8 + t // 4
                for j in range(0, inner, 2):
                    word = int(packed[nt, ko, t, j // 2])
                    kb = (ko * inner + j) * 8
                    ks = [kb + t % 4, kb + t % 4 + 4, kb + 8 + t % 4, kb + 8 + t % 4 + 4]
                    for i, b in enumerate(ks):
                        if n0 < n and 2 * b < k:  # the byte's high nibble is k = 2b, its low nibble 2b + 1
                            q[n0, 2 * b] = (word >> (4 * i)) & 0xF
                            q[n0, 2 * b + 1] = (word >> (16 + 4 * i)) & 0xF
    assert (q >= 0).all(), "every weight is reached by exactly the lanes above"
    code = (np.float32(128.0) + q).astype(np.float32) - np.float32(136.0)
    g = np.arange(k) // group
    return code * sz[g, :, 0].T + sz[g, :, 1].T


@pytest.mark.parametrize("n,k,group", [(8, 64, 32), (24, 128, 64), (16, 256, 128), (40, 384, 128), (8, 512, 256)])
def test_cuda_branch_layout_reproduces_the_portable_weight(n, k, group):
    torch.manual_seed(n + k)
    codes = torch.randint(-8, 8, (n, k))
    qweight = QF.pack_int4(codes)
    scales = torch.rand(n, k // group) * 0.1 + 0.01
    inner = Q.inner_k_tiles(k)
    assert inner in (2, 4, 8) and k % (inner * 16) == 0
    for t in {inner, *[x for x in (2, 4, 8) if k % (x * 16) == 0]}:  # every inner_k_tiles that fits K
        packed = emulate_convert(Q.cuda_int4_bytes(qweight).numpy(), t)
        sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], -1).numpy()  # prepare's [K/g, N, 2]
        w = emulate_weight(packed, sz, n, k, group)
        np.testing.assert_allclose(w, QF.dequantize_int4(qweight, scales).numpy(), rtol=0, atol=1e-6)


def test_unswapped_bytes_would_give_other_weights():
    """The nibble swap is what makes the layout right: the portable bytes fed as they are decode wrong."""
    codes = torch.randint(-8, 8, (8, 64), generator=torch.Generator().manual_seed(1))
    qweight, scales = QF.pack_int4(codes), torch.ones(8, 2)
    sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], -1).numpy()
    w = emulate_weight(emulate_convert(qweight.numpy(), 2), sz, 8, 64, 32)
    assert not np.allclose(w, codes.float().numpy())


def test_kernel_alternatives_compute_the_same_numbers():
    """``KernelOptions``' alternatives (what the device check times) differ in speed only."""
    g = torch.Generator().manual_seed(0)
    lin = Q.Int4Linear(256, 64, 128)
    lin.qweight.copy_(QF.pack_int4(torch.randint(-8, 8, (64, 256), generator=g)))
    lin.scales.copy_(torch.rand(64, 2, generator=g) * 0.05)
    x = torch.randn(80, 256, generator=g, dtype=torch.bfloat16)
    assert lin.prepare(torch.bfloat16, options=Q.KernelOptions(int4_dense_min_m=1 << 30)) == "int4"
    tiny = lin(x).float()
    assert lin.prepare(torch.bfloat16, options=Q.KernelOptions(int4_dense_min_m=64)) == "int4"
    cublas, small = lin(x).float(), lin(x[:3]).float()  # 80 rows: dequantized + F.linear; 3 rows: tinygemm
    assert torch.allclose(cublas, tiny, atol=2e-2 * float(tiny.abs().max())) and torch.allclose(small, tiny[:3])
    table = Q.Int8Embedding(300, 64)
    table.weight.copy_(torch.randint(-127, 128, (300, 64), generator=g, dtype=torch.int8))
    table.scales.copy_(torch.rand(300, generator=g) * 0.01)
    head, h = Q.Int8Head(table), torch.randn(2, 64, generator=g, dtype=torch.bfloat16)
    outs = {}
    for choice in ("dense", "int8pack"):
        mode = head.prepare(torch.bfloat16, options=Q.KernelOptions(head=choice))
        outs[mode] = head(h).float()
    assert set(outs) == {"dense", "int8"} and torch.allclose(outs["dense"], outs["int8"], atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="KernelOptions"):
        Q.KernelOptions(head="fast").resolve(torch.device("cpu"))
    assert Q.KernelOptions().resolve(torch.device("cuda")) == Q.KernelOptions("dense", "compile", 64)


def test_dequantized_model_is_not_labelled_as_the_cuda_target(tiny_config):
    from conftest import make_model
    from nvila_edge.runtime.backends.torch import TorchBackend

    model = make_model(tiny_config)
    q = Q.from_tensors(tiny_config, random_quantized_tensors(model, group_size=32))
    assert TorchBackend(q, device="cpu").describe()["target"] == "cuda"
    plain = TorchBackend(Q.dequantize(q), device="cpu").describe()
    assert plain["target"] == "torch" and "kernels" not in plain
