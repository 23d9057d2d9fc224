"""Torch reference generation: explicit ``prefill`` then ``decode_step`` with the transformers KV cache,
yielding typed events. The loop itself lives in the torch-free ``nvila_edge.generation`` (the runtime
backends use it too); re-exported here for existing imports."""

from __future__ import annotations

from ..generation import stream_tokens

__all__ = ["stream_tokens"]
