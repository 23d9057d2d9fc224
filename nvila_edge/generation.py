"""The shared decode loop: sample → detokenize → events, over any backend's ``prefill`` / ``decode_step``.

Torch-free, so the runtime's backends and the torch reference (``NVILAModel.stream``) run the same loop.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np

from .detokenizer import StreamDecoder
from .events import FinishEvent, StreamEvent, Timings, TokenEvent, Usage
from .sampling import Sampler, SamplingParams


def stream_tokens(
    prefill: Callable[[], np.ndarray],
    decode_step: Callable[[int], np.ndarray],
    tokenizer,
    params: SamplingParams,
    eos_ids: tuple[int, ...],
    prompt_tokens: int,
    visual_tokens: int,
    context_length: int,
    timings: Timings,
    sampler: Callable | None = None,
) -> Iterator[StreamEvent]:
    """The shared decode loop. ``prefill()`` returns the last-position logits of the prompt and
    ``decode_step(token)`` the logits after feeding ``token``; ``sampler(logits, previous) -> int`` picks
    the token (default: the numpy ``Sampler``; a backend may pass one that reads its device logits)."""
    sampler = sampler if sampler is not None else Sampler(params)
    decoder = StreamDecoder(tokenizer, params.stop)
    t0 = time.perf_counter()
    logits = prefill()
    timings.prefill_ms = (time.perf_counter() - t0) * 1000
    budget = min(params.max_new_tokens, context_length - prompt_tokens)
    ids: list[int] = []
    reason = "length"
    t_decode = time.perf_counter()
    t_step = t0  # the first token's time is the prefill
    while len(ids) < budget:
        tok = sampler(logits, ids)
        if tok in eos_ids:
            reason = "stop"
            break
        ids.append(tok)
        delta = decoder.push(tok)
        now = time.perf_counter()
        ms = (now - t_step) * 1000
        if len(ids) > 1:
            timings.per_token_ms.append(ms)
        yield TokenEvent(tok, delta, len(ids) - 1, ms)
        if decoder.stopped:
            reason = "stop"
            break
        if len(ids) >= budget:
            break
        t_step = time.perf_counter()
        logits = decode_step(tok)
    timings.decode_ms = (time.perf_counter() - t_decode) * 1000
    tail = decoder.flush()
    if tail:
        yield TokenEvent(ids[-1], tail, len(ids) - 1, 0.0)
    usage = Usage(prompt_tokens=prompt_tokens, visual_tokens=visual_tokens, completion_tokens=len(ids))
    yield FinishEvent(reason, decoder.text, ids, usage, timings)
