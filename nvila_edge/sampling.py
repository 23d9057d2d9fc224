"""Token selection on numpy logits, shared by the torch reference and every runtime backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import GenerationError

GREEDY_BELOW = 1e-5
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds


@dataclass
class SamplingParams:
    """``temperature == 0`` is greedy, and so is any temperature below ``GREEDY_BELOW`` (greedy is the limit of
    temperature → 0, and the one value float32 logits can compute there). ``repetition_penalty`` lies in
    ``REPETITION_PENALTY_RANGE``: beyond it a penalised logit overflows float32. ``stop`` strings end the answer
    (they are not included in it)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        lo, hi = REPETITION_PENALTY_RANGE
        if not lo <= self.repetition_penalty <= hi:
            raise GenerationError(f"repetition_penalty must be in [{lo}, {hi}] (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise GenerationError(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Sampler:
    """Picks the next token id from a 1-D logits vector."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, previous: Sequence[int] = ()) -> int:
        p = self.params
        # float64 and finite: extreme (but admitted) temperatures / penalties never make NaN probabilities
        logits = np.nan_to_num(np.asarray(logits, dtype=np.float64).reshape(-1), nan=-1e300, posinf=1e300,
                               neginf=-1e300)
        if p.repetition_penalty != 1.0 and len(previous):
            logits = logits.copy()
            seen = np.unique(np.asarray(previous, dtype=np.int64))
            seen = seen[seen < logits.shape[0]]
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        logits = (logits - logits.max()) / p.temperature  # max first: the scaled values cannot overflow
        if p.top_k and p.top_k < logits.shape[0]:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = _softmax(logits)
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = cum - probs[order] < p.top_p  # smallest set whose mass reaches top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))


def _softmax(x: np.ndarray) -> np.ndarray:
    with np.errstate(under="ignore", invalid="ignore"):
        x = x - np.max(x)  # the maximum becomes 0 (exp 1): the sum is >= 1 whatever the scale
        e = np.exp(np.where(np.isnan(x), -np.inf, x))
    return e / e.sum()
