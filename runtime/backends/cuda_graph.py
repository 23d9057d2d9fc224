"""CUDA-graph decoding for the torch backend: a static KV cache and one captured decode step.

Eager decoding of a 1.5B Qwen2 on an H100 is bound by kernel launches and Python (~19 ms a token, the GPU
mostly idle). Replaying one captured graph per token removes both. The transformers ``StaticCache``
keeps its write position in a device tensor, so the captured step appends at the right place; positions
come from a static tensor set before each replay. Prefill runs eagerly on the same cache.

A ``GraphDecoder`` is one sequence's ``KVCache`` (the torch backend's ``new_cache`` on CUDA): each holds its
own static cache and graph, so several conversations decode side by side without copying caches. Its steps
return device logits: the torch backend's sampler reads them there (nothing per token crosses to the host
but the sampled id). The same class captures the W4A16 model of the ``cuda`` target (tinygemm is capturable).
"""

from __future__ import annotations

from .base import KVCache

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


class GraphDecoder(KVCache):
    def __init__(self, llm, capacity: int):
        import torch
        from transformers import StaticCache

        self.torch, self.llm = torch, llm
        self.device = next(llm.parameters()).device
        self.capacity = int(capacity)
        self.cache = StaticCache(config=llm.config, max_cache_len=self.capacity)
        self.length = 0
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.graph = None
        self.logits = None

    # ---- cache bookkeeping ---------------------------------------------------------------------------
    def _set_length(self, n: int) -> None:
        with self.torch.inference_mode():  # the cache's tensors were made in inference mode
            for layer in self.cache.layers:
                if getattr(layer, "is_initialized", False):
                    layer.cumulative_length.fill_(n)  # in place: the captured graph holds its address
        self.length = n

    def truncate(self, n: int) -> None:
        self._set_length(max(0, min(int(n), self.length)))  # stale entries beyond are masked, then overwritten

    def _forward(self, **kw):
        return self.llm(cache=self.cache, use_cache=True, logits_to_keep=1, **kw).logits

    # ---- steps ---------------------------------------------------------------------------------------
    def prefill(self, embeds):
        """Append (1, L, H) device embeddings; the last position's logits (V,), on the device."""
        torch = self.torch
        n = embeds.shape[1]
        if self.length + n > self.capacity:
            raise OverflowError(f"{self.length + n} positions exceed the static cache of {self.capacity}")
        pos = torch.arange(self.length, self.length + n, device=self.device)[None]
        with torch.inference_mode():
            logits = self._forward(inputs_embeds=embeds, position_ids=pos)
        self.length += n
        return logits[0, -1]

    def decode_step(self, token_id: int):
        """One graph replay; the logits (V,) are a view of the graph's static output (read before the next step)."""
        if self.length + 1 > self.capacity:
            raise OverflowError(f"{self.length + 1} positions exceed the static cache of {self.capacity}")
        if self.graph is None:
            self._capture()
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
                self._forward(input_ids=self.ids, position_ids=self.pos)
                self._set_length(start)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            self.logits = self._forward(input_ids=self.ids, position_ids=self.pos)
        self._set_length(start)  # capture records the write position's increment without running it
        self.graph = graph
