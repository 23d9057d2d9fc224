"""VideoQA: questions about long videos — frames sampled uniformly per segment, temporal pooling (TSP) by the
runtime, and the model's time tokens (``<t0>..<tN-1>``, when the model has them) turned back into seconds.

    qa = VideoQA(Runtime.load("bundle/"))
    for ans in qa.ask("long.mp4", "When does the circle appear?", segments=4):
        print(ans.start_s, ans.end_s, ans.text, ans.times_s)

A segment is a time range of the video; ``num_frames`` frames are sampled evenly inside it (the reference
rule, ``np.round(np.linspace(...))``), so a long video can be read at a finer rate by asking per segment.
Probing and segment loading are the core loader's (``nvila_edge.media.video.probe_video`` / ``load_video(...,
start_s=, end_s=)``): the frames that really decode, whatever the container's frame count says.
A time token ``<tK>`` names the moment ``K / (N - 1)`` of the way from the first to the last sampled frame
(the inverse of ``nvila_edge.media.time_token_index``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nvila_edge.media.video import VideoInfo, load_video, probe_video, time_token_pattern


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
        """Answer about ``[start_s, end_s)`` of the video (``probe_video(path)``), streaming text to ``on_token``."""
        cfg = self.runtime.config.video
        clip = load_video(info.path, self.num_frames, start_s=start_s, end_s=end_s)
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
        info = probe_video(video)
        return [self.answer(info, a, b, question, on_token=on_token, **sampling)
                for a, b in self.segments(info, segments, segment_s)]
