"""Synthetic videos: short clips of shapes that appear, move, change colour and come and go, with temporal
questions (``VIDEO_TASKS``) and time-token answers, written as files (held out, and the JSONL training set)
or rendered in memory for a training stage (``RenderedVideos``).

A clip's events happen on the frames the model samples. The model reads ``sampled_frames`` frames at
``np.round(np.linspace(0, count - 1, N))`` (the reference rule) and TSP pools them in pairs, so each clip is
planned over those N *slots*: a file frame shows what the last sampled slot at or before it shows, and events
start and end on whole TSP groups (``pooled_frames`` slots). Then every answer can be read from the pooled
frames — a shape that first shows between two sampled frames, or inside a group, would make "when" ambiguous
by one time token — and a rendered clip of ``num_frames`` frames is, after sampling, the
file clip's content exactly. Time tokens name slots: with as many time tokens as slots (the demo: 8 and 8),
``<tK>`` is slot K, the moment ``K / (N - 1)`` of the way through the sampled frames
(``nvila_edge.media.time_token_index``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from nvila_edge.errors import ConfigError
from nvila_edge.media.video import sample_frame_indices, time_token_index, time_token_pattern

from .data import CachedExamples, ExampleCache
from .drawing import COLORS, SHAPES, background, draw_shape
from .synthetic_config import SyntheticConfig

# every question asks about something only the order of the frames shows
VIDEO_TASKS = ("appears_first", "when", "color_change", "direction", "count_over_time")


@dataclass
class Clip:
    """One rendered clip: RGB frames (HWC uint8), its question and answer, and for "when" the answer's
    segment in time-token indices (start, end), inclusive."""

    task: str
    frames: list[np.ndarray]
    question: str
    answer: str
    segment: tuple[int, int] | None = None


def slot_of_frame(cfg) -> list[int]:
    """For each of the clip's ``num_frames`` frames, the sampled slot whose content it shows."""
    idx = sample_frame_indices(cfg.num_frames, cfg.sampled_frames)
    return [int(np.searchsorted(idx, f, side="right") - 1) for f in range(cfg.num_frames)]


def slot_time_token(cfg, slot: int) -> int:
    """The time token of sampled slot ``slot``: the reference rule on that frame's time in the file."""
    idx = sample_frame_indices(cfg.num_frames, cfg.sampled_frames)
    fps = cfg.fps
    return time_token_index(idx[slot] / fps, cfg.num_frames / fps, cfg.num_time_tokens)


def _plan(task: str, rng: random.Random, cfg) -> tuple[list[list[tuple]], str, str, tuple | None]:
    """What each slot shows — a list of (shape, colour name, x, y) per slot — with the question and answer."""
    n, g = cfg.sampled_frames, max(1, cfg.pooled_frames)
    if n % g:
        raise ConfigError(f"sampled_frames ({n}) must be a multiple of pooled_frames ({g})")
    a, b = rng.sample(SHAPES, 2)
    ca, cb = rng.sample(list(COLORS), 2)
    slots: list[list[tuple]] = [[] for _ in range(n)]
    segment = None
    if task == "appears_first":
        # a pooled group apart: the two never start inside one TSP group
        sa = rng.randint(0, n - 1 - g)
        sb = rng.randint(sa + g, n - 1)
        for k in range(n):
            slots[k] += [(a, ca, 0.3, 0.5)] * (k >= sa) + [(b, cb, 0.7, 0.5)] * (k >= sb)
        return slots, "Which shape appears first?", a, None
    if task == "when":
        # on whole pooled groups: TSP averages each group of frames, so a start or end inside one is half a
        # shape in the group's average — the demo model placed those one time token off in most of its errors
        groups = n // g
        gs = rng.randint(0, groups - 1)
        ge = rng.randint(gs, groups - 1)
        s, e = g * gs, g * ge + g - 1
        x, y = rng.uniform(0.3, 0.7), rng.uniform(0.4, 0.6)
        for k in range(s, e + 1):
            slots[k].append((a, ca, x, y))
        segment = (slot_time_token(cfg, s), slot_time_token(cfg, e))
        fmt = cfg.time_token_format
        return slots, f"When is the {a} visible?", f"{fmt.format(t=segment[0])} to {fmt.format(t=segment[1])}", segment
    if task == "color_change":
        c = rng.randint(1, n - g)  # the last pooled group shows only the new colour
        for k in range(n):
            slots[k].append((a, ca if k < c else cb, 0.5, 0.5))
        return slots, f"What color does the {a} turn into?", cb, None
    if task == "direction":
        right = rng.random() < 0.5
        y = rng.uniform(0.4, 0.6)
        for k in range(n):
            t = k / (n - 1)
            slots[k].append((a, ca, 0.2 + 0.6 * t if right else 0.8 - 0.6 * t, y))
        return slots, f"Which direction does the {a} move?", "right" if right else "left", None
    if task == "count_over_time":
        # shapes come one at a time, each for one pooled group of slots, never two at once: only counting
        # across the frames gives the answer (no single frame shows more than one)
        groups = n // g
        count = rng.randint(1, min(4, groups))
        for p in sorted(rng.sample(range(groups), count)):
            item = (rng.choice(SHAPES), rng.choice(list(COLORS)), rng.uniform(0.25, 0.75), rng.uniform(0.35, 0.65))
            for k in range(g * p, g * p + g):
                slots[k].append(item)
        return slots, "How many shapes appear in the video?", str(count), None
    raise ConfigError(f"unknown video task {task!r}; known: {VIDEO_TASKS}")


def render_clip(task: str, rng: random.Random, cfg) -> Clip:
    """The clip of ``task``: ``cfg.num_frames`` frames of ``cfg.video_size`` (deterministic from ``rng``)."""
    w, h = cfg.video_size
    bg = background(rng, (w, h))
    slots, question, answer, segment = _plan(task, rng, cfg)
    r = h * 0.18
    drawn: dict[int, np.ndarray] = {}
    frames = []
    for slot in slot_of_frame(cfg):
        if slot not in drawn:
            img = bg.copy()
            d = ImageDraw.Draw(img)
            for shape, colour, x, y in slots[slot]:
                draw_shape(d, shape, w * x, h * y, r, COLORS[colour])
            drawn[slot] = np.asarray(img)
        frames.append(drawn[slot])
    return Clip(task, frames, question, answer, segment)


def write_clip(path: Path, clip: Clip, fps: float) -> None:
    """``clip`` as an MPEG-4 file (OpenCV)."""
    import cv2

    h, w = clip.frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    try:
        for f in clip.frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def write_video(path: Path, task: str, rng: random.Random, cfg) -> tuple[str, str]:
    """A clip of ``task`` written to ``path``; returns its (question, answer)."""
    clip = render_clip(task, rng, cfg)
    write_clip(path, clip, cfg.fps)
    return clip.question, clip.answer


def video_record(i: int, task: str, question: str, answer: str, video: str, prefix: str = "vid") -> dict:
    return {"id": f"{prefix}-{i}", "video": video, "task": task, "kind": "video",
            "conversations": [{"from": "human", "value": f"<vila/video>\n{question}"}, {"from": "gpt", "value": answer}]}


# ---- time-token answers: parsing and temporal IoU (paper Table 10: mean IoU, precision@0.5) ----------------
def time_tokens(text: str, time_token_format: str = "<t{t}>") -> list[int]:
    """The indices of the time tokens in ``text``, in order."""
    return [int(m) for m in time_token_pattern(time_token_format).findall(text)]


def answer_segment(text: str, time_token_format: str = "<t{t}>") -> tuple[int, int] | None:
    """(start, end) time-token indices an answer names: its first and last time token (one token: a
    one-slot segment); None without any."""
    ts = time_tokens(text, time_token_format)
    if not ts:
        return None
    return min(ts[0], ts[-1]), max(ts[0], ts[-1])


def segment_iou(pred: tuple[int, int] | None, ref: tuple[int, int]) -> float:
    """IoU of two segments of time-token slots, each slot [k, k + 1): (2, 5) covers [2, 6)."""
    if pred is None:
        return 0.0
    inter = max(0, min(pred[1], ref[1]) + 1 - max(pred[0], ref[0]))
    union = (pred[1] - pred[0] + 1) + (ref[1] - ref[0] + 1) - inter
    return inter / union


class RenderedVideos(CachedExamples):
    """``num`` video records rendered in memory (no files), tasks in turn from ``tasks``, from their own
    ``seed`` (so none is a held-out clip): the clips and questions of the held-out files, through the same
    processor path (``videos=[frames]``: the model's frame sampling and TSP pooling).

    Each is rendered on first access and its processor output kept in ``cache`` like ``RenderedImages``."""

    def __init__(self, processor, num: int, tasks: Sequence[str] | None = None, seed: int = 1, config=None,
                 cache=None):
        tasks = tuple(tasks or VIDEO_TASKS)
        bad = [t for t in tasks if t not in VIDEO_TASKS]
        if bad or num < 1:
            raise ConfigError(f"rendered videos need num >= 1 and tasks from {VIDEO_TASKS}, got {num}, {list(tasks)}")
        self.processor, self.num, self.tasks, self.seed = processor, int(num), tasks, int(seed)
        self.config = config or SyntheticConfig()
        self.cache = cache if cache is not None else ExampleCache()
        self._pkey = ExampleCache.processor_key(processor)

    def __len__(self) -> int:
        return self.num

    def clip(self, i: int) -> Clip:
        if not 0 <= i < self.num:
            raise IndexError(i)
        return render_clip(self.tasks[i % len(self.tasks)], random.Random(self.seed * 1_000_003 + i), self.config)

    def record(self, i: int) -> dict:
        c = self.clip(i)
        return video_record(i, c.task, c.question, c.answer, "", prefix="rendered")

    def lengths(self) -> list[int]:
        from .data import example_length

        return [example_length(self.processor, self.record(i)["conversations"], num_videos=1) for i in range(self.num)]

    def key(self, i: int) -> tuple:
        return (self._pkey, "rendered-video", self.seed, self.tasks, self.config.num_frames, i)

    def process(self, i: int):
        c = self.clip(i)
        conv = video_record(i, c.task, c.question, c.answer, "")["conversations"]
        return self.processor(conv, videos=[[Image.fromarray(f) for f in c.frames]], add_generation_prompt=False,
                              return_labels=True)
