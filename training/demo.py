"""`nvila-edge demo`: the embedded default, fully offline.

Makes the synthetic data, trains the `demo` preset (NVILA architecture at small size) through the five
stages with our own trainer, caches everything under the user cache directory (re-runs reuse it), reports
held-out accuracy and answers a few held-out questions with streaming output.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from nvila_edge import NVILAModel, NVILAProcessor
from nvila_edge.io import atomic_write_text

from .data import read_jsonl
from .evaluate import evaluate, single_questions
from .recipe import demo_recipe
from .synthetic import SyntheticConfig, make_dataset
from .tokenizer import demo_tokenizer
from .trainer import last_checkpoint, run_recipe

DEMO_VERSION = "v2"  # bump when the data, recipe or preset change so old caches are not reused


def cache_root() -> Path:
    """``$NVILA_EDGE_CACHE``, else ``$XDG_CACHE_HOME/nvila-edge``, else ``~/.cache/nvila-edge``."""
    if os.environ.get("NVILA_EDGE_CACHE"):
        return Path(os.environ["NVILA_EDGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nvila-edge"


@dataclass
class DemoResult:
    checkpoint: Path
    image_accuracy: float
    video_accuracy: float
    per_task: dict
    trained_now: bool
    train_seconds: float


def build_demo_model(root: Path, retrain: bool = False, progress: bool = True, out: TextIO = sys.stdout) -> tuple[Path, bool, float]:
    """Data + tokenizer + the five stages; returns (final checkpoint, trained now?, seconds)."""
    data = root / "data"
    cfg = SyntheticConfig()
    if retrain and (root / "checkpoints").exists():
        import shutil

        shutil.rmtree(root / "checkpoints")
    if not (data / "train.jsonl").is_file():
        print(f"[demo] writing synthetic data to {data}", file=out, flush=True)
        make_dataset(data, cfg, progress=progress)
    recipe = demo_recipe(data)
    done = last_checkpoint(recipe, root / "checkpoints")
    if done is not None and done.name.endswith(recipe.stages[-1].name):
        return done, False, 0.0
    print(f"[demo] training the demo model through {len(recipe.stages)} stages (cached in {root})", file=out, flush=True)
    t0 = time.perf_counter()
    results = run_recipe(recipe, root / "checkpoints", tokenizer=demo_tokenizer(cfg), progress=progress)
    for r in results:
        loss = r.metrics.get("loss_history") or [r.metrics.get("train_loss", float("nan"))]
        print(f"[demo]   {r.name:16s} {r.metrics.get('examples', 0):5d} examples  final loss {loss[-1]:.3f}"
              f"{'  (cached)' if r.skipped else ''}", file=out, flush=True)
    return last_checkpoint(recipe, root / "checkpoints"), True, time.perf_counter() - t0


def run_demo(cache_dir: str | Path | None = None, retrain: bool = False, questions: int = 4,
             progress: bool = True, out: TextIO = sys.stdout) -> DemoResult:
    root = Path(cache_dir) if cache_dir else cache_root() / f"demo-{DEMO_VERSION}"
    ckpt, trained, secs = build_demo_model(root, retrain=retrain, progress=progress, out=out)
    model = NVILAModel.from_pretrained(ckpt)
    processor = NVILAProcessor.from_pretrained(ckpt)
    held = single_questions(read_jsonl(root / "data" / "heldout.jsonl"))
    report_file = root / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() and not trained else None
    if report is None or report.get("checkpoint") != str(ckpt):
        img = evaluate(model, processor, [r for r in held if not r.video], progress=progress)
        vid = evaluate(model, processor, [r for r in held if r.video], progress=progress)
        report = {"checkpoint": str(ckpt), "image": img.to_dict(), "video": vid.to_dict(),
                  "train_seconds": secs or None}
        atomic_write_text(report_file, json.dumps(report, indent=2))
    img, vid = report["image"], report["video"]
    print(f"[demo] held-out accuracy (exact answer match): images {100 * img['accuracy']:.1f} % "
          f"({img['correct']}/{img['total']}), videos {100 * vid['accuracy']:.1f} % ({vid['correct']}/{vid['total']})",
          file=out, flush=True)
    print("[demo] per task: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in {**img["per_task"], **vid["per_task"]}.items()),
          file=out, flush=True)
    picks = [r for r in held if not r.video][:max(questions - 1, 0)] + [r for r in held if r.video][:1]
    for r in picks[:questions]:
        media = r.video.name if r.video else ", ".join(p.name for p in r.images)
        q = r.question[-1]["value"].replace("<image>", "").replace("<vila/video>", "").strip()
        print(f"\n[{media}] Q: {q}\nA: ", end="", file=out, flush=True)
        inputs = processor(r.question, images=r.images or None, videos=[r.video] if r.video else None)
        for ev in model.stream(**inputs, max_new_tokens=16):
            if ev.type == "token":
                print(ev.text, end="", file=out, flush=True)
            else:
                t = ev.timings
                print(f"   (expected: {r.answer}; ttft {t.ttft_ms:.0f} ms, {ev.usage.prompt_tokens} prompt tokens)",
                      file=out, flush=True)
    return DemoResult(ckpt, img["accuracy"], vid["accuracy"], {**img["per_task"], **vid["per_task"]}, trained, secs)
