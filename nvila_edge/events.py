"""Typed generation events and results, the same for the torch reference and every runtime backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass
class Timings:
    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    per_token_ms: list[float] = field(default_factory=list)

    @property
    def ttft_ms(self) -> float:
        """Time to first token: vision + prefill (+ preprocessing when measured)."""
        return self.preprocess_ms + self.vision_ms + self.prefill_ms

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * len(self.per_token_ms) / self.decode_ms if self.decode_ms > 0 else 0.0


@dataclass
class Usage:
    prompt_tokens: int = 0  # sequence length of the prompt incl. visual tokens
    visual_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenEvent:
    """One generated token: its id, the text it adds (may be "" while a multi-byte char or a possible
    stop string is pending), its position and how long the step took."""

    token_id: int
    text: str
    index: int
    ms: float
    type: str = "token"


@dataclass
class FinishEvent:
    """Last event of a stream. ``reason``: "stop" (end token or stop string) or "length"."""

    reason: str
    text: str
    token_ids: list[int]
    usage: Usage
    timings: Timings
    type: str = "finish"


StreamEvent = Union[TokenEvent, FinishEvent]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    timings: Timings

    @classmethod
    def from_finish(cls, ev: FinishEvent) -> "GenerationResult":
        return cls(ev.text, ev.token_ids, ev.reason, ev.usage, ev.timings)
