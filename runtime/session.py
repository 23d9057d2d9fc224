"""Session: multi-turn chat with its own KV cache, kept between turns.

Each turn prefills only what is new: the closing of the previous answer and the new user turn. The
closing is the *canonical* tokenization of the answer text (what a fresh prompt of the whole
conversation would contain): the cache is rolled back to where the generated ids and the canonical ids
part, so a session answers exactly like ``rt.generate(full_conversation)``. Each turn's media are planned
as that turn's own (one image → tiled, as in a fresh single-image prompt).

The cache is the session's own (``runtime.new_cache()``), so other calls in between (``rt.generate``, other
sessions, a video stream) never touch it and a turn never re-prefills the history.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterator

import numpy as np

from nvila_edge.chat import DEFAULT_SYSTEM, Message, render_turns
from nvila_edge.events import FinishEvent, Timings, TokenEvent

from .results import RunResult, collect, sampling_params

GEN_PROMPT = "<|im_start|>assistant\n"
CLOSE = "<|im_end|>\n"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Session:
    def __init__(self, runtime, system: str | None = None):
        self.rt = runtime
        self.system = DEFAULT_SYSTEM if system is None else system
        enc = runtime.tokenizer.encode
        self._system_ids = enc(render_turns([Message("system", self.system)]))
        self._gen_ids = enc(GEN_PROMPT)
        self._cache = None  # made on the first turn
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and empty its cache (kept allocated for the next turn)."""
        self.messages: list[Message] = [Message("system", self.system)]
        self._tail: list[int] = []  # "<|im_start|>assistant\n" + fed answer ids, as held in the cache
        self._tail_start = 0
        if self._cache is not None:
            self._cache.clear()

    @property
    def cache(self):
        """This session's KV cache (made on the first turn)."""
        if self._cache is None:
            self._cache = self.rt.new_cache()
        return self._cache

    # ---- one turn ------------------------------------------------------------------------------------
    def stream(self, text: str, images=None, video=None, *, videos=None, overflow: str = "error",
               max_tiles: int | None = None, latency_budget_ms: float | None = None, num_frames: int | None = None,
               **sampling) -> Iterator:
        """Ask the next question; events as ``Runtime.stream``. Budgets are checked now, before compute."""
        params = sampling_params(sampling)
        t0 = time.perf_counter()
        closing, keep = self._closing()
        first = len(self.messages) == 1
        strip = 0 if first else len(self._system_ids)
        planned = self.rt.plan([Message("system", self.system), Message("user", text)], images, video,
                               videos=videos, overflow=overflow, max_tiles=max_tiles,
                               latency_budget_ms=latency_budget_ms, num_frames=num_frames,
                               context_used=keep + len(closing) - strip)
        ids = planned.inputs.input_ids[0].tolist()
        if ids[:strip] != self._system_ids[:strip] or ids[-len(self._gen_ids):] != self._gen_ids:
            raise AssertionError("turn tokenization does not split at the chat special tokens")
        ids = closing + ids[strip:]
        inputs = replace(planned.inputs, input_ids=np.asarray([ids], dtype=np.int64))
        planned.event.prompt_tokens = inputs.num_tokens - strip + len(closing)
        timings = Timings(preprocess_ms=(time.perf_counter() - t0) * 1000)
        return self._turn(planned.event, inputs, keep, params, timings, text)

    def _turn(self, event, inputs, keep, params, timings, text) -> Iterator:
        yield event
        rt, cache = self.rt, self.cache
        embeds = rt.embed(inputs, timings)
        cache.truncate(keep)
        after_prefill = keep + embeds.shape[1]
        answer: list[int] = []
        final = None
        try:
            for ev in rt.decode(embeds, cache, params, timings, event.visual_tokens):
                if isinstance(ev, TokenEvent) and ev.index == len(answer):
                    answer.append(ev.token_id)
                elif isinstance(ev, FinishEvent):
                    final = ev
                yield ev
        finally:
            if cache.length < after_prefill:  # the prefill failed: back to the turn's start, ready to retry
                cache.truncate(keep)
            else:
                self._finish(text, answer, final, after_prefill)

    def _finish(self, text: str, answer: list[int], final, after_prefill: int) -> None:
        fed = answer[:max(0, self.cache.length - after_prefill)]  # the last sampled token is never fed
        self._tail_start = after_prefill - len(self._gen_ids)
        self._tail = self._gen_ids + fed
        reply = final.text if final is not None else self.rt.tokenizer.decode(answer, skip_special_tokens=True)
        self.messages += [Message("user", text), Message("assistant", reply)]

    def _closing(self) -> tuple[list[int], int]:
        """Ids to prefill that close the last answer canonically, and the cache positions to keep."""
        if len(self.messages) == 1:
            return [], 0
        canonical = self.rt.tokenizer.encode(GEN_PROMPT + self.messages[-1].content + CLOSE)
        k = _common_prefix(canonical, self._tail)
        return canonical[k:], self._tail_start + k

    def generate(self, text: str, images=None, video=None, **kwargs) -> RunResult:
        return collect(self.stream(text, images, video, **kwargs))

    ask = generate
