"""Synthetic, offline NVILA training data: rendered shapes (colour, shape, count, position, size), short
rendered words (OCR-like), wide and tall images (so Dynamic-S2 grids vary) and short videos (appearing,
moving and colour-changing shapes) with temporal questions and time tokens.

Writes a LLaVA/VILA-style JSONL data set with media paths relative to the file: ``train.jsonl`` and
``heldout.jsonl`` (split by seed), plus ``captions.jsonl`` for the alignment stages.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from nvila_edge.errors import ConfigError
from nvila_edge.io import atomic_directory

from .data import CachedExamples, ExampleCache, example_length
from .drawing import COLORS, SHAPES, background, draw_shape, font as sized_font
from .synthetic_config import SyntheticConfig
from .synthetic_video import VIDEO_TASKS, video_record, write_video  # noqa: F401  (write_video: the file writer tests patch)

WORDS = ("cat", "dog", "sun", "car", "box", "map", "cup", "pen")
# (width, height): camera shapes, wide (16:9, 4:3), tall (9:16, 3:4) and square, so the Dynamic-S2 grid
# varies (2x2, 3x2, 2x3). Not the 3:1 / 2:1 shapes of earlier versions: the first scale squashes every image
# to one 112-px tile, where a 3:1 image's letters come out a third as wide as tall; the demo tower read words
# from those at 68 % held out against 86 % from these (circle vs square: 67 % against 80 %; docs/BENCHMARKS.md)
IMAGE_SIZES = ((224, 224), (320, 180), (180, 320), (280, 210), (210, 280), (256, 192), (192, 256), (240, 240))
IMAGE_TASKS = ("color", "shape", "count", "position", "size", "ocr")  # question types
# image kinds (a record's "task"): object → color/shape/position/size, count → count/color, ocr → ocr;
# count and ocr are the harder ones, so they come up more often than their share of questions
IMAGE_KINDS = ("object", "count", "ocr", "count", "ocr")
CHAT_ROLES = ("system", "user", "assistant")


def render_scene(kind: str, rng: random.Random) -> tuple[Image.Image, list[tuple[str, str, str]], str]:
    """One image of ``kind`` ("object", "count" or "ocr") with its questions [(task, question, answer)]
    and a caption. Several questions per image make every vision pass supervise several answers."""
    size = rng.choice(IMAGE_SIZES)
    w, h = size
    img = background(rng, size)
    d = ImageDraw.Draw(img)
    shape, cname = rng.choice(SHAPES), rng.choice(list(COLORS))
    m = min(w, h)
    if kind == "count":
        n = rng.randint(1, 4)
        # one shape per cell of a 4x2 grid; with the +-5 % jitter below, this radius keeps neighbours apart
        # (m * 0.1 let same-coloured shapes touch or merge in square and tall images: wrong counts)
        r = 0.28 * min(w / 4, h / 2)
        cells = [(i, j) for i in range(4) for j in range(2)]
        rng.shuffle(cells)
        for i, j in cells[:n]:
            cx = (i + 0.5) * w / 4 + rng.uniform(-0.05, 0.05) * w
            cy = (j + 0.5) * h / 2 + rng.uniform(-0.05, 0.05) * h
            cx, cy = min(max(cx, r), w - r), min(max(cy, r), h - r)
            draw_shape(d, shape, cx, cy, r, COLORS[cname])
        plural = shape + ("es" if shape.endswith("s") else "s")
        qas = [("count", f"How many {plural} are there?", str(n)),
               ("color", f"What color are the {plural}?" if n > 1 else f"What color is the {shape}?", cname)]
        return img, qas, f"{n} {cname} {plural if n > 1 else shape}"
    if kind == "ocr":
        word = rng.choice(WORDS)
        font = sized_font(int(m * 0.35))
        box = d.textbbox((0, 0), word.upper(), font=font)
        tw, th = box[2] - box[0], box[3] - box[1]
        x = rng.uniform(0.05 * w, max(0.05 * w, w - tw - 0.05 * w))
        y = rng.uniform(0.05 * h, max(0.05 * h, h - th - 0.05 * h))
        d.text((x - box[0], y - box[1]), word.upper(), fill=(20, 20, 20), font=font)
        return img, [("ocr", "What word is written in the image?", word)], f"the word {word}"
    big = rng.random() < 0.5
    r = m * (rng.uniform(0.3, 0.38) if big else rng.uniform(0.1, 0.15))
    left = rng.random() < 0.5
    # keep the shape clearly on one side so "left or right" always has one answer
    lo, hi = (r, max(r, w * 0.4)) if left else (min(w - r, w * 0.6), w - r)
    cx = rng.uniform(lo, hi)
    cy = rng.uniform(r, h - r) if h > 2 * r else h / 2
    draw_shape(d, shape, cx, cy, r, COLORS[cname])
    side = "left" if cx < w / 2 else "right"
    # the questions never name the shape: a record asks all four in one conversation, and a name in one
    # question would give away the answer to "what shape" (the model learned to copy it instead of looking)
    qas = [("color", "What color is the shape?", cname),
           ("shape", "What shape is in the image?", shape),
           ("position", "Is the shape on the left or the right?", side),
           ("size", "Is the shape big or small?", "big" if big else "small")]
    return img, qas, f"a {'big' if big else 'small'} {cname} {shape} on the {side}"


def scene_record(i: int, rng: random.Random, image: str = "") -> tuple[Image.Image, dict, dict]:
    """Image ``i`` of the data set (its kind follows ``IMAGE_KINDS``): the picture, its multi-question
    record (questions in random order, the placeholder on the first) and its caption record."""
    kind = IMAGE_KINDS[i % len(IMAGE_KINDS)]
    img, qas, cap = render_scene(kind, rng)
    rng.shuffle(qas)
    conv = []
    for k, (_, q, a) in enumerate(qas):
        conv += [{"from": "human", "value": f"<image>\n{q}" if k == 0 else q}, {"from": "gpt", "value": a}]
    rec = {"id": f"img-{i}", "image": image, "task": kind, "kind": "image", "tasks": [t for t, _, _ in qas],
           "conversations": conv}
    caption = {"id": f"cap-{i}", "image": image, "task": "caption", "kind": "image",
               "conversations": [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": cap}]}
    return img, rec, caption


class RenderedImages(CachedExamples):
    """``num`` image records of the synthetic generator rendered in memory (no files): the same scenes and
    questions as ``make_dataset``, from their own seed, so none is a held-out image.

    Each example is rendered on first access (deterministic from ``seed`` and its index) and its processor
    output kept, pixels in float16, while the kept pixels stay under ``cache_bytes``; later epochs reuse it.
    Writing images as PNG costs ~10 ms each here (the noisy backgrounds compress badly) against ~2 ms to
    render, so a stage that wants many fresh images takes them from here."""

    def __init__(self, processor, num: int, kinds: Sequence[str] | None = None, seed: int = 1,
                 cache_bytes: int = 2 << 30, cache: ExampleCache | None = None):
        kinds = tuple(kinds or dict.fromkeys(IMAGE_KINDS))
        bad = [k for k in kinds if k not in IMAGE_KINDS]
        if bad or num < 1:
            raise ConfigError(f"rendered images need num >= 1 and kinds from {sorted(set(IMAGE_KINDS))}, got {num}, {list(kinds)}")
        self.processor, self.num, self.seed = processor, int(num), int(seed)
        self.kinds = kinds
        # indices into IMAGE_KINDS of the wanted kinds, in the generator's proportions
        self.slots = [j for j, k in enumerate(IMAGE_KINDS) if k in kinds]
        self.cache = cache if cache is not None else ExampleCache(cache_bytes)
        self._pkey = ExampleCache.processor_key(processor)

    def __len__(self) -> int:
        return self.num

    @property
    def cached_bytes(self) -> int:
        return self.cache.used_bytes

    def record(self, i: int) -> tuple[Image.Image, dict]:
        if not 0 <= i < self.num:
            raise IndexError(i)
        j = self.slots[i % len(self.slots)] + len(IMAGE_KINDS) * (i // len(self.slots))
        img, rec, _ = scene_record(j, random.Random(self.seed * 1_000_003 + i))
        return img, rec

    def lengths(self) -> list[int]:
        """Each example's sequence length (renders every image once: ~2 ms each)."""
        out = []
        for i in range(self.num):
            img, rec = self.record(i)
            out.append(example_length(self.processor, rec["conversations"], [img.size]))
        return out

    def key(self, i: int) -> tuple:
        return (self._pkey, "rendered", self.seed, self.kinds, i)

    def process(self, i: int):
        """Example ``i`` rendered and through the processor (no cache)."""
        img, rec = self.record(i)
        return self.processor(rec["conversations"], images=[img], add_generation_prompt=False, return_labels=True)


def make_dataset(out_dir: str | Path, config: SyntheticConfig | None = None, progress: bool = True) -> dict[str, Path]:
    """Write the data set to ``out_dir`` atomically; return the JSONL paths."""
    cfg = config or SyntheticConfig()
    if cfg.num_frames < 1 or cfg.sampled_frames < 1 or cfg.fps <= 0:
        raise ConfigError(f"videos need num_frames >= 1, sampled_frames >= 1 and fps > 0, got {cfg}")
    rng = random.Random(cfg.seed)
    held_rng = random.Random(cfg.seed + 7_919)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "videos").mkdir()
        records: list[dict] = []
        captions: list[dict] = []
        for i in tqdm(range(cfg.num_images), desc="synthetic images", disable=not progress):
            rel = f"images/{i:05d}.png"
            img, rec, cap = scene_record(i, rng, rel)
            img.save(tmp / rel)
            records.append(rec)
            captions.append(cap)
        videos = [("train", i, "vid") for i in range(cfg.num_videos)] + [("heldout", i, "heldvid") for i in range(cfg.num_heldout_videos)]
        video_rows: dict[str, list[dict]] = {"train": [], "heldout": []}
        for split_name, i, prefix in tqdm(videos, desc="synthetic videos", disable=not progress):
            task = VIDEO_TASKS[i % len(VIDEO_TASKS)]
            rel = f"videos/{prefix}-{i:05d}.mp4"
            # the held-out clips from their own stream: more or fewer training clips leave them unchanged
            q, a = write_video(tmp / rel, task, rng if split_name == "train" else held_rng, cfg)
            video_rows[split_name].append(video_record(i, task, q, a, rel, prefix=prefix))
        split = random.Random(cfg.seed + 1)
        train, held = [], []
        for r in records:
            (held if split.random() < cfg.heldout_fraction else train).append(r)
        train += video_rows["train"]
        held += video_rows["heldout"]
        held_ids = {r["image"] for r in held if "image" in r}
        captions = [c for c in captions if c["image"] not in held_ids]
        for name, rows in (("train", train), ("heldout", held), ("captions", captions)):
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "synthetic.json").write_text(json.dumps({**cfg.__dict__, "video_size": list(cfg.video_size)}, indent=2))
    return {name: out_dir / f"{name}.jsonl" for name in ("train", "heldout", "captions")}


def corpus(config: SyntheticConfig | None = None) -> list[str]:
    """Every question / answer / caption string the generator can produce: the demo tokenizer's corpus."""
    out = ["Describe the image.", "What shape is in the image?", "What color is the shape?", "Is the shape big or small?",
           "Is the shape on the left or the right?", "What color are the circles?", "What word is written in the image?",
           "Which shape appears first?", "How many shapes appear in the video?", "You are a helpful assistant"]
    for s in SHAPES:
        plural = s + ("es" if s.endswith("s") else "s")
        out += [f"What color is the {s}?", f"What color are the {plural}?", f"Is the {s} on the left or the right?", f"Is the {s} big or small?",
                f"How many {plural} are there?", f"When is the {s} visible?", f"What color does the {s} turn into?",
                f"Which direction does the {s} move?"]
        for c in COLORS:
            for size in ("big", "small"):
                for side in ("left", "right"):
                    out.append(f"a {size} {c} {s} on the {side}")
            out += [f"{n} {c} {plural}" for n in range(2, 5)]
    out += [f"the word {w}" for w in WORDS] + list(WORDS) + [str(n) for n in range(10)]
    # "when" answers are segments, "<t2> to <t5>": " to" between two time tokens
    out += ["from start to end"] * 8
    # the chat template puts each role name and each answer at the start of a line, where BPE sees them
    # without a leading space: learned as whole words, a turn costs 8 fewer tokens and most answers are one
    # token (LM stages ~20 % shorter; docs/BENCHMARKS.md)
    out += list(CHAT_ROLES) * 8 + [*COLORS, *SHAPES, "big", "small", "left", "right"] * 2
    return out * 4
