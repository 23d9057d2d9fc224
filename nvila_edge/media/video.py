"""Video: uniform frame sampling (OpenCV decode), temporal-pooling (TSP) token plans and time tokens."""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
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


@dataclass(frozen=True)
class VideoInfo:
    """A video file as the loader reads it: ``frame_count`` counts the frames that decode (see ``probe_video``)."""

    path: str
    fps: float
    frame_count: int

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps if self.fps > 0 else float(self.frame_count)


def segment_frame_indices(frame_count: int, fps: float, num_frames: int, start_s: float = 0.0,
                          end_s: float | None = None) -> np.ndarray:
    """The reference sampling inside ``[start_s, end_s)`` seconds (the whole video by default): frames
    ``round(start_s * fps)`` .. ``round(end_s * fps) - 1``, clamped to the video (fps 0: one frame a second)."""
    if frame_count < 1:
        raise MediaError("the video has no frames")
    rate = fps if fps > 0 else 1.0
    duration = frame_count / rate
    if start_s < 0 or (end_s is not None and end_s <= start_s):
        raise MediaError(f"bad video segment [{start_s}, {end_s}) s: give 0 <= start_s < end_s")
    if start_s >= duration:
        raise MediaError(f"the segment starts at {start_s:.3f} s, at or after the video's end ({duration:.3f} s)")
    first = min(frame_count - 1, int(round(start_s * rate)))
    last = frame_count - 1 if end_s is None else max(first, min(frame_count - 1, int(round(end_s * rate)) - 1))
    return first + sample_frame_indices(last - first + 1, num_frames)


def load_video(video: str | os.PathLike | Sequence, num_frames: int, *, start_s: float = 0.0,
               end_s: float | None = None) -> VideoClip:
    """Sample ``num_frames`` frames from a video file (OpenCV) or from a list of frames (any image input),
    from the whole video or from ``[start_s, end_s)`` seconds of it (a frame list counts one frame a second)."""
    if isinstance(video, (str, os.PathLike)):
        return _load_file(Path(video), num_frames, start_s, end_s)
    if isinstance(video, (list, tuple)):
        if not video:
            raise MediaError("the frame list is empty")
        from .image import load_image

        idx = segment_frame_indices(len(video), 0.0, num_frames, start_s, end_s)
        cache: dict[int, np.ndarray] = {}
        for i in idx:
            if int(i) not in cache:
                cache[int(i)] = np.asarray(load_image(video[int(i)]))
        return VideoClip([cache[int(i)] for i in idx], [int(i) for i in idx], 0.0, len(video), "frames",
                         [float(i) for i in idx])
    raise MediaError(f"unsupported video input of type {type(video).__name__}; pass a file path or a list of frames")


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """The file's frame rate and the number of frames that really decode (what ``load_video`` samples from)."""
    with _open_file(Path(path)) as (_, info, _deadline):
        return info


@contextmanager
def _open_file(path: Path):
    """An open ``cv2.VideoCapture``, the file's ``VideoInfo`` and the decode deadline; released on exit."""
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
        yield cap, VideoInfo(str(path), fps, count), deadline
    finally:
        cap.release()


def _load_file(path: Path, num_frames: int, start_s: float, end_s: float | None) -> VideoClip:
    with _open_file(path) as (cap, info, deadline):
        idx = segment_frame_indices(info.frame_count, info.fps, num_frames, start_s, end_s)
        frames = read_frames(cap, idx, f"video {path} ({info.frame_count} frames)", deadline)
    fps = info.fps
    return VideoClip([frames[int(i)] for i in idx], [int(i) for i in idx], fps, info.frame_count, str(path),
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
