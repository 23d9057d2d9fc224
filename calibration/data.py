"""Calibration data: images, videos and prompts from a directory or a training JSONL, preprocessed by the
same ``NVILAProcessor`` as inference (Dynamic-S2 tiles, Lite tiles and video frames included)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from nvila_edge import NVILAProcessor, ProcessedInputs
from nvila_edge.errors import CalibrationError, MediaError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
DEFAULT_PROMPTS = ("Describe the image in detail.", "What objects are in the image, and where are they?",
                   "What is written in the image?", "What happens in the video?")


def _from_directory(folder: Path, rng: random.Random) -> list[dict]:
    """Every image / video in ``folder`` (recursively) with a prompt from ``prompts.txt`` or the defaults."""
    prompts_file = folder / "prompts.txt"
    prompts = [p.strip() for p in prompts_file.read_text(encoding="utf-8").splitlines() if p.strip()] \
        if prompts_file.is_file() else list(DEFAULT_PROMPTS)
    items = []
    for f in sorted(folder.rglob("*")):
        ext = f.suffix.lower()
        if ext in IMAGE_EXTS:
            items.append({"conversation": f"<image>\n{rng.choice(prompts)}", "images": [f]})
        elif ext in VIDEO_EXTS:
            items.append({"conversation": f"<vila/video>\n{rng.choice(prompts)}", "videos": [f]})
    # text-only prompts exercise the LLM without media
    items += [{"conversation": p} for p in prompts[:2]]
    return items


def _from_jsonl(path: Path) -> list[dict]:
    from nvila_edge.training.data import read_jsonl  # one JSONL parser for the whole SDK

    items = []
    for r in read_jsonl(path):
        item = {"conversation": r.conversations}
        if r.images:
            item["images"] = list(r.images)
        if r.video:
            item["videos"] = [r.video]
        items.append(item)
    return items


def load_calibration_data(source: str | Path | Sequence[dict], processor: NVILAProcessor, num_samples: int = 64,
                          seed: int = 0, progress: bool = True) -> list[ProcessedInputs]:
    """``num_samples`` processed prompts (media + text, answers included when the source has them).

    ``source``: a directory of images / videos (optional ``prompts.txt``), a VILA/LLaVA JSONL file, or a
    list of ``{"conversation", "images", "videos"}`` dicts. Unreadable media are skipped with a count."""
    if num_samples < 1:
        raise CalibrationError(f"num_samples must be ≥ 1, got {num_samples}")
    rng = random.Random(seed)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            items = _from_directory(path, rng)
            if len(items) <= 2:
                raise CalibrationError(f"calibration directory {path} has no images or videos "
                                       f"(looked for {', '.join(sorted(IMAGE_EXTS | VIDEO_EXTS))})")
        elif path.is_file():
            items = _from_jsonl(path)
        else:
            raise CalibrationError(f"calibration data {path} does not exist; pass a directory of images/videos or a JSONL file")
    else:
        items = list(source)
    if not items:
        raise CalibrationError("the calibration data is empty; pass at least one image, video or prompt")
    rng.shuffle(items)
    out, skipped = [], 0
    for item in tqdm(items, desc="calibration data", disable=not progress, total=min(len(items), num_samples)):
        if len(out) >= num_samples:
            break
        try:
            out.append(processor(item["conversation"], images=item.get("images"), videos=item.get("videos"),
                                 add_generation_prompt=False))
        except MediaError:
            skipped += 1
    if not out:
        raise CalibrationError(f"none of the {len(items)} calibration items could be read ({skipped} unreadable)")
    return out
