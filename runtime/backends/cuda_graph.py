"""CUDA-graph decoding for the torch backend: a static KV cache and one captured decode step.

Eager decoding of a 1.5B Qwen2 on an H100 is bound by kernel launches and Python (~19 ms a token, the GPU
mostly idle). Replaying one captured graph per token removes both. The transformers ``StaticCache`` keeps its
write position in a device tensor, so the captured step appends at the right place; positions come from a
static tensor set before each replay. Prefill runs eagerly on the same cache (``TorchKVCache.prefill``).

A ``GraphDecoder`` is one sequence's ``KVCache`` (the torch backend's ``new_cache`` on CUDA): the model's own
static ``TorchKVCache`` whose ``decode_step`` replays a capture of the very step it would run eagerly
(``nvila_edge.modeling.decoding.decode_one_token``). Each holds its own static cache and graph, so several
conversations decode side by side without copying caches. Its steps return device logits: the torch backend's
sampler reads them there (nothing per token crosses to the host but the sampled id). The same class captures
the W4A16 model of the ``cuda`` target (tinygemm is capturable).
"""

from __future__ import annotations

from nvila_edge.modeling.decoding import TorchKVCache, decode_one_token

MIN_BUCKET = 256


def cache_bucket(positions: int, limit: int) -> int:
    """The static cache's size for a request of ``positions``: the next power of two from 256, at most ``limit``.
    Every decode step attends over the whole static cache (transformers' ``StaticLayer`` masks to its full
    length), so a cache sized to the request, not to the context, is what keeps a token's KV reads small;
    buckets keep the number of distinct sizes (and captured graphs' shapes) few."""
    if positions >= limit:
        return positions  # the context's size (a request over it overflows at prefill, with its message)
    b = MIN_BUCKET
    while b < positions:
        b *= 2
    return min(b, limit)


class GraphDecoder(TorchKVCache):
    def __init__(self, llm, capacity: int):
        import torch

        super().__init__(llm, capacity, static=True)
        self.torch = torch
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.graph = None
        self.logits = None
        self._capture()

    def decode_step(self, token_id: int):
        """One graph replay; the logits (V,) are a view of the graph's static output (read before the next step)."""
        self._reserve(1)
        self.ids.fill_(int(token_id))
        self.pos.fill_(self.length)
        self.graph.replay()
        self.length += 1
        return self.logits[0, -1]

    def _capture(self) -> None:
        torch = self.torch
        start = self.length
        self.ids.fill_(0)
        self.pos.fill_(start)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(s):  # warm-up: allocations happen outside the graph
            for _ in range(2):
                decode_one_token(self.llm, self.cache, self.ids, self.pos)
                self._restore(start)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            self.logits = decode_one_token(self.llm, self.cache, self.ids, self.pos)
        self._restore(start)  # capture records the write position's increment without running it
        self.graph = graph
