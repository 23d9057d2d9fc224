"""VideoQA: questions about long videos — frames sampled uniformly per segment, temporal pooling (TSP) by the
runtime, and the model's time tokens (``<t0>..<tN-1>``, when the model has them) turned back into seconds.

    qa = VideoQA(Runtime.load("bundle/"))
    for ans in qa.ask("long.mp4", "When does the circle appear?", segments=4):
        print(ans.start_s, ans.end_s, ans.text, ans.times_s)

A segment is a time range of the video; ``num_frames`` frames are sampled evenly inside it (the reference
rule, ``np.round(np.linspace(...))``), so a long video can be read at a finer rate by asking per segment.
A time token ``<tK>`` names the moment ``K / (N - 1)`` of the way from the first to the last sampled frame
(the inverse of ``nvila_edge.media.time_token_index``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nvila_edge.errors import MediaError
from nvila_edge.media.video import VideoClip, read_frames, sample_frame_indices, time_token_pattern  # noqa: F401


@dataclass
class VideoInfo:
    path: str
    fps: float
    frame_count: int

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps if self.fps > 0 else float(self.frame_count)


@dataclass
class VideoAnswer:
    start_s: float
    end_s: float
    frame_times_s: list[float]  # when the sampled frames are
    text: str
    times_s: list[float] = field(default_factory=list)  # the answer's time tokens, in seconds of the video
    text_with_times: str = ""  # the answer with each <tK> replaced by "<tK> (12.3 s)"
    plan: dict = field(default_factory=dict)  # frames, TSP groups, visual tokens
    ttft_ms: float = 0.0
    prompt_tokens: int = 0


def probe(path: str | Path) -> VideoInfo:
    import cv2

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"video file not found: {path}")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise MediaError(f"cannot open video {path}")
        return VideoInfo(str(path), float(cap.get(cv2.CAP_PROP_FPS) or 0.0), int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
    finally:
        cap.release()


def load_segment(info: VideoInfo, start_s: float, end_s: float, num_frames: int) -> VideoClip:
    """``num_frames`` RGB frames sampled evenly from ``[start_s, end_s)`` of the video."""
    import cv2

    fps = info.fps if info.fps > 0 else 1.0
    first = max(0, min(info.frame_count - 1, int(round(start_s * fps))))
    last = max(first, min(info.frame_count - 1, int(round(end_s * fps)) - 1))
    idx = first + sample_frame_indices(last - first + 1, num_frames)
    cap = cv2.VideoCapture(info.path)
    try:
        frames = read_frames(cap, idx, info.path)
    finally:
        cap.release()
    return VideoClip([frames[int(i)] for i in idx], [int(i) for i in idx], info.fps, info.frame_count, info.path,
                     [int(i) / fps for i in idx])


def time_tokens_to_seconds(text: str, frame_times_s: list[float], num_time_tokens: int,
                           fmt: str = "<t{t}>") -> tuple[list[float], str]:
    """(the seconds each time token in ``text`` names, ``text`` with the seconds written after each token)."""
    if num_time_tokens < 1 or not frame_times_s:
        return [], text
    t0, t1 = frame_times_s[0], frame_times_s[-1]
    times: list[float] = []

    def sub(m: re.Match) -> str:
        k = min(int(m.group(1)), num_time_tokens - 1)
        s = t0 + (t1 - t0) * (k / (num_time_tokens - 1) if num_time_tokens > 1 else 0.0)
        times.append(round(s, 3))
        return f"{m.group(0)} ({s:.1f} s)"

    return times, time_token_pattern(fmt).sub(sub, text)


class VideoQA:
    def __init__(self, runtime, num_frames: int | None = None):
        self.runtime = runtime
        self.num_frames = num_frames or runtime.config.video.num_frames

    @property
    def has_time_tokens(self) -> bool:
        v = self.runtime.config.video
        return v.num_time_tokens > 0 and self.runtime.tokenizer.token_to_id(v.time_token_format.format(t=0)) is not None

    def segments(self, info: VideoInfo, segments: int = 1, segment_s: float | None = None) -> list[tuple[float, float]]:
        d = info.duration_s
        n = max(1, int(np.ceil(d / segment_s))) if segment_s else max(1, segments)
        return [(d * i / n, d * (i + 1) / n) for i in range(n)]

    def answer(self, info: VideoInfo, start_s: float, end_s: float, question: str, *, on_token=None,
               **sampling) -> VideoAnswer:
        """Answer about ``[start_s, end_s)`` of the video (``probe(path)``), streaming text to ``on_token``."""
        cfg = self.runtime.config.video
        clip = load_segment(info, start_s, end_s, self.num_frames)
        plan = fin = None
        for ev in self.runtime.stream(question, video=clip, **sampling):
            if ev.type == "plan":
                plan = ev
            elif ev.type == "token" and on_token is not None:
                on_token(ev.text)
            elif ev.type == "finish":
                fin = ev
        n_time = cfg.num_time_tokens if self.has_time_tokens else 0
        times, marked = time_tokens_to_seconds(fin.text, clip.timestamps, n_time, cfg.time_token_format)
        return VideoAnswer(start_s, end_s, list(clip.timestamps), fin.text, times, marked,
                           {"media": plan.media, "visual_tokens": plan.visual_tokens,
                            "dropped_frames": plan.dropped_frames}, fin.timings.ttft_ms, fin.usage.prompt_tokens)

    def ask(self, video: str | Path, question: str, *, segments: int = 1, segment_s: float | None = None,
            on_token=None, **sampling) -> list[VideoAnswer]:
        """One answer per segment (``segments`` equal parts, or parts of ``segment_s`` seconds)."""
        info = probe(video)
        return [self.answer(info, a, b, question, on_token=on_token, **sampling)
                for a, b in self.segments(info, segments, segment_s)]
