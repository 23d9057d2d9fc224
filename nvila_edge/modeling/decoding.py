"""The one torch implementation of a generation step (gpt-fast's ``prefill`` / ``decode_one_token``), shared by
``NVILAModel``, the runtime's torch backend and its CUDA-graph decoder (``runtime/backends/cuda_graph.py``).

``TorchKVCache`` is one sequence's transformers cache and its length: dynamic (``DynamicCache``, grows as it
goes) or static (``StaticCache``, preallocated: what a captured CUDA graph needs, its write position a device
tensor). Both steps pass explicit positions, so a prompt appended after cached positions is placed right.
Logits stay on the model's device; the caller reads them there (the torch backend's sampler) or copies them.
"""

from __future__ import annotations

import torch

from ..errors import GenerationError
from ..kv_cache import KVCache


def forward(llm, cache, position_ids: torch.Tensor, **inputs) -> torch.Tensor:
    """The LLM on ``inputs`` (``input_ids`` or ``inputs_embeds``) after what ``cache`` holds: (1, 1, V) logits of
    the last position (the LM head runs on that position only)."""
    return llm(cache=cache, position_ids=position_ids, use_cache=True, logits_to_keep=1, **inputs).logits


def decode_one_token(llm, cache, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """One token (1, 1) at ``position_ids`` (1, 1) → (1, 1, V) logits: tensors in and out, so CUDA graphs
    capture exactly this call."""
    return forward(llm, cache, position_ids, input_ids=input_ids)


class TorchKVCache(KVCache):
    """One sequence's transformers cache for ``llm`` (a ``Qwen2ForCausalLM``), ``capacity`` positions."""

    def __init__(self, llm, capacity: int, static: bool = False):
        from transformers import DynamicCache, StaticCache

        self.llm, self.capacity, self.static, self.length = llm, int(capacity), static, 0
        self.device = next(llm.parameters()).device
        self._new = (lambda: StaticCache(config=llm.config, max_cache_len=self.capacity)) if static else \
            (lambda: DynamicCache(config=llm.config))
        self.cache = self._new()

    def _reserve(self, n: int) -> None:
        if self.length + n > self.capacity:
            raise GenerationError(f"{self.length + n} positions exceed this KV cache's {self.capacity}; make a larger "
                                  "one (new_cache(capacity)) or start a new conversation")

    def _positions(self, n: int) -> torch.Tensor:
        return torch.arange(self.length, self.length + n, device=self.device)[None]

    # ---- steps ---------------------------------------------------------------------------------------
    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """Append (1, L, H) embeddings; the last position's logits (V,), on the device."""
        n = int(embeds.shape[1])
        self._reserve(n)
        try:
            with torch.inference_mode():
                logits = forward(self.llm, self.cache, self._positions(n), inputs_embeds=embeds)
        except BaseException:
            self._restore(self.length)  # a prefill that failed halfway: some layers appended, others not
            raise
        self.length += n
        return logits[0, -1]

    def decode_step(self, token_id: int) -> torch.Tensor:
        """Append one token; its logits (V,), on the device."""
        self._reserve(1)
        ids = torch.tensor([[int(token_id)]], device=self.device)
        with torch.inference_mode():
            logits = decode_one_token(self.llm, self.cache, ids, self._positions(1))
        self.length += 1
        return logits[0, -1]

    # ---- bookkeeping ---------------------------------------------------------------------------------
    def truncate(self, length: int) -> None:
        self._restore(max(0, min(int(length), self.length)))

    def _restore(self, length: int) -> None:
        """Every layer back to ``length`` positions."""
        if length == 0 and not self.static:
            self.cache = self._new()
        with torch.inference_mode():  # the cache's tensors were made in inference mode
            for layer in self.cache.layers:
                if self.static:
                    if getattr(layer, "is_initialized", False):
                        layer.cumulative_length.fill_(length)  # in place: a captured graph holds its address
                else:
                    extra = layer.get_seq_length() - length
                    if extra > 0:
                        layer.crop(-extra)  # transformers 5: a negative count removes that many positions
        self.length = length


__all__ = ["TorchKVCache", "decode_one_token", "forward"]
