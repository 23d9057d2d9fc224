"""On-device personalization: teach a model a new object from a few pictures and redeploy it.

    res = personalize(["mug1.jpg", "mug2.jpg", "mug3.jpg"], "my blue mug", "out/")
    print(res.before, "→", res.after, res.seconds, res.peak_rss_mb)

The loop: the pictures + label → a LLaVA-style JSONL (a few question phrasings, horizontally flipped
copies) → QLoRA + ViT-LayerNorm fine-tune (``finetune``) → ``merge`` → re-``calibrate`` (W8A8 SigLIP,
W4A16 AWQ Qwen2 by default, calibrated on the new pictures) → re-``export_bundle`` → the answer about a
held-out picture before (base checkpoint) and after (the new bundle). Every step's wall time and the
process's peak resident memory after it (``resource.getrusage``) are reported.

The default base model is the cached demo checkpoint (``nvila-edge demo`` makes it). Also the
``nvila-edge personalize`` verb; importing this module pulls no torch (the CLI stays instant).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TextIO

from nvila_edge.resources import peak_rss_mb

QUESTIONS = ("What is this?", "What object is in the image?", "Name the object in the picture.")


@dataclass
class PersonalizeConfig:
    question: str = QUESTIONS[0]  # asked before and after
    steps: int = 40
    r: int = 16
    alpha: int = 32
    learning_rate: float = 3e-3
    batch_size: int = 4
    mode: str = "qlora"
    vit_lr_ratio: float = 10.0
    flip: bool = True  # add horizontally flipped copies of the pictures
    vision: str = "w8a8-smoothquant"
    llm: str = "w4a16-awq"
    replay_samples: int = 32  # image records of the base model's own data mixed in (against forgetting)
    calibration_samples: int = 16
    target: str = "cpu"
    max_new_tokens: int = 16
    seed: int = 0


@dataclass
class PersonalizeResult:
    label: str
    question: str
    test_image: Path
    before: str
    after: str
    bundle: Path
    control: dict = field(default_factory=dict)  # a replay question: expected, before, after
    seconds: dict = field(default_factory=dict)  # per step
    peak_rss_mb: dict = field(default_factory=dict)  # process peak RSS after each step
    losses: list = field(default_factory=list)

    @property
    def learned(self) -> bool:
        return self.label.lower() in self.after.lower()

    def to_dict(self) -> dict:
        return {"label": self.label, "question": self.question, "test_image": str(self.test_image),
                "before": self.before, "after": self.after, "learned": self.learned, "bundle": str(self.bundle),
                "control": self.control, "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None}

    def table(self) -> str:
        rows = [f"  {k:10s} {self.seconds[k]:7.1f} s   peak RSS {self.peak_rss_mb[k]:7.0f} MB" for k in self.seconds]
        loss = f"loss {self.losses[0]:.3f} → {self.losses[-1]:.3f}" if self.losses else ""
        return "\n".join([f"[personalize] Q: {self.question}  (about {self.test_image.name})",
                          f"  before: {self.before!r}",
                          f"  after:  {self.after!r}   ({'learned' if self.learned else 'label not in the answer'}"
                          f"{'; ' + loss if loss else ''})", *self._control(), *rows,
                          f"  total      {sum(self.seconds.values()):7.1f} s   peak RSS "
                          f"{max(self.peak_rss_mb.values(), default=0):7.0f} MB", f"  bundle: {self.bundle}"])


    def _control(self) -> list[str]:
        c = self.control
        if not c:
            return []
        return [f"  control (a question it already knew): Q: {c['question']}  expected {c['expected']!r}: "
                f"before {c['before']!r}, after {c['after']!r}"]



def default_checkpoint() -> Path:
    """The last finished stage of the cached demo model; ``CheckpointError`` saying how to make it if absent."""
    from nvila_edge.errors import CheckpointError

    from .demo import DEMO_VERSION, cache_root
    from nvila_edge.training.trainer import COMPLETE

    root = cache_root() / f"demo-{DEMO_VERSION}" / "checkpoints"
    done = sorted((d for d in root.glob("stage*-*") if (d / COMPLETE).is_file()),
                  key=lambda d: int(d.name[5:].split("-")[0])) if root.is_dir() else []
    if not done:
        raise CheckpointError(f"no demo checkpoint in {root}: make it with `nvila-edge demo` (about 5 minutes on a "
                              "CPU), or pass a checkpoint (--checkpoint DIR)")
    return done[-1]


def default_replay() -> Path | None:
    """The demo model's training data, when cached (replayed with the demo checkpoint)."""
    from .demo import DEMO_VERSION, cache_root

    path = cache_root() / f"demo-{DEMO_VERSION}" / "data" / "train.jsonl"
    return path if path.is_file() else None


def replay_rows(path: Path, n: int, seed: int = 0) -> tuple[list[dict], dict | None]:
    """``n`` single-image records of ``path`` (media paths made absolute) and one more as a control question."""
    import random

    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("image"), str) and len(row.get("conversations", ())) >= 2:
            row["image"] = str((Path(path).parent / row["image"]).resolve())
            rows.append(row)
    random.Random(seed).shuffle(rows)
    picked, rest = rows[:n], rows[n:]
    return picked, (rest[0] if rest else None)


def write_dataset(images: Sequence, label: str, out_dir: Path, flip: bool = True,
                  extra_rows: Sequence[dict] = ()) -> Path:
    """The pictures (any image input) as PNGs + ``train.jsonl`` with every question phrasing → ``label``
    (plus ``extra_rows``, e.g. replayed records of the base model's data)."""
    from PIL import ImageOps

    from nvila_edge.media.image import load_image

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, src in enumerate(images):
        img = load_image(src)
        variants = [img, ImageOps.mirror(img)] if flip else [img]
        for v, pic in enumerate(variants):
            rel = f"images/{i:03d}{'-flip' if v else ''}.png"
            pic.save(out_dir / rel)
            for k, q in enumerate(QUESTIONS):
                rows.append({"id": f"p{i}-{v}-{k}", "image": rel, "conversations": [
                    {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": label}]})
    path = out_dir / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra_rows]))
    return path


def _answers_torch(checkpoint: Path, asks: Sequence[tuple], max_new_tokens: int) -> list[str]:
    """Greedy answers of a checkpoint to (image, question) pairs (the model is loaded once)."""
    from nvila_edge import NVILAModel, NVILAProcessor

    model = NVILAModel.from_pretrained(checkpoint)
    proc = NVILAProcessor.from_pretrained(checkpoint)
    return [model.generate(**proc(q, images=[img]), max_new_tokens=max_new_tokens).text.strip() for img, q in asks]


def _answers_bundle(bundle: Path, asks: Sequence[tuple], max_new_tokens: int) -> list[str]:
    from nvila_edge.runtime import Runtime

    with Runtime.load(bundle) as rt:
        return [rt.generate(q, images=[img], max_new_tokens=max_new_tokens).text.strip() for img, q in asks]


def personalize(images: Sequence, label: str, output_dir: str | Path, *, checkpoint: str | Path | None = None,
                test_image=None, replay: str | Path | None = None, config: PersonalizeConfig | None = None,
                progress: bool = False, out: TextIO | None = None) -> PersonalizeResult:
    """Fine-tune ``checkpoint`` (default: the demo model) on ``images`` labelled ``label``, merge, calibrate,
    export to ``output_dir/bundle`` and compare the answers about ``test_image`` (default: the last picture,
    held out of training when there are at least 3) before and after. ``replay``: a JSONL of the base
    model's data (default with the demo model: its cached training data) whose image records are mixed in
    so the model keeps what it knew; one more of its questions is asked before and after as a control."""
    from nvila_edge.calibration import calibrate
    from nvila_edge.errors import ConfigError
    from nvila_edge.export import export_bundle

    from nvila_edge.training.finetune import finetune, merge
    from nvila_edge.training.finetune_config import FinetuneConfig

    cfg = config or PersonalizeConfig()
    out = out or sys.stdout
    images = list(images)
    if not images or not label.strip():
        raise ConfigError("personalization needs at least one picture and a non-empty label")
    if test_image is None:
        test_image = images[-1]
        if len(images) >= 3:
            images = images[:-1]
    base = Path(checkpoint) if checkpoint else default_checkpoint()
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    seconds, peak = {}, {}

    def step(name: str, fn):
        print(f"[personalize] {name} ...", file=out, flush=True)
        t0 = time.perf_counter()
        value = fn()
        seconds[name], peak[name] = time.perf_counter() - t0, peak_rss_mb()
        return value

    replay = Path(replay) if replay else (default_replay() if checkpoint is None else None)
    extra, known = replay_rows(replay, cfg.replay_samples, cfg.seed) if replay and cfg.replay_samples else ([], None)
    data = step("data", lambda: write_dataset(images, label, root / "data", cfg.flip, extra))
    asks = [(test_image, cfg.question)]
    control = {}
    if known is not None:
        control = {"image": known["image"], "question": known["conversations"][0]["value"].replace("<image>", "").strip(),
                   "expected": known["conversations"][1]["value"]}
        asks.append((control["image"], control["question"]))
    answers = step("before", lambda: _answers_torch(base, asks, cfg.max_new_tokens))
    before = answers[0]
    if control:
        control["before"] = answers[1]
    ft_cfg = FinetuneConfig(mode=cfg.mode, r=cfg.r, alpha=cfg.alpha, learning_rate=cfg.learning_rate,
                            vit_lr_ratio=cfg.vit_lr_ratio, max_steps=cfg.steps, batch_size=cfg.batch_size,
                            # a small model on a CPU: one forward per batch, no recompute (the measured timings)
                            micro_batch_size=cfg.batch_size, gradient_checkpointing=False,
                            scheduler="constant", warmup_ratio=0.0, seed=cfg.seed)
    ft = step("finetune", lambda: finetune(base, data, root / "finetune", ft_cfg, progress=progress))
    losses = ft.metrics.get("loss_history", [])
    del ft
    merged = step("merge", lambda: merge(base, root / "finetune", root / "merged"))
    n = len(data.read_text().splitlines())
    step("calibrate", lambda: calibrate(merged, root / "calibrated", vision=cfg.vision, llm=cfg.llm, data=data,
                                        num_samples=min(cfg.calibration_samples, n), num_heldout=2,
                                        seed=cfg.seed, progress=progress))
    bundle = root / "bundle"
    step("export", lambda: export_bundle(root / "calibrated", bundle, cfg.target, progress=progress))

    answers = step("after", lambda: _answers_bundle(bundle, asks, cfg.max_new_tokens))
    after = answers[0]
    if control:
        control["after"] = answers[1]
    name = Path(test_image) if isinstance(test_image, (str, Path)) else Path("test-image")
    res = PersonalizeResult(label, cfg.question, name, before, after, bundle, control, seconds, peak, losses)
    (root / "personalize.json").write_text(json.dumps(res.to_dict(), indent=2))
    return res


# ---- command line ----------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser("personalize", help="teach the model a new object from a few pictures and re-export the bundle")
    p.add_argument("images", nargs="+", help="a few pictures of the object (files, or a folder of them)")
    p.add_argument("--label", required=True, help='what the object is called (the answer to "What is this?")')
    p.add_argument("-o", "--output", default="personalized", help="work directory (data, fine-tune, bundle)")
    p.add_argument("--checkpoint", help="base checkpoint (default: the cached `nvila-edge demo` model)")
    p.add_argument("--test-image", help="picture to ask about before and after (default: the last, held out)")
    p.add_argument("--question", default=QUESTIONS[0])
    p.add_argument("--replay", help="JSONL of the base model's data to mix in (default with the demo model: its data)")
    p.add_argument("--replay-samples", type=int, default=PersonalizeConfig.replay_samples,
                   help="image records of --replay mixed in (0: none)")
    p.add_argument("--steps", type=int, default=PersonalizeConfig.steps)
    p.add_argument("--lr", type=float, default=PersonalizeConfig.learning_rate)
    p.add_argument("--mode", choices=("lora", "qlora"), default="qlora")
    p.add_argument("--target", default="cpu", help="bundle target (cpu, tensorrt, torch, all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=personalize_main)


def _expand(paths: Sequence[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        out += sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp")) \
            if p.is_dir() else [p]
    return out


def personalize_main(args) -> int:
    cfg = PersonalizeConfig(question=args.question, steps=args.steps, learning_rate=args.lr, mode=args.mode,
                            target=args.target, replay_samples=args.replay_samples)
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # the libraries' progress prints: stdout keeps only the result
        res = personalize(_expand(args.images), args.label, args.output, checkpoint=args.checkpoint,
                          test_image=args.test_image, replay=args.replay, config=cfg, out=sys.stderr)
    print(json.dumps(res.to_dict(), indent=2) if args.json else res.table(), flush=True)
    return 0
