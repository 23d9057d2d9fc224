"""ORT backend's second KV mode: a decoder whose present = past + new (no shared buffer), with position_ids
and full-length logits, as a plain HF-style export has. A toy one-layer attention model exported here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nvila_edge import NVILAConfig
from nvila_edge.runtime.backends.onnxruntime import OrtBackend

pytest.importorskip("onnxruntime")
H, D, V, MAX = 128, 16, 50, 64


class ToyDecoder(nn.Module):
    """One causal attention head with explicit past K/V; positions enter through a learned table."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Embedding(MAX, H)
        self.qkv = nn.Linear(H, 3 * D)
        self.out = nn.Linear(D, V)

    def forward(self, inputs_embeds, attention_mask, position_ids, past_k, past_v):
        x = inputs_embeds + self.pos(position_ids)
        q, k, v = self.qkv(x).split(D, dim=-1)
        k = torch.cat([past_k, k[:, None]], dim=2)
        v = torch.cat([past_v, v[:, None]], dim=2)
        n, total = q.shape[1], k.shape[2]
        scores = q[:, None] @ k.transpose(-1, -2) / D ** 0.5  # (1, 1, n, total)
        i = torch.arange(n)[:, None] + (total - n)
        causal = torch.arange(total)[None, :] <= i
        scores = scores.masked_fill(~causal, -1e9) + (1.0 - attention_mask[:, None, None, :].float()) * -1e9
        h = (scores.softmax(-1) @ v)[:, 0]
        return self.out(h), k, v


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    model = ToyDecoder().eval()
    path = tmp_path_factory.mktemp("toy") / "decoder.onnx"
    ex = (torch.randn(1, 3, H), torch.ones(1, 5, dtype=torch.long), torch.arange(2, 5)[None],
          torch.randn(1, 1, 2, D), torch.randn(1, 1, 2, D))
    names = ["inputs_embeds", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value"]
    outs = ["logits", "present.0.key", "present.0.value"]
    axes = {"inputs_embeds": {1: "L"}, "attention_mask": {1: "T"}, "position_ids": {1: "L"},
            "past_key_values.0.key": {2: "P"}, "past_key_values.0.value": {2: "P"},
            "logits": {1: "L"}, "present.0.key": {2: "T"}, "present.0.value": {2: "T"}}
    with torch.no_grad():
        torch.onnx.export(model, ex, str(path), input_names=names, output_names=outs, dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    io = {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask", "position_ids": "position_ids",
          "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
          "present_key": "present.{i}.key", "present_value": "present.{i}.value", "logits": "logits",
          "num_layers": 1, "num_kv_heads": 1, "head_dim": D, "kv_dtype": "float32",
          "past_present_share_buffer": False, "max_length": MAX, "vocab_size": V}
    table = np.random.default_rng(0).standard_normal((V, H)).astype(np.float32)
    be = OrtBackend(NVILAConfig.from_preset("tiny"), None, None, path, lambda ids: table[ids], io, threads=1)
    return model, be, table


def _reference(model, embeds):
    """Last-position logits of the whole sequence, no cache."""
    n = embeds.shape[1]
    with torch.no_grad():
        logits, _, _ = model(torch.from_numpy(embeds), torch.ones(1, n, dtype=torch.long), torch.arange(n)[None],
                             torch.zeros(1, 1, 0, D), torch.zeros(1, 1, 0, D))
    return logits[0, -1].numpy()


def test_present_to_past_decoding_matches_full_recompute(toy):
    model, be, table = toy
    cache = be.new_cache()
    assert be.describe()["kv"] == "present→past"
    seq = table[[1, 2, 3, 4, 5]][None]
    np.testing.assert_allclose(be.prefill(seq, cache), _reference(model, seq), atol=1e-5)
    more = table[[6, 7]][None]  # a second prefill on top of the cache (a session turn)
    seq = np.concatenate([seq, more], axis=1)
    np.testing.assert_allclose(be.prefill(more, cache), _reference(model, seq), atol=1e-5)
    for tok in (8, 9):
        seq = np.concatenate([seq, table[[tok]][None]], axis=1)
        np.testing.assert_allclose(be.decode_step(tok, cache), _reference(model, seq), atol=1e-5)
    assert cache.length == 9
    cache.truncate(4)  # roll back: the kept past is copied into fresh inputs
    seq = np.concatenate([seq[:, :4], table[[10]][None]], axis=1)
    np.testing.assert_allclose(be.decode_step(10, cache), _reference(model, seq), atol=1e-5)
    assert cache.length == 5


def test_caller_owned_caches_interleave(toy):
    """Two caches on one backend, stepped in turn: each sees only its own sequence (both KV modes share
    this code path: the cache holds its buffers and its own IOBinding)."""
    model, be, table = toy
    a, b = be.new_cache(), be.new_cache()
    sa, sb = table[[1, 2, 3]][None], table[[4, 5]][None]
    np.testing.assert_allclose(be.prefill(sa, a), _reference(model, sa), atol=1e-5)
    np.testing.assert_allclose(be.prefill(sb, b), _reference(model, sb), atol=1e-5)
    for ta, tb in ((6, 7), (8, 9)):
        sa = np.concatenate([sa, table[[ta]][None]], axis=1)
        sb = np.concatenate([sb, table[[tb]][None]], axis=1)
        np.testing.assert_allclose(be.decode_step(ta, a), _reference(model, sa), atol=1e-5)
        np.testing.assert_allclose(be.decode_step(tb, b), _reference(model, sb), atol=1e-5)
    assert (a.length, b.length) == (5, 4)
    a.clear()
    assert a.length == 0 and b.length == 4
