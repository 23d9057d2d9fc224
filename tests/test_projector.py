"""Projector: reference state-dict keys / shapes and the space-to-channel math."""

from __future__ import annotations

import pytest
import torch

from nvila_edge import NVILAConfig
from nvila_edge.modeling.projector import MultimodalProjector, SpaceToChannel


def reference_flat_square(x: torch.Tensor, k: int) -> torch.Tensor:
    """Transcription of the reference flat_square_{2x2,3x3}: pad dims 1 and 2, view/permute twice."""
    n, w, h, c = x.size()
    if w % k:
        x = torch.cat([x, torch.zeros((n, k - w % k, h, c), dtype=x.dtype)], dim=1)
        n, w, h, c = x.size()
    if h % k:
        x = torch.cat([x, torch.zeros((n, w, k - h % k, c), dtype=x.dtype)], dim=2)
        n, w, h, c = x.size()
    x = x.contiguous().view(n, w, h // k, c * k).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, h // k, w // k, c * k * k).permute(0, 2, 1, 3).contiguous()
    return x


@pytest.mark.parametrize("k,side", [(2, 32), (2, 31), (3, 32), (3, 33), (3, 4)])
def test_space_to_channel_matches_reference(k, side):
    x = torch.randn(2, side * side, 5)
    ours = SpaceToChannel(k)(x)
    ref = reference_flat_square(x.reshape(2, side, side, 5), k)
    assert ours.shape == (2, ref.shape[1] * ref.shape[2], 5 * k * k)
    torch.testing.assert_close(ours, ref.reshape(2, -1, 5 * k * k), rtol=0, atol=0)


def test_space_to_channel_block_order():
    # token (r, c) of a 4x4 map holds value 10*r + c; block (0, 0) must be [00, 01, 10, 11]
    vals = torch.tensor([[10.0 * r + c for c in range(4)] for r in range(4)]).reshape(1, 16, 1)
    out = SpaceToChannel(2)(vals)
    assert out[0, 0].tolist() == [0.0, 1.0, 10.0, 11.0]
    assert out[0, 1].tolist() == [2.0, 3.0, 12.0, 13.0]
    assert out[0, 2].tolist() == [20.0, 21.0, 30.0, 31.0]


def _shapes(cfg):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MultimodalProjector(cfg).state_dict().items()}


def test_projector_keys_2x2_real_size():
    shapes = _shapes(NVILAConfig.from_preset("nvila-8b"))
    assert shapes == {
        "layers.1.weight": (13824,), "layers.1.bias": (13824,),
        "layers.2.weight": (3584, 13824), "layers.2.bias": (3584,),
        "layers.4.weight": (3584, 3584), "layers.4.bias": (3584,),
    }


def test_projector_keys_3x3_real_size():
    shapes = _shapes(NVILAConfig.from_preset("nvila-lite-2b"))
    assert shapes == {
        "layers.1.weight": (10368,), "layers.1.bias": (10368,),
        "layers.2.weight": (3456, 10368), "layers.2.bias": (3456,),
        "layers.4.weight": (3456,), "layers.4.bias": (3456,),
        "layers.5.weight": (1536, 3456), "layers.5.bias": (1536,),
        "layers.7.weight": (1536, 1536), "layers.7.bias": (1536,),
    }


@pytest.mark.parametrize("preset,tokens", [("tiny", 256), ("tiny-lite", 121)])
def test_projector_token_count(preset, tokens):
    cfg = NVILAConfig.from_preset(preset)
    out = MultimodalProjector(cfg)(torch.randn(3, 1024, cfg.mm_hidden_size))
    assert out.shape == (3, tokens, cfg.llm.hidden_size)
    assert cfg.tokens_per_tile == tokens
