"""``KVCache``: the positions one sequence holds in an engine's KV cache, owned by its caller.

Every generation step takes one: ``cache = engine.new_cache(capacity)``, then ``engine.prefill(embeds, cache)``
and ``engine.decode_step(token, cache)`` append to it (the runtime backends and ``NVILAModel`` alike). The cache
itself says how long it is and rolls back (``truncate``): a chat session re-aligns with the canonical
tokenization of its last answer that way. Torch-free: each engine subclasses it with its own storage (ONNX
Runtime buffers, an OpenVINO infer request, a transformers cache, a CUDA static cache with its graph).
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class KVCache(ABC):
    capacity: int  # positions it can hold (an engine may grow it up to its max_length)
    length: int = 0  # positions held

    @abstractmethod
    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` positions (the rest is overwritten by later steps)."""

    def clear(self) -> None:
        self.truncate(0)

    def __len__(self) -> int:
        return self.length


__all__ = ["KVCache"]
