"""`nvila-edge demo`: the embedded default, fully offline — the whole SDK pipeline end to end.

Makes the synthetic data, trains the `demo` preset (NVILA architecture at small size) through the five
stages with our own trainer, calibrates it with ModelOpt (W8A8 SigLIP, W4A16 AWQ Qwen2), exports the CPU
bundle (INT8 vision ONNX + int4 decoder ONNX), and answers held-out questions with streaming output from
the ONNX Runtime engine. Every step is cached under the user cache directory (re-runs reuse it).
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
from nvila_edge.resources import cpu_cores, cpu_name

from nvila_edge.training.data import read_jsonl
from nvila_edge.training.evaluate import evaluate, single_questions
from nvila_edge.training.recipe import demo_recipe
from nvila_edge.training.synthetic import SyntheticConfig, make_dataset
from nvila_edge.training.tokenizer import demo_tokenizer
from nvila_edge.training.trainer import last_checkpoint, run_recipe

DEMO_VERSION = "v8"
EVAL_QUESTIONS = 200  # held-out image questions scored before / after quantization and on the bundle
CALIBRATION_SAMPLES = 64  # bump when the data, recipe or preset change so old caches are not reused
# bundle_parity runs, each cached in deploy.json under its key: (key, Runtime.load's llm_engine, printed name)
PARITY_ENGINES = (("bundle", None, "ONNX Runtime"), ("bundle_llamacpp", "llamacpp", "llama.cpp engine"))


def cache_root() -> Path:
    """``$NVILA_EDGE_CACHE``, else ``$XDG_CACHE_HOME/nvila-edge``, else ``~/.cache/nvila-edge``."""
    if os.environ.get("NVILA_EDGE_CACHE"):
        return Path(os.environ["NVILA_EDGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nvila-edge"


def demo_dir(seed: int = 0) -> Path:
    """The demo's cache folder: one per version and training seed."""
    return cache_root() / (f"demo-{DEMO_VERSION}" + (f"-seed{seed}" if seed else ""))


@dataclass
class DemoResult:
    checkpoint: Path
    image_accuracy: float
    video_accuracy: float
    per_task: dict
    trained_now: bool
    train_seconds: float
    temporal: dict  # "when" answers: questions, mean_iou, precision_at_0_5 (paper Table 10's measures)
    seed: int = 0
    cpu: str = ""


def build_demo_model(root: Path, retrain: bool = False, progress: bool = True, out: TextIO = sys.stdout,
                     verbose: bool = False, seed: int = 0) -> tuple[Path, bool, float]:
    """Data + tokenizer + the five stages; returns (final checkpoint, trained now?, seconds).

    Per stage one progress bar and one summary line; the Trainer's logs go to the stage's metrics.json
    (``verbose``: also to the terminal, as transformers prints them)."""
    data = root / "data"
    cfg = SyntheticConfig()
    if retrain and (root / "checkpoints").exists():
        import shutil

        shutil.rmtree(root / "checkpoints")
    if not (data / "train.jsonl").is_file():
        print(f"[demo] writing synthetic data to {data}", file=out, flush=True)
        make_dataset(data, cfg, progress=progress)
    recipe = demo_recipe(data)
    recipe.seed = seed
    done = last_checkpoint(recipe, root / "checkpoints")
    if done is not None and done.name.endswith(recipe.stages[-1].name):
        return done, False, 0.0
    print(f"[demo] training the demo model through {len(recipe.stages)} stages (cached in {root})", file=out, flush=True)
    t0 = time.perf_counter()

    def summary(r):
        loss = r.metrics.get("loss_history") or [r.metrics.get("train_loss", float("nan"))]
        print(f"[demo]   {r.name:16s} {r.metrics.get('examples', 0):5d} examples  final loss {loss[-1]:.3f}"
              f"{'  (cached)' if r.skipped else ''}  logs: {r.checkpoint / 'metrics.json'}", file=out, flush=True)

    run_recipe(recipe, root / "checkpoints", tokenizer=demo_tokenizer(cfg), progress=progress, verbose=verbose,
               on_stage=summary)
    return last_checkpoint(recipe, root / "checkpoints"), True, time.perf_counter() - t0


def run_demo(cache_dir: str | Path | None = None, retrain: bool = False, questions: int = 4,
             progress: bool = True, out: TextIO = sys.stdout, verbose: bool = False, seed: int = 0) -> DemoResult:
    root = Path(cache_dir) if cache_dir else demo_dir(seed)
    ckpt, trained, secs = build_demo_model(root, retrain=retrain, progress=progress, out=out, verbose=verbose, seed=seed)
    model = NVILAModel.from_pretrained(ckpt)
    processor = NVILAProcessor.from_pretrained(ckpt)
    held = single_questions(read_jsonl(root / "data" / "heldout.jsonl"))
    report_file = root / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() and not trained else None
    if report is None or report.get("checkpoint") != str(ckpt):
        img = evaluate(model, processor, [r for r in held if not r.video], progress=progress)
        vid = evaluate(model, processor, [r for r in held if r.video], progress=progress)
        report = {"checkpoint": str(ckpt), "image": img.to_dict(), "video": vid.to_dict(), "seed": seed,
                  "train_seconds": secs or None, "cpu": cpu_name(), "cores": cpu_cores()}
        atomic_write_text(report_file, json.dumps(report, indent=2))
    print_report(report, out)
    bundle = deploy_demo(root, ckpt, held, progress=progress, out=out, verbose=verbose)
    from nvila_edge.runtime import Runtime

    rt = Runtime.load(bundle, backend="onnxruntime")
    print(f"[demo] answering with the bundle on {rt.describe()['backend']} ({bundle})", file=out, flush=True)
    videos = [r for r in held if r.video]
    picks = [r for r in held if not r.video][:max(questions - 1, 0)] + ([r for r in videos if r.task == "when"] or videos)[:1]
    for r in picks[:questions]:
        media = r.video.name if r.video else ", ".join(p.name for p in r.images)
        q = r.question[-1]["value"].replace("<image>", "").replace("<vila/video>", "").strip()
        print(f"\n[{media}] Q: {q}\nA: ", end="", file=out, flush=True)
        for ev in rt.stream(r.question, images=[str(p) for p in r.images] or None,
                            video=str(r.video) if r.video else None, max_new_tokens=16):
            if ev.type == "token":
                print(ev.text, end="", file=out, flush=True)
            elif ev.type == "finish":
                t = ev.timings
                print(f"   (expected: {r.answer}; ttft {t.ttft_ms:.0f} ms, {ev.usage.prompt_tokens} prompt tokens)",
                      file=out, flush=True)
    rt.close()
    img, vid = report["image"], report["video"]
    return DemoResult(ckpt, img["accuracy"], vid["accuracy"], {**img["per_task"], **vid["per_task"]}, trained,
                      report.get("train_seconds") or 0.0, vid.get("temporal") or {}, seed, report.get("cpu", ""))


def print_report(report: dict, out: TextIO = sys.stdout) -> None:
    """The held-out figures of a demo report: accuracy per kind and task, temporal IoU, the machine."""
    img, vid = report["image"], report["video"]

    def tasks(r):
        return ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["per_task"].items())

    where = f"{report.get('cpu') or cpu_name()}, {report.get('cores') or cpu_cores()} cores"
    if report.get("train_seconds"):
        print(f"[demo] trained in {report['train_seconds']:.0f} s on {where} (seed {report.get('seed', 0)})",
              file=out, flush=True)
    print(f"[demo] held-out accuracy (exact answer match): images {100 * img['accuracy']:.1f} % "
          f"({img['correct']}/{img['total']}), videos {100 * vid['accuracy']:.1f} % ({vid['correct']}/{vid['total']})"
          f" — {where}", file=out, flush=True)
    print(f"[demo] images per task: {tasks(img)}", file=out, flush=True)
    print(f"[demo] videos per task: {tasks(vid)}", file=out, flush=True)
    if t := vid.get("temporal"):
        print(f"[demo] \"when\" ({t['questions']} questions, answers are time-token segments): exact "
              f"{100 * vid['per_task'].get('when', 0.0):.1f} %, mean IoU {t['mean_iou']:.3f}, "
              f"precision@0.5 {100 * t['precision_at_0_5']:.1f} %", file=out, flush=True)


def deploy_demo(root: Path, ckpt: Path, held, progress: bool = True, out: TextIO = sys.stdout,
                verbose: bool = False) -> Path:
    """Calibrate (W8A8 SmoothQuant vision, W4A16 AWQ LLM) and export the CPU bundle (plus the gguf target where
    llama.cpp is installed), all cached, and print the bundle's parity with the calibrated torch model per engine."""
    from nvila_edge.bundle import Bundle
    from nvila_edge.calibration import calibrate, is_calibrated
    from nvila_edge.errors import BundleError
    from nvila_edge.export import export_bundle

    cal, bundle = root / "calibrated", root / "bundle"
    stamp = root / "deploy.json"
    state = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if state.get("checkpoint") != str(ckpt) or not is_calibrated(cal):
        print("[demo] calibrating with ModelOpt: vision w8a8-smoothquant, llm w4a16-awq", file=out, flush=True)
        images = [r for r in held if not r.video][:EVAL_QUESTIONS]
        res = calibrate(ckpt, cal, vision="w8a8-smoothquant", llm="w4a16-awq", data=root / "data" / "train.jsonl",
                        num_samples=CALIBRATION_SAMPLES, heldout=root / "data" / "heldout.jsonl", num_heldout=16,
                        eval_records=images, progress=progress and verbose)  # its five inner bars: --verbose
        # the figures themselves are the "[demo] quantization:" line below, printed on cached runs too
        print(res.fidelity.table() if verbose else f"[demo] fidelity report: {cal / 'fidelity.json'}", file=out, flush=True)
        state = {"checkpoint": str(ckpt), "fidelity": res.fidelity.to_dict()}
        atomic_write_text(stamp, json.dumps(state, indent=2))
        if bundle.exists():
            import shutil

            shutil.rmtree(bundle)
    targets = bundle_targets()
    try:
        missing = set(targets) - set(Bundle.open(bundle).targets)  # a cached cpu-only bundle gains the gguf target
    except BundleError:
        missing = set(targets)
    if missing:
        print("[demo] exporting the CPU bundle (INT8 Q/DQ vision ONNX, int4 MatMulNBits decoder ONNX"
              f"{'; gguf target: Q4_0 / Q8_0 GGUF decoder for llama.cpp' if 'gguf' in targets else ''})", file=out, flush=True)
        print(f"[demo] {export_bundle(cal, bundle, targets, progress=progress)}", file=out, flush=True)
        for key, _, _ in PARITY_ENGINES:
            state.pop(key, None)
    images = [r for r in held if not r.video][:EVAL_QUESTIONS]
    for key, engine, label in PARITY_ENGINES:  # parity ladder's last rung on trained weights: calibrated torch vs bundle
        if engine == "llamacpp" and "gguf" not in targets:
            continue
        if key not in state:
            state[key] = bundle_parity(cal, bundle, images, progress=progress, llm_engine=engine)
            atomic_write_text(stamp, json.dumps(state, indent=2))
        p = state[key]
        print(f"[demo] bundle ({label}) vs calibrated torch on {p['prompts']} held-out questions: greedy tokens "
              f"{100 * p['token_agreement']:.1f} % equal, answers {100 * p['answer_agreement']:.1f} % identical; "
              f"bundle accuracy {100 * p['bundle_accuracy']:.1f} %", file=out, flush=True)
    fid = state.get("fidelity") or {}
    if fid.get("accuracy_before") is not None:
        print(f"[demo] quantization: held-out image accuracy {100 * fid['accuracy_before']:.1f} % (fp32) → "
              f"{100 * fid['accuracy_after']:.1f} % (W8A8 vision + W4A16 LLM); greedy-token agreement "
              f"{100 * fid['greedy_agreement']:.1f} %, vision cosine {fid['vision_cosine_mean']:.4f}", file=out, flush=True)
    return bundle


def bundle_targets() -> list[str]:
    """The demo's export targets: ``cpu``, plus ``gguf`` where gguf and llama-cpp-python are installed
    (the ``[llamacpp]`` extra; the README's install does not carry it)."""
    from nvila_edge.errors import BackendUnavailable
    from nvila_edge.optional import require

    try:
        require("gguf", "llamacpp")
        require("llama_cpp", "llamacpp")
    except BackendUnavailable:
        return ["cpu"]
    return ["cpu", "gguf"]


def bundle_parity(calibrated: Path, bundle: Path, records, max_new_tokens: int = 8, progress: bool = True,
                  llm_engine: str | None = None) -> dict:
    """Greedy answers of the calibrated (fake-quant) torch model vs the exported bundle on ONNX Runtime
    (``llm_engine="llamacpp"``: its LLM on llama.cpp from the gguf target)."""
    from tqdm.auto import tqdm

    from nvila_edge.calibration import load_calibrated
    from nvila_edge.runtime import Runtime

    from nvila_edge.training.evaluate import normalize_answer

    model = load_calibrated(calibrated)
    processor = NVILAProcessor(model.config, model.tokenizer)
    rt = Runtime.load(bundle, backend="onnxruntime", llm_engine=llm_engine)
    same_tokens = total_tokens = same_answers = correct = 0
    for r in tqdm(records, desc=f"bundle parity ({llm_engine or 'onnxruntime'})", disable=not progress):
        images = [str(p) for p in r.images] or None
        ref = model.generate(**processor(r.question, images=images), max_new_tokens=max_new_tokens).token_ids
        got = rt.generate(r.question, images=images, max_new_tokens=max_new_tokens)
        n = max(len(ref), len(got.token_ids))
        same_tokens += sum(a == b for a, b in zip(ref, got.token_ids))
        total_tokens += n
        same_answers += ref == got.token_ids
        correct += normalize_answer(got.text) == normalize_answer(r.answer)
    rt.close()
    k = max(len(records), 1)
    return {"prompts": len(records), "token_agreement": same_tokens / max(total_tokens, 1),
            "answer_agreement": same_answers / k, "bundle_accuracy": correct / k}
