"""nvila_edge.quant_format: the int4 nibble order, ModelOpt's scale rule and its zero threshold, the same on numpy
and torch; importable without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from nvila_edge import quant_format as qf


def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.randint(-8, 8, (24, 256))
    packed = qf.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 128)
    assert torch.equal(qf.unpack_int4(packed).long(), codes)
    assert int(packed[0, 0]) == int(codes[0, 0] + 8) | (int(codes[0, 1] + 8) << 4)  # low nibble = even k
    q = (codes.numpy() + 8).astype(np.uint8)
    assert np.array_equal(qf.pack_nibbles(q), packed.numpy())  # numpy (MatMulNBits) and torch: the same bytes


def test_scale_rule_and_zero_threshold():
    amax = np.array([7.0, 0.0, 2.0 ** -25, 1e-3], np.float32)
    np.testing.assert_allclose(qf.symmetric_scale(amax, qf.INT4_MAX), [1.0, 1.0, 1.0, 1e-3 / 7], rtol=1e-6)
    assert torch.equal(qf.symmetric_scale(torch.from_numpy(amax), qf.INT4_MAX), torch.from_numpy(
        qf.symmetric_scale(amax, qf.INT4_MAX)))
    w = torch.tensor([[0.7, -0.35, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]])
    codes, scales = qf.quantize_int4_groups(w, 4)
    assert codes.tolist() == [[7, -4, 0, 1], [0, 0, 0, 0]]
    np.testing.assert_allclose(scales.numpy(), [[0.1], [1.0]], rtol=1e-6)
    q8, s8 = qf.quantize_int8_rows(w, chunk=1)
    assert q8[0].tolist() == [127, -64, 0, 18] and s8[1] == 1.0 and not q8[1].any()


def test_imports_without_torch():
    code = "import sys; import nvila_edge.quant_format as q; assert 'torch' not in sys.modules; print(q.ZERO_AMAX)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
