"""``GraphDecoder`` (the CUDA-graph decode's static cache) on the CPU with an eager "replay" standing in for
the captured graph: the same static tensors, the same write-position bookkeeping, equal to the dynamic cache
through a truncate, a second prefill and several requests side by side."""

from __future__ import annotations

import torch

from conftest import make_model
from nvila_edge.modeling.decoding import decode_one_token
from nvila_edge.runtime.backends.cuda_graph import GraphDecoder
from nvila_edge.runtime.backends.torch import TorchBackend


class EagerReplay:
    """What replaying the captured step does: the step on the static ids / positions, into the static logits."""

    def __init__(self, dec: GraphDecoder):
        self.dec = dec

    def replay(self):
        with torch.inference_mode():
            d = self.dec
            d.logits.copy_(decode_one_token(d.llm, d.cache, d.ids, d.pos))


def _eager_capture(self: GraphDecoder) -> None:
    start = self.length
    with torch.inference_mode():
        self.logits = decode_one_token(self.llm, self.cache, self.ids, self.pos).clone()
    self._restore(start)  # as after capture: the step's write position is not advanced
    self.graph = EagerReplay(self)


def test_static_cache_with_eager_replay_equals_the_dynamic_cache(tiny_config, monkeypatch):
    monkeypatch.setattr(GraphDecoder, "_capture", _eager_capture)
    torch.manual_seed(0)
    model = make_model(tiny_config).eval()
    be = TorchBackend(model, device="cpu")
    h = tiny_config.llm.hidden_size
    prompts = [torch.randn(1, n, h) * 0.02 for n in (9, 5)]
    static = [GraphDecoder(model.llm, 64) for _ in prompts]
    dynamic = [be.new_cache(64) for _ in prompts]

    def close(a, b, what):
        assert torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-4), (what, float((a - b).abs().max()))

    for s, d, p in zip(static, dynamic, prompts):  # several requests, each its own cache
        close(s.prefill(p), be.prefill(p, d), "prefill")
    toks = [[3, 7, 11, 2], [5, 1, 8, 4]]
    for step in range(4):  # interleaved: one request's steps never touch the other's cache
        for i, (s, d) in enumerate(zip(static, dynamic)):
            close(s.decode_step(toks[i][step]), be.decode_step(toks[i][step], d), f"decode {i}.{step}")
    for s, d in zip(static, dynamic):
        assert s.length == d.length
        s.truncate(s.length - 3), d.truncate(d.length - 3)  # a stale tail, masked then overwritten
        close(s.decode_step(9), be.decode_step(9, d), "after truncate")
        more = torch.randn(1, 4, h) * 0.02
        close(s.prefill(more), be.prefill(more, d), "second prefill")
        close(s.decode_step(6), be.decode_step(6, d), "decode after the second prefill")
        assert s.length == d.length


def test_static_cache_is_sized_to_the_request_in_buckets():
    from nvila_edge.runtime.backends.cuda_graph import cache_bucket

    assert [cache_bucket(n, 8192) for n in (1, 256, 257, 600, 5000, 8192)] == [256, 256, 512, 1024, 8192, 8192]
    assert cache_bucket(300, 400) == 400 and cache_bucket(9000, 8192) == 9000
