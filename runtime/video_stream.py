"""VideoStream: live frames in, questions about the recent window out.

``push`` keeps frames at most ``fps`` per second, encodes each kept frame once (vision tower + projector,
both per frame) and holds its projected features in a bounded window: frames older than ``window_s``
fall out. ``ask`` samples the window's frames exactly as the offline video path samples a frame list,
pools them (TSP groups are memoised, so a sliding window re-pools only new groups) and leaves only the
LLM prefill and decoding to do.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np

from nvila_edge import visual
from nvila_edge.errors import MediaError
from nvila_edge.events import Timings
from nvila_edge.media.image import load_image
from nvila_edge.media.video import VideoClip, VideoPlan, sample_frame_indices

from .results import RunResult, collect, sampling_params

_PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)  # the planner needs frames; the pixels here are never encoded


@dataclass
class _Frame:
    serial: int
    timestamp: float
    proj: np.ndarray  # (s*s, H) projected features


class VideoStream:
    def __init__(self, runtime, fps: float = 1.0, window_s: float = 8.0, num_frames: int | None = None,
                 system: str | None = None):
        if fps <= 0 or window_s <= 0:
            raise MediaError(f"fps and window_s must be positive, got fps={fps}, window_s={window_s}")
        self.rt = runtime
        self.fps = float(fps)
        self.window_s = float(window_s)
        self.num_frames = num_frames or runtime.config.video.num_frames
        self.system = system
        self.frames: deque[_Frame] = deque(maxlen=max(1, math.ceil(fps * window_s)) + 1)
        self._serial = 0
        self._pooled: dict[tuple, np.ndarray] = {}
        self.vision_ms = 0.0  # total vision time spent in push (for reports)

    # ---- frames in -----------------------------------------------------------------------------------
    def push(self, frame, timestamp: float | None = None) -> bool:
        """Add a frame (any image input); returns False when it was skipped to keep to ``fps``."""
        ts = time.monotonic() if timestamp is None else float(timestamp)
        if self.frames and ts - self.frames[-1].timestamp < 1.0 / self.fps - 1e-9:
            return False
        rgb = np.asarray(load_image(frame, self.rt.config.preprocessing.max_image_pixels))
        t0 = time.perf_counter()
        pixels = self.rt.processor.video_tiles(VideoClip([rgb], [0]))
        feats, _ = self.rt.encode_tiles(pixels)
        proj = visual.project_frames(self.rt.backend.to_numpy(feats), self.rt.config, self.rt.backend.project)[0]
        self.vision_ms += (time.perf_counter() - t0) * 1000
        self.frames.append(_Frame(self._serial, ts, proj))
        self._serial += 1
        while self.frames and ts - self.frames[0].timestamp > self.window_s:
            self.frames.popleft()
        self._evict()
        return True

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def timestamps(self) -> list[float]:
        return [f.timestamp for f in self.frames]

    def _evict(self) -> None:
        live = {f.serial for f in self.frames}
        for key in [k for k in self._pooled if not set(k[0]) <= live]:
            del self._pooled[key]

    # ---- questions out -------------------------------------------------------------------------------
    def _clip(self) -> VideoClip:
        """The window as a clip sampled like ``load_video(frames, num_frames)``; indices are frame serials."""
        if not self.frames:
            raise MediaError("the video stream has no frames yet: push frames before asking")
        window = list(self.frames)
        idx = sample_frame_indices(len(window), self.num_frames)
        picked = [window[i] for i in idx]
        return VideoClip([_PLACEHOLDER] * len(picked), [f.serial for f in picked], 0.0, len(window), "stream",
                         [f.timestamp for f in picked])

    def _video_embeds(self, clip: VideoClip, plan: VideoPlan) -> np.ndarray:
        """TSP over cached projections, group by group (memoised per group of frames)."""
        by_serial = {f.serial: f.proj for f in self.frames}
        end = self.rt.end_embeds()
        out = []
        for t, h, w in plan.pool_sizes:
            for g in range(0, len(clip.indices), t):
                key = (tuple(clip.indices[g:g + t]), (t, h, w))
                if key not in self._pooled:
                    group = np.stack([by_serial[s] for s in key[0]])
                    one = replace(plan, num_frames=t, pool_sizes=((t, h, w),))
                    self._pooled[key] = visual.pool_video(group, one, end)
                out.append(self._pooled[key])
        return np.concatenate(out)

    def prepare(self, question: str, overflow: str = "error"):
        """(planned request, prompt embeddings (1, L, H)) for ``question`` about the current window."""
        planned = self.rt.plan(question, videos=[self._clip()], system=self.system, overflow=overflow)
        inputs = planned.inputs
        media = inputs.media[0]
        chunk = self._video_embeds(media.clip, media.plan)
        embeds = visual.embed_inputs(inputs.input_ids, [chunk], self.rt.config, self.rt.backend.embed_tokens)
        return planned, embeds

    def embeds(self, question: str) -> np.ndarray:
        return self.prepare(question)[1]

    def ask(self, question: str, *, overflow: str = "error", **sampling) -> Iterator:
        """Answer about the current window: events as ``Runtime.stream`` (no vision work left)."""
        params = sampling_params(sampling)
        t0 = time.perf_counter()
        planned, embeds = self.prepare(question, overflow)
        timings = Timings(preprocess_ms=(time.perf_counter() - t0) * 1000)
        return self._run(planned, embeds, params, timings)

    def _run(self, planned, embeds, params, timings):
        yield planned.event
        yield from self.rt.answer(embeds, params, timings, planned.event.visual_tokens)

    def generate(self, question: str, **kwargs) -> RunResult:
        return collect(self.ask(question, **kwargs))

    def clear(self) -> None:
        self.frames.clear()
        self._pooled.clear()
