"""Video: uniform frame sampling (OpenCV decode), temporal-pooling (TSP) token plans and time tokens."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import NVILAConfig
from ..errors import MediaError

DECODE_TIMEOUT_S = 20.0  # probing + seeking one video file: past it, MediaError (the compute never waits on it)


def sample_frame_indices(frame_count: int, num_frames: int) -> np.ndarray:
    """Reference sampling: ``np.round(np.linspace(0, count - 1, N))`` (repeats when the video is short)."""
    if frame_count < 1:
        raise MediaError("the video has no frames")
    if num_frames < 1:
        raise MediaError("num_frames must be >= 1")
    return np.round(np.linspace(0, frame_count - 1, num_frames)).astype(int)


def time_token_index(time_s: float, duration_s: float, num_time_tokens: int) -> int:
    """Index t of the time token ``<t{t}>`` for a moment of the video: round(time / duration * (N - 1))."""
    if num_time_tokens < 1 or duration_s <= 0:
        raise MediaError("time tokens need num_time_tokens >= 1 and a positive duration")
    t = min(max(time_s / duration_s, 0.0), 1.0)
    return int(round(t * (num_time_tokens - 1)))


def time_token_pattern(fmt: str = "<t{t}>") -> re.Pattern:
    """The regex of a time token in ``fmt`` (``"<t{t}>"``), its index as group 1."""
    return re.compile(re.escape(fmt).replace(re.escape("{t}"), r"(\d+)"))


@dataclass
class VideoClip:
    """Sampled RGB frames (HWC uint8) with where they came from."""

    frames: list[np.ndarray]
    indices: list[int]
    fps: float = 0.0
    frame_count: int = 0
    source: str = "frames"
    timestamps: list[float] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.frame_count / self.fps if self.fps > 0 else float(len(self.frames))


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise MediaError(f"decoding {what} took more than {DECODE_TIMEOUT_S:g} s; send a shorter or re-encoded clip")


def _decodable_count(cap, count: int, deadline: float | None, what: str) -> int:
    """Frames that really decode. The container's count can be wrong (or a lie: a header declaring hours of
    frames): if its last frame does not decode, step back 1, 2, 4, ... frames, then bisect between the last
    frame found and the first that failed: O(log count) seeks, not one per missing frame."""
    import cv2

    def ok(i: int) -> bool:
        _check_deadline(deadline, what)
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        return bool(cap.grab())

    if count <= 0:
        return 0
    if ok(count - 1):
        return count
    bad, step = count - 1, 1
    while True:
        i = max(0, count - 1 - step)
        if ok(i):
            good = i
            break
        if i == 0:
            return 0
        bad, step = i, step * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good + 1


def read_frames(cap, indices, what: str, deadline: float | None = None) -> dict[int, np.ndarray]:
    """Decode the frames at ``indices`` (each once, in file order) from an open ``cv2.VideoCapture``: RGB.
    ``deadline`` (``time.monotonic()``): past it, ``MediaError`` (seeking in a long, sparse-keyframe file)."""
    import cv2

    frames: dict[int, np.ndarray] = {}
    for i in sorted(set(int(i) for i in indices)):
        _check_deadline(deadline, what)
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, frame = cap.read()
        if not ok or frame is None:
            raise MediaError(f"cannot decode frame {i} of {what}")
        frames[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    return frames


def load_video(video: str | os.PathLike | Sequence, num_frames: int) -> VideoClip:
    """Sample ``num_frames`` frames from a video file (OpenCV) or from a list of frames (any image input)."""
    if isinstance(video, (str, os.PathLike)):
        return _load_file(Path(video), num_frames)
    if isinstance(video, (list, tuple)):
        if not video:
            raise MediaError("the frame list is empty")
        from .image import load_image

        idx = sample_frame_indices(len(video), num_frames)
        cache: dict[int, np.ndarray] = {}
        for i in idx:
            if int(i) not in cache:
                cache[int(i)] = np.asarray(load_image(video[int(i)]))
        return VideoClip([cache[int(i)] for i in idx], [int(i) for i in idx], 0.0, len(video), "frames",
                         [float(i) for i in idx])
    raise MediaError(f"unsupported video input of type {type(video).__name__}; pass a file path or a list of frames")


def _load_file(path: Path, num_frames: int) -> VideoClip:
    import cv2

    if not path.is_file():
        raise MediaError(f"video file not found: {path}")
    if path.stat().st_size == 0:
        raise MediaError(f"video file is empty (0 bytes): {path}")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise MediaError(f"cannot open video {path}: OpenCV found no decodable stream")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        deadline = time.monotonic() + DECODE_TIMEOUT_S
        count = _decodable_count(cap, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), deadline, f"video {path}")
        if count <= 0:
            raise MediaError(f"video {path} has no decodable frames")
        idx = sample_frame_indices(count, num_frames)
        frames = read_frames(cap, idx, f"video {path} ({count} frames)", deadline)
    finally:
        cap.release()
    return VideoClip([frames[int(i)] for i in idx], [int(i) for i in idx], fps, count, str(path),
                     [int(i) / fps if fps > 0 else float(i) for i in idx])


@dataclass(frozen=True)
class VideoPlan:
    """Token budget of a video: frames → one tile each → per-frame tokens → TSP groups + end tokens."""

    num_frames: int
    tokens_per_frame: int
    pool_sizes: tuple[tuple[int, int, int], ...]
    groups: tuple[int, ...]  # pooled groups per pool size
    tokens_per_group: tuple[int, ...]
    end_tokens: int
    num_tokens: int

    @property
    def num_tiles(self) -> int:
        return self.num_frames

    def to_dict(self) -> dict:
        return {
            "num_frames": self.num_frames,
            "tokens_per_frame": self.tokens_per_frame,
            "pool_sizes": [list(p) for p in self.pool_sizes],
            "groups": list(self.groups),
            "num_tokens": self.num_tokens,
        }


def plan_video(num_frames: int, config: NVILAConfig) -> VideoPlan:
    side = config.pooled_side
    n_end = len(config.end_token_ids)
    pools = config.video.effective_pool_sizes()
    groups, per_group = [], []
    for t, h, w in pools:
        if num_frames % t:
            raise MediaError(f"{num_frames} frames cannot be pooled in groups of {t}; use a multiple of {t} frames")
        groups.append(num_frames // t)
        per_group.append((side // h) * (side // w))
    total = sum(g * (n + n_end) for g, n in zip(groups, per_group))
    return VideoPlan(num_frames, side * side, tuple(pools), tuple(groups), tuple(per_group), n_end, total)
