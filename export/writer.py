"""``export_bundle``: calibrated directory → self-describing deployment bundle (atomic)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from nvila_edge.bundle import Bundle, BundleWriter
from nvila_edge.errors import CheckpointError, ExportError
from nvila_edge.resources import peak_rss_mb

from .targets import TARGETS, get_target


@dataclass
class ExportResult:
    path: Path
    targets: list[str]
    seconds: float
    peak_rss_mb: float

    def __str__(self) -> str:
        return (f"bundle {self.path} (targets: {', '.join(self.targets)}) in {self.seconds:.1f} s, "
                f"peak RSS {self.peak_rss_mb:.0f} MB")



def _resolve_targets(target: str | Sequence[str]) -> list[str]:
    names = [target] if isinstance(target, str) else list(target)
    if "all" in names:
        return list(TARGETS)
    for n in names:
        get_target(n)
    if "gguf" in names:  # it reuses the cpu target's graphs: that target is written first
        if "cpu" not in names:
            raise ExportError("the gguf target uses the cpu target's vision, projector and token table: "
                              "export both (`--target cpu,gguf`)")
        names = [n for n in names if n != "gguf"] + ["gguf"]
    return names


def export_bundle(calibrated: str | os.PathLike, output: str | os.PathLike, target: str | Sequence[str] = "cpu", *,
                  engines: str = "auto", embeddings_dtype: str = "float16", lm_head: str | None = None,
                  overwrite: bool = True, progress: bool = True,
                  sign_key: str | os.PathLike | None = None) -> ExportResult:
    """Export a calibrated directory (``nvila-edge calibrate``) for ``target`` ("cpu", "tensorrt",
    "torch", a list, or "all"). ``engines``: "auto" builds GPU engines when TensorRT is installed,
    "build" requires it, "skip" writes only the portable files. ``lm_head`` (gguf target): "int8" (Q8_0,
    default) or "int4" (Q4_0: fewer bytes a token). ``sign_key``: an Ed25519 private key (PEM) that signs the
    manifest (``manifest.sig``; ``nvila-edge verify --key PUB`` checks it)."""
    from nvila_edge.calibration import is_calibrated, load_calibrated, read_recipes

    if engines not in ("auto", "build", "skip"):
        raise ExportError(f"engines must be auto, build or skip, got {engines!r}")
    calibrated = Path(calibrated)
    if not is_calibrated(calibrated):
        what = "a checkpoint that was not calibrated" if (calibrated / "config.json").is_file() else "not a calibrated directory"
        raise ExportError(f"{calibrated} is {what}; run `nvila-edge calibrate {calibrated} -o CALIBRATED_DIR` first "
                          "(use --vision fp16 --llm fp16 for an unquantized bundle)")
    names = _resolve_targets(target)
    try:
        recipes = read_recipes(calibrated)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    for n in names:  # refuse before any work
        get_target(n).check(recipes)
    t0 = time.perf_counter()
    model = load_calibrated(calibrated)
    if model.tokenizer is None:
        raise ExportError(f"{calibrated} has no tokenizer files; the bundle needs them")
    if lm_head not in (None, "int8", "int4"):
        raise ExportError(f"lm_head must be int8 or int4, got {lm_head!r}")
    options = {"engines": engines, "embeddings_dtype": embeddings_dtype, "lm_head": lm_head}
    quantization = {part: r.to_dict() for part, r in recipes.items()}
    if sign_key is not None and not Path(sign_key).is_file():  # before minutes of export
        raise ExportError(f"the signing key {sign_key} is not a file")
    with BundleWriter(output, model.config, model.tokenizer, quantization=quantization, overwrite=overwrite,
                      sign_key=sign_key) as w:
        for n in tqdm(names, desc="export", disable=not progress):
            get_target(n).build(model, w, recipes, options)
        w.extra["source"] = {"calibrated": str(calibrated.resolve()), "fidelity": _fidelity(calibrated)}
    Bundle.open(output)  # read back and re-hash what was written
    return ExportResult(Path(output), names, time.perf_counter() - t0, peak_rss_mb())


def _fidelity(calibrated: Path) -> dict | None:
    import json

    f = calibrated / "fidelity.json"
    return json.loads(f.read_text()) if f.is_file() else None
