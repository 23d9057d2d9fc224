"""The one step API every runtime backend implements, and the helpers the CPU backends share.

    cache = backend.new_cache(capacity)            # the caller's own KV cache (nvila_edge.kv_cache.KVCache)
    feats = backend.encode_tiles(pixels)           # vision features
    embeds = backend.prompt_embeds(ids, media, feats, end)
    logits = backend.prefill(embeds, cache)        # the prompt's last position
    logits = backend.decode_step(token, cache)     # one more token
    token = backend.sampler(params)(logits, previous)

Values are native to the backend (numpy for ONNX Runtime / OpenVINO, device tensors for the torch backend on
CUDA): the Runtime only hands them back to the same backend and reads ``.shape``, so features, embeddings, the
KV cache and the logits never cross to the host; a token costs one decode step and one small copy (the sampled
id). ``to_numpy`` copies a native value to the host where a caller needs numpy (video streams, tests, the bench).
``project`` and ``embed_tokens`` are numpy in, numpy out (the torch-free ``nvila_edge.visual`` path).

The caller owns the cache and every step needs one: a chat session keeps its own turn after turn
(``cache.truncate`` rolls it back to re-align with the canonical tokenization of the last answer), a request
or an agent takes one for its answer, and no call can spoil another's cache. Where the backend runs on a GPU
the cache lives there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from nvila_edge.config import NVILAConfig
from nvila_edge.kv_cache import KVCache


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


class Backend(ABC):
    name: str = "base"
    config: NVILAConfig
    device: str = "cpu"

    # ---- vision --------------------------------------------------------------------------------------
    @abstractmethod
    def encode_tiles(self, pixels: np.ndarray):
        """(N, 3, S, S) float32 tiles → (N, g*g, C) SigLIP features (``hidden_states[select_layer]``), native."""

    @abstractmethod
    def project(self, features: np.ndarray) -> np.ndarray:
        """(B, g*g, C_in) → (B, t*t, H) float32: the multimodal projector."""

    # ---- LLM -----------------------------------------------------------------------------------------
    @abstractmethod
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 token ids → (n, H) float32 input embeddings."""

    def prompt_embeds(self, input_ids: np.ndarray, media, features, end: np.ndarray):
        """Prompt ids + media features → (1, L', H) embeddings (Dynamic-S2 merge, TSP, splicing), native."""
        from nvila_edge import visual

        features = None if features is None else self.to_numpy(features)
        chunks = visual.embed_media(features, media, self.config, self.project, end)
        return visual.embed_inputs(input_ids, chunks, self.config, self.embed_tokens)

    @abstractmethod
    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty KV cache for one sequence of up to ``capacity`` positions (default: what the engine holds)."""

    @abstractmethod
    def prefill(self, embeds, cache: KVCache):
        """Append (1, L, H) embeddings to ``cache``; the last position's logits (V,), native."""

    @abstractmethod
    def decode_step(self, token_id: int, cache: KVCache):
        """Append one token to ``cache``; its logits (V,), native."""

    def sampler(self, params):
        """The token picker for this backend's logits (numpy ``Sampler`` by default)."""
        from nvila_edge.sampling import Sampler

        return Sampler(params)

    def to_numpy(self, value) -> np.ndarray:
        """A native value (features, embeddings, logits) as a host float32 array."""
        return np.asarray(value, dtype=np.float32)

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
