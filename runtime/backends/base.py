"""The one small interface every runtime backend implements (numpy in, numpy out), and the KV cache it fills.

Device-resident path: the Runtime itself calls ``encode`` → ``prompt_embeds`` → ``prefill_logits`` /
``decode_logits`` → ``sampler(params)``. Their values are opaque (numpy for ONNX Runtime, device tensors for
the torch backend on CUDA): the Runtime only hands them back to the same backend and reads ``.shape``, so
features, embeddings, the KV cache and the logits never cross to the host; a token costs one decode step and
one small copy (the sampled id). The defaults below are the numpy path.

The caller owns the cache: ``cache = backend.new_cache(capacity)``, then ``backend.prefill(embeds, cache)``
and ``backend.decode_step(token, cache)`` append to it. A chat session keeps its own cache turn after turn
(``cache.truncate`` rolls it back to re-align with the canonical tokenization of the last answer), a request
or an agent takes one for its answer, and no call can spoil another's cache. Where the backend runs on a
GPU the cache lives there.

``cache=None`` uses the backend's own default cache (``default_cache``; ``cache_length`` / ``truncate`` /
``reset`` act on it): the single-cache API of 0.1, kept for scripts and benchmarks that drive a backend
directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from nvila_edge.config import NVILAConfig


def tile_batch(config: NVILAConfig, device: str) -> int:
    """Tiles per vision run. On a GPU, batches bounded by activation memory (like torch); on a CPU one tile per run:
    as fast per tile and a fraction of the memory (448² SigLIP-400M, 2-core AMD EPYC, 2026-12-07: 1 506 vs 1 603
    ms / tile at batch 8 on OpenVINO, 2 498 vs 2 919 on ONNX Runtime, whose batch-8 attention scores alone are
    0.5 GB)."""
    return max(1, 8192 // (config.vision.grid ** 2)) if device == "cuda" else 1


def encode_in_batches(vision, pixels: np.ndarray, batch: int) -> np.ndarray:
    """``vision`` (a callable float32 tiles → features) over ``pixels`` ``batch`` tiles at a time."""
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    outs = [vision(pixels[s:s + batch]) for s in range(0, pixels.shape[0], batch)]
    return np.concatenate(outs).astype(np.float32, copy=False)


class KVCache(ABC):
    """Positions one sequence holds in a backend's KV cache. Made by ``Backend.new_cache``; each backend
    subclasses it with its own storage (ONNX Runtime buffers, a transformers cache, a CUDA static cache)."""

    capacity: int  # positions it can hold (a backend may grow it up to its max_length)
    length: int = 0  # positions held

    @abstractmethod
    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` positions (the rest is overwritten by later steps)."""

    def clear(self) -> None:
        self.truncate(0)

    def __len__(self) -> int:
        return self.length


class Backend(ABC):
    name: str = "base"
    config: NVILAConfig
    device: str = "cpu"

    # ---- vision --------------------------------------------------------------------------------------
    @abstractmethod
    def encode_tiles(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 tiles → (N, g*g, C) float32 SigLIP features (``hidden_states[select_layer]``)."""

    @abstractmethod
    def project(self, features: np.ndarray) -> np.ndarray:
        """(B, g*g, C_in) → (B, t*t, H) float32: the multimodal projector."""

    # ---- LLM -----------------------------------------------------------------------------------------
    @abstractmethod
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 token ids → (n, H) float32 input embeddings."""

    @abstractmethod
    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty KV cache for one sequence of up to ``capacity`` positions (default: what the engine holds)."""

    @abstractmethod
    def prefill(self, embeds: np.ndarray, cache: KVCache | None = None) -> np.ndarray:
        """Append (1, L, H) embeddings to ``cache``; return the last position's logits (V,) float32."""

    @abstractmethod
    def decode_step(self, token_id: int, cache: KVCache | None = None) -> np.ndarray:
        """Append one token to ``cache``; return its logits (V,) float32."""

    # ---- the device-resident path (opaque values; the numpy path by default) ---------------------------
    def encode(self, pixels: np.ndarray):
        """Tiles → vision features in the backend's own array type (``encode_tiles`` by default)."""
        return self.encode_tiles(pixels)

    def prompt_embeds(self, input_ids: np.ndarray, media, features, end: np.ndarray):
        """Prompt ids + media features → (1, L', H) embeddings (Dynamic-S2 merge, TSP, splicing)."""
        from nvila_edge import visual

        if features is not None and not isinstance(features, np.ndarray):
            features = np.asarray(features)
        chunks = visual.embed_media(features, media, self.config, self.project, end)
        return visual.embed_inputs(input_ids, chunks, self.config, self.embed_tokens)

    def prefill_logits(self, embeds, cache: KVCache | None = None):
        """``prefill`` returning logits in the backend's own array type (what ``sampler`` reads)."""
        return self.prefill(embeds, cache)

    def decode_logits(self, token_id: int, cache: KVCache | None = None):
        return self.decode_step(token_id, cache)

    def sampler(self, params):
        """The token picker for this backend's logits (numpy ``Sampler`` by default)."""
        from nvila_edge.sampling import Sampler

        return Sampler(params)

    # ---- the default cache (``cache=None``) ----------------------------------------------------------
    @property
    def default_cache(self) -> KVCache:
        cache = self.__dict__.get("_default_cache")
        if cache is None:
            cache = self.__dict__["_default_cache"] = self.new_cache()
        return cache

    def _cache(self, cache: KVCache | None) -> KVCache:
        return self.default_cache if cache is None else cache

    @property
    def cache_length(self) -> int:
        """Positions held in the default cache."""
        return self.default_cache.length

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` positions of the default cache."""
        self.default_cache.truncate(length)

    def reset(self) -> None:
        """Empty the default cache."""
        self.default_cache.clear()

    @property
    def max_length(self) -> int:
        """Longest sequence (prompt + answer) the engine holds."""
        return self.config.llm.context_length

    def describe(self) -> dict:
        """What runs where, for logs, ``bench`` and the CLI banner."""
        return {"backend": self.name, "device": self.device}

    def close(self) -> None:
        """Release engines / sessions (optional)."""


def check_embeds(embeds: np.ndarray, hidden: int) -> np.ndarray:
    """Validate a prefill input once, for every backend: (1, L, H) float32, L >= 1."""
    embeds = np.asarray(embeds)
    if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != hidden or embeds.shape[1] < 1:
        raise ValueError(f"prefill needs embeddings of shape (1, L>=1, {hidden}), got {embeds.shape}")
    return np.ascontiguousarray(embeds, dtype=np.float32)
