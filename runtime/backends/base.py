"""The one small interface every runtime backend implements (numpy in, numpy out).

A backend owns one KV cache. ``prefill`` and ``decode_step`` append to it, so a chat session extends the
same cache turn after turn; ``truncate`` rolls it back (a session re-aligns it with the canonical
tokenization of the last answer) and ``reset`` empties it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from nvila_edge.config import NVILAConfig


class Backend(ABC):
    name: str = "base"
    config: NVILAConfig
    device: str = "cpu"
    owner: object | None = None  # who filled the cache last (sessions check it before reusing it)

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
    def prefill(self, embeds: np.ndarray) -> np.ndarray:
        """Append (1, L, H) embeddings to the cache; return the last position's logits (V,) float32."""

    @abstractmethod
    def decode_step(self, token_id: int) -> np.ndarray:
        """Append one token to the cache; return its logits (V,) float32."""

    @property
    @abstractmethod
    def cache_length(self) -> int:
        """Positions held in the KV cache."""

    @abstractmethod
    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` cache positions."""

    def reset(self) -> None:
        self.truncate(0)
        self.owner = None

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
