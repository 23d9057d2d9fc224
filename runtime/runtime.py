"""Runtime: a bundle (or a backend built from parts) → streaming answers about images and videos.

    rt = Runtime.load("bundle/")                        # verifies the manifest, picks the backend
    for ev in rt.stream("What is here?", images=["a.jpg"], max_new_tokens=64):
        ...                                              # PlanEvent, TokenEvent..., FinishEvent
    rt.generate(...)  /  rt.session(system=...)  /  rt.video_stream(fps=2, window_s=8)

Every answer runs on a KV cache its caller owns: a session keeps its own across turns; a one-shot request
and each question to a video stream borrow one from a small pool (kept allocated, emptied on return), so no
call spoils another's.

One pipeline for every backend, on its one step API (``backends/base.py``): core processor (tiling, video
sampling) → ``backend.encode_tiles`` → ``backend.prompt_embeds`` (``nvila_edge.visual`` in numpy, or the model's
own torch math on the device) → ``backend.prefill(embeds, cache)`` → the core decode loop over
``backend.decode_step(token, cache)`` with the backend's sampler (on the GPU for torch/CUDA).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Iterator, Sequence

import numpy as np

from nvila_edge.config import NVILAConfig
from nvila_edge.events import Timings
from nvila_edge.generation import stream_tokens
from nvila_edge.media.processor import ProcessedInputs
from nvila_edge.sampling import SamplingParams

from nvila_edge.kv_cache import KVCache

from .backends import Backend, load_backend
from .planner import MediaPlanner, Planned
from .results import RunResult, collect, sampling_params
from .session import Session
from .video_stream import VideoStream

TARGET_OF = {"onnxruntime": "cpu", "openvino": "cpu", "tensorrt": "tensorrt", "torch": "torch"}  # torch: its .target says which
POOLED_CACHES = 2  # one-shot requests' caches kept allocated between requests (more are made when needed)


class Runtime:
    def __init__(self, config: NVILAConfig, tokenizer, backend: Backend, *, limits: dict | None = None,
                 max_tiles: int | None = None, latency_budget_ms: float | None = None, bundle=None):
        self.config = config
        self.tokenizer = tokenizer
        self.backend = backend
        self.bundle = bundle
        limits = dict(limits or {})
        self.limits = limits
        self.context_length = min(x for x in (config.llm.context_length, limits.get("context_length"),
                                              backend.max_length) if x)
        # limits["max_tiles"] is the engines' per-call batch (they run tiles in chunks), not a plan cap
        self.planner = MediaPlanner(config, tokenizer, max_tiles=max_tiles, latency_budget_ms=latency_budget_ms,
                                    max_frames=limits.get("max_frames"))
        self._end: np.ndarray | None = None
        self._pool: list[KVCache] = []
        self._pool_lock = threading.Lock()  # the agent and the server take caches from other threads
        # one backend call at a time: the server's compute thread, an Agent's worker and media threads may share
        # this runtime; held per call (an encode, a prefill, a decode step), so their answers interleave
        self.lock = threading.RLock()

    @classmethod
    def load(cls, bundle: str | os.PathLike, backend: str = "auto", *, max_tiles: int | None = None,
             latency_budget_ms: float | None = None, threads: int | None = None, device: str | None = None,
             verify: bool = True, vision_engine: str | None = None, llm_engine: str | None = None) -> "Runtime":
        """Open a bundle: verify its manifest and file hashes, pick the backend, read the tokenizer.
        ``vision_engine="openvino"`` runs the vision tower on OpenVINO beside the ONNX Runtime decoder (faster on
        CPUs; the ``[openvino]`` extra). ``llm_engine="llamacpp"`` runs the LLM from the bundle's gguf target on
        llama.cpp (the ``[llamacpp]`` extra) beside the same vision graphs."""
        from nvila_edge.bundle import Bundle
        from nvila_edge.tokenizer import NVILATokenizer

        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=verify)
        be = load_backend(b, backend, threads=threads, device=device, vision_engine=vision_engine, llm_engine=llm_engine)
        target = b.manifest.get("targets", {}).get(getattr(be, "target", None) or TARGET_OF[be.name], {})
        return cls(b.config, NVILATokenizer.from_pretrained(b.tokenizer_dir), be, limits=target.get("limits"),
                   max_tiles=max_tiles, latency_budget_ms=latency_budget_ms, bundle=b)

    @property
    def processor(self):
        return self.planner.processor

    # ---- vision + embeddings -------------------------------------------------------------------------
    def end_embeds(self) -> np.ndarray:
        if self._end is None:  # the "\n" appended after every media item, looked up once
            with self.lock:
                self._end = self.backend.embed_tokens(np.asarray(self.config.end_token_ids, dtype=np.int64))
        return self._end

    def encode_tiles(self, pixels: np.ndarray) -> tuple[object, float]:
        """Vision features of tiles in the backend's own array type (device-resident on a GPU), and the ms it
        took (feeds the latency-aware tiling)."""
        t0 = time.perf_counter()
        with self.lock:
            feats = self.backend.encode_tiles(np.ascontiguousarray(pixels, dtype=np.float32))
        ms = (time.perf_counter() - t0) * 1000
        self.planner.record(pixels.shape[0], ms)
        return feats, ms

    def measure_vision(self, tiles: int = 1) -> float:
        """Time the vision tower on blank tiles; returns (and remembers) the ms per tile."""
        s = self.config.vision.image_size
        _, ms = self.encode_tiles(np.zeros((tiles, 3, s, s), np.float32))
        return ms / tiles

    def embed(self, inputs: ProcessedInputs, timings: Timings | None = None,
              features: np.ndarray | None = None) -> np.ndarray:
        """Processor outputs → (1, L', H) prompt embeddings (vision time into ``timings.vision_ms``)."""
        t0 = time.perf_counter()
        if features is None and inputs.pixel_values is not None:
            features, _ = self.encode_tiles(inputs.pixel_values)
        end = self.end_embeds() if inputs.media else None
        with self.lock:
            embeds = self.backend.prompt_embeds(inputs.input_ids, inputs.media, features, end)
        if timings is not None:
            timings.vision_ms += (time.perf_counter() - t0) * 1000
        return embeds

    # ---- KV caches -----------------------------------------------------------------------------------
    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A KV cache of the caller's own (a ``Session``, an app's conversation)."""
        return self.backend.new_cache(capacity)

    def _borrow(self, capacity: int | None = None) -> KVCache:
        """A pooled cache that holds ``capacity`` positions, else a new one of that size."""
        with self._pool_lock:
            fits = [c for c in self._pool if capacity is None or c.capacity >= capacity]
            cache = min(fits, key=lambda c: c.capacity) if fits else None
            if cache is not None:
                self._pool.remove(cache)
        return cache if cache is not None else self.backend.new_cache(capacity)

    def _give_back(self, cache: KVCache) -> None:
        cache.clear()
        with self._pool_lock:
            if len(self._pool) < POOLED_CACHES:
                self._pool.append(cache)

    # ---- generation ----------------------------------------------------------------------------------
    def plan(self, prompt, images=None, video=None, *, videos=None, system: str | None = None,
             overflow: str = "error", max_tiles: int | None = None, latency_budget_ms: float | None = None,
             num_frames: int | None = None, context_used: int = 0, add_generation_prompt: bool = True) -> Planned:
        """Preprocess and fit the budgets (raises ``ContextOverflowError`` before any model compute)."""
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        videos = list(videos or []) + ([video] if video is not None else [])
        budget = latency_budget_ms if latency_budget_ms is not None else self.planner.latency_budget_ms
        if budget is not None and self.planner.ms_per_tile is None and len(images) == 1:
            self.measure_vision()  # the tiling choice needs one measured tile
        return self.planner.plan(prompt, images, videos, system=system, overflow=overflow, max_tiles=max_tiles,
                                 latency_budget_ms=latency_budget_ms, num_frames=num_frames,
                                 context_used=context_used, context_limit=self.context_length,
                                 add_generation_prompt=add_generation_prompt)

    def decode(self, embeds, cache: KVCache, params: SamplingParams, timings: Timings,
               visual_tokens: int = 0) -> Iterator:
        """Prefill ``embeds`` after what ``cache`` holds, then the shared decode loop on that cache."""
        be = self.backend
        prompt_tokens = cache.length + embeds.shape[1]

        def prefill():
            with self.lock:
                return be.prefill(embeds, cache)

        def step(tok):
            with self.lock:
                return be.decode_step(tok, cache)

        return stream_tokens(prefill, step,
                             self.tokenizer, params, self.tokenizer.eos_token_ids, prompt_tokens, visual_tokens,
                             self.context_length, timings, sampler=be.sampler(params))

    def answer(self, embeds: np.ndarray, params: SamplingParams, timings: Timings, visual_tokens: int = 0) -> Iterator:
        """``decode`` on a borrowed cache sized to the request (prompt + ``max_new_tokens``), returned to the pool
        when the generator ends or is closed."""
        cache = self._borrow(self.cache_capacity(embeds.shape[1], params.max_new_tokens))
        try:
            yield from self.decode(embeds, cache, params, timings, visual_tokens)
        finally:
            self._give_back(cache)

    def stream(self, prompt, images=None, video=None, *, videos: Sequence | None = None, system: str | None = None,
               overflow: str = "error", max_tiles: int | None = None, latency_budget_ms: float | None = None,
               num_frames: int | None = None, **sampling) -> Iterator:
        """Answer ``prompt`` (text or a conversation) about ``images`` / ``video``: a generator of a
        ``PlanEvent``, ``TokenEvent``s and a final ``FinishEvent``. Budgets are checked now, before any
        compute; ``sampling``: max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop."""
        params = sampling_params(sampling)
        t0 = time.perf_counter()
        planned = self.plan(prompt, images, video, videos=videos, system=system, overflow=overflow,
                            max_tiles=max_tiles, latency_budget_ms=latency_budget_ms, num_frames=num_frames)
        timings = Timings(preprocess_ms=(time.perf_counter() - t0) * 1000)
        return self._run(planned, params, timings)

    def cache_capacity(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """KV positions one answer needs: its prompt and answer, within the context."""
        return min(self.context_length, prompt_tokens + max_new_tokens)

    def stream_planned(self, planned: Planned, *, preprocess_ms: float = 0.0, **sampling) -> Iterator:
        """``stream`` for a request already planned (``plan``: media decoded, tiles cut, budgets checked, on any
        thread): the model compute only."""
        return self._run(planned, sampling_params(sampling), Timings(preprocess_ms=preprocess_ms))

    def _run(self, planned: Planned, params: SamplingParams, timings: Timings):
        yield planned.event
        embeds = self.embed(planned.inputs, timings)
        yield from self.answer(embeds, params, timings, planned.event.visual_tokens)

    def generate(self, prompt, images=None, video=None, **kwargs) -> RunResult:
        """Like ``stream`` but returns the final result (text, token ids, usage, timings, plan)."""
        return collect(self.stream(prompt, images, video, **kwargs))

    def session(self, system: str | None = None) -> Session:
        """Multi-turn chat with its own KV cache, kept between turns (only new tokens are prefilled)."""
        return Session(self, system=system)

    def video_stream(self, fps: float = 1.0, window_s: float = 8.0, **kwargs) -> VideoStream:
        """Live frames in, questions about the recent window out; each frame is encoded once."""
        return VideoStream(self, fps=fps, window_s=window_s, **kwargs)

    def describe(self) -> dict:
        return {"model": self.config.name, **self.backend.describe(), "context_length": self.context_length,
                "max_tiles": self.planner.max_tiles, "ms_per_tile": self.planner.ms_per_tile}

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
