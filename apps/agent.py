"""Agent: a long-lived ``Runtime`` in its own worker thread with a small, thread-safe API for apps (robots,
camera loops, UIs).

    agent = Agent(Runtime.load("bundle/"))
    fut = agent.ask(frame, "Is the path clear? Answer JSON.", on_event=print, timeout=2.0)
    result = fut.result()                     # RunResult (text, tokens, usage, timings, plan)
    agent.close()

- One answer runs at a time, on the worker thread; callbacks (``on_event``) run there too, once per
  ``PlanEvent`` / ``TokenEvent`` / ``FinishEvent``.
- ``cancel_previous=True`` (the default): a newer request supersedes older ones — a queued one is cancelled
  (``future.cancelled()``), a running one is stopped at its next event (its generator is closed) and its
  future fails with ``AnswerCancelled``. With ``cancel_previous=False`` requests queue up in order.
- ``timeout`` (seconds from ``ask``): the future fails with ``AnswerTimeout`` at the deadline even while the
  worker is inside a long prefill; the generator is closed at its next event.
- In an asyncio app: ``result = await asyncio.wrap_future(agent.ask(frame, question))``.
- ``parse_json_answer`` pulls a JSON object out of the model's text and checks keys and types
  (``AnswerFormatError``), for apps that act on structured answers.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union

from nvila_edge.errors import GenerationError, NVILAEdgeError
from nvila_edge.events import FinishEvent

from nvila_edge.runtime.planner import PlanEvent
from nvila_edge.runtime.results import RunResult

log = logging.getLogger("nvila_edge.agent")
_SKIP = object()  # sentinel: a queued request that was cancelled or timed out before it started


class AnswerCancelled(NVILAEdgeError, CancelledError):
    """The answer was stopped because a newer request arrived or the agent closed."""


class AnswerTimeout(NVILAEdgeError, TimeoutError):
    """The answer did not finish within its timeout."""


class AnswerFormatError(GenerationError):
    """The model's answer is not the structured answer the app asked for (``.text`` has what it said)."""

    def __init__(self, message: str, text: str = ""):
        super().__init__(message)
        self.text = text


@dataclass
class _Request:
    images: list
    question: Any
    on_event: Callable | None
    deadline: float | None
    sampling: dict
    future: Future = field(default_factory=Future)
    stop: str | None = None  # "cancelled" | "timeout" once it must stop
    timer: threading.Timer | None = None
    submitted: float = field(default_factory=time.monotonic)


class Agent:
    def __init__(self, runtime, *, cancel_previous: bool = True, system: str | None = None,
                 name: str = "nvila-agent", **sampling):
        self.runtime = runtime
        self.cancel_previous = cancel_previous
        self.system = system
        self.sampling = {"max_new_tokens": 64, **sampling}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: deque[_Request] = deque()
        self._running: _Request | None = None
        self._closed = False
        self.stats = {"asked": 0, "answered": 0, "cancelled": 0, "timed_out": 0, "failed": 0}
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # ---- public API ----------------------------------------------------------------------------------
    def ask(self, image, question, *, on_event: Callable | None = None, timeout: float | None = None,
            **sampling) -> Future:
        """Queue a question about ``image`` (an RGB HWC uint8 frame, a path, a PIL image, a list of them, or
        None); returns a ``Future`` of the ``RunResult``."""
        if timeout is not None and timeout <= 0:
            raise GenerationError(f"timeout must be > 0 seconds, got {timeout}")
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        req = _Request(images, question, on_event, None if timeout is None else time.monotonic() + timeout,
                       {**self.sampling, **sampling})
        with self._lock:
            if self._closed:
                raise GenerationError("the agent is closed")
            self.stats["asked"] += 1
            if self.cancel_previous:
                while self._pending:
                    old = self._pending.popleft()
                    self._cancel_pending(old)
                if self._running is not None and self._running.stop is None:
                    self._running.stop = "cancelled"
            self._pending.append(req)
            self._wake.notify_all()
        if timeout is not None:
            req.timer = threading.Timer(timeout, self._expire, (req,))
            req.timer.daemon = True
            req.timer.start()
        return req.future

    def close(self, timeout: float | None = 10.0) -> None:
        """Cancel what is queued and running and stop the worker (the runtime stays open: its owner closes it)."""
        with self._lock:
            self._closed = True
            while self._pending:
                self._cancel_pending(self._pending.popleft())
            if self._running is not None and self._running.stop is None:
                self._running.stop = "cancelled"
            self._wake.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running is not None or bool(self._pending)

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------------------
    def _cancel_pending(self, req: _Request) -> None:
        req.stop = "cancelled"
        if req.timer is not None:
            req.timer.cancel()
        if req.future.cancel():
            self.stats["cancelled"] += 1

    def _expire(self, req: _Request) -> None:
        with self._lock:
            if req.stop is None:
                req.stop = "timeout"
        if self._fail(req, AnswerTimeout(f"no answer within {req.deadline - req.submitted:.2f} s")):
            self.stats["timed_out"] += 1

    def _fail(self, req: _Request, exc: Exception) -> bool:
        """Resolve the future with ``exc`` unless it is already resolved; True when this call did it."""
        with self._lock:
            if req.future.done():
                return False
            req.future.set_exception(exc)
            return True

    def _next(self):
        with self._lock:
            while not self._pending and not self._closed:
                self._wake.wait()
            if not self._pending:
                return None
            req = self._pending.popleft()
            if req.future.done() or not req.future.set_running_or_notify_cancel():
                return _SKIP  # cancelled or timed out while queued
            self._running = req
            return req

    def _work(self) -> None:
        while True:
            req = self._next()
            if req is None:
                return
            if req is _SKIP:
                continue
            try:
                self._answer(req)
            finally:
                if req.timer is not None:
                    req.timer.cancel()
                with self._lock:
                    self._running = None

    def _answer(self, req: _Request) -> None:
        if req.stop == "timeout" or req.future.done():
            return
        gen = None
        plan = None
        try:
            gen = self.runtime.stream(req.question, images=req.images or None, system=self.system, **req.sampling)
            for ev in gen:
                if req.stop is not None:
                    break
                if isinstance(ev, PlanEvent):
                    plan = ev
                if req.on_event is not None:
                    req.on_event(ev)
                if isinstance(ev, FinishEvent):
                    res = RunResult(ev.text, ev.token_ids, ev.reason, ev.usage, ev.timings, plan)
                    with self._lock:
                        if not req.future.done():
                            req.future.set_result(res)
                            self.stats["answered"] += 1
                    return
        except Exception as e:  # typed errors from the runtime, or the app's callback
            if self._fail(req, e):
                self.stats["failed"] += 1
            return
        finally:
            if gen is not None:
                gen.close()  # stops the decode loop and returns its KV cache to the runtime's pool
        if req.stop == "timeout":
            if self._fail(req, AnswerTimeout("the answer ran past its timeout")):
                self.stats["timed_out"] += 1
        elif self._fail(req, AnswerCancelled("a newer request superseded this answer" if not self._closed
                                             else "the agent was closed")):
            self.stats["cancelled"] += 1


# ---- structured answers ------------------------------------------------------------------------------------
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", flags=re.S)


def _first_json_object(text: str) -> dict | None:
    """The first JSON object in a ```json fence, else the first one in ``text`` (decoded from each ``{`` in turn:
    ``raw_decode`` ignores what follows the object)."""
    decoder = json.JSONDecoder()
    for part in (*_FENCE.findall(text), text):
        for m in re.finditer(r"\{", part):
            try:
                val, _ = decoder.raw_decode(part, m.start())
            except (ValueError, RecursionError):  # not JSON from here, or nested past the parser's depth
                continue
            if isinstance(val, dict):
                return val
    return None


def _schema_type(rule):
    """The pydantic type of one schema rule: allowed values → ``Literal``, types → their (strict) union."""
    if isinstance(rule, (set, frozenset, list)):
        return Literal[tuple(rule)]
    types = rule if isinstance(rule, tuple) else (rule,)
    return Union[types] if len(types) > 1 else types[0]


def _schema_message(err: dict, schema: dict[str, Any], obj: dict) -> str:
    key = err["loc"][0]
    if err["type"] == "missing":
        return f"the answer lacks the key {key!r}: {obj}"
    rule, v = schema[key], obj[key]
    if isinstance(rule, (set, frozenset, list)):
        return f"{key}={v!r} is not one of {sorted(map(str, rule))}"
    types = rule if isinstance(rule, tuple) else (rule,)
    return f"{key}={v!r} should be {'/'.join(t.__name__ for t in types)}, got {type(v).__name__}"


def parse_json_answer(text: str, schema: dict[str, Any] | None = None) -> dict:
    """The first JSON object in ``text`` (bare, or in a ```json fence) checked against ``schema``:
    ``{key: type | (types, ...) | {allowed values}}``. Keys in the schema are required; ``bool`` is not
    accepted for ``int`` / ``float`` and ints are accepted for ``float`` (pydantic's strict mode). Returns the
    object as the model wrote it; raises ``AnswerFormatError``."""
    obj = _first_json_object(text)
    if obj is None:
        raise AnswerFormatError(f"no JSON object in the answer: {text[:120]!r}", text)
    if schema:
        from pydantic import ConfigDict, TypeAdapter, ValidationError
        from typing_extensions import TypedDict  # pydantic's TypedDict on Python < 3.12

        answer = TypedDict("Answer", {k: _schema_type(r) for k, r in schema.items()})
        answer.__pydantic_config__ = ConfigDict(strict=True, arbitrary_types_allowed=True)
        try:
            TypeAdapter(answer).validate_python(obj)
        except ValidationError as e:
            raise AnswerFormatError(_schema_message(e.errors()[0], schema, obj), text) from None
    return obj
