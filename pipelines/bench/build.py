"""The bundle ``nvila-edge bench --preset`` measures: the random-weight model calibrated with the real recipes
(ModelOpt W8A8 SmoothQuant vision, W4A16 AWQ LLM) on a few synthetic images and exported with the real ``cpu``
target (+ the ``gguf`` target when llama_cpp and gguf import: our llama.cpp engine's row) — the graphs a user's
bundle ships, not a stand-in. The calibration tiles are kept beside it
(``calib_tiles.npy``) so the OpenVINO peer's NNCF quantization sees the very same images.

Runs as the bench's ``build`` phase (its own interpreter: the fp32 model, ModelOpt and the export leave with it).
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np

from .timing import _config_tok, _torch_model, cached, log, module_missing

VISION_RECIPE, LLM_RECIPE = "w8a8-smoothquant", "w4a16-awq"
NUM_IMAGES = 2  # calibration images, + 1 held out (the same for --quick: the cached bundle does not depend on it);
# AWQ-lite's search costs ~10 min of this 2-core machine per image at nvila-lite-2b size
# the marker of the cached bundle: bumped when the exporter's graphs change, so an older cache is re-exported
# (v2: vision weights stored transposed for their MatMul, 2026-12-07)
BUNDLE_CACHE = "bundle-v2"
PROMPTS = ("Describe the image.", "What is on the left?", "How many shapes are there?", "What color is the sky?")


def llamacpp_missing() -> str | None:
    """Why the llama.cpp engine cannot be benched here (None when llama_cpp and gguf import)."""
    gone = [m for m in ("llama_cpp", "gguf") if module_missing(m)]
    return f"missing: pip install nvila-edge[llamacpp] ({' and '.join(gone)} not importable)" if gone else None


def bundle_targets() -> list[str]:
    """The bundle's targets: cpu, + gguf (our llama.cpp engine's row) when llama_cpp and gguf import."""
    return ["cpu"] if llamacpp_missing() else ["cpu", "gguf"]


def synthetic_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` RGB images with smooth gradients and solid rectangles (natural-image-like statistics, not noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 255, 3), rng.uniform(-120, 120, 3), rng.uniform(-120, 120, 3)
        img = a + b * xx[..., None] + c * yy[..., None]
        for _ in range(3):
            x0, y0 = rng.integers(0, size * 3 // 4, 2)
            w, h = rng.integers(size // 8, size // 3, 2)
            img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def calibration_items(cfg) -> list[dict]:
    size = cfg.vision.image_size
    imgs = synthetic_images(NUM_IMAGES + 1, size)  # the last one is held out for the fidelity report
    items = [{"conversation": f"<image>\n{PROMPTS[i % len(PROMPTS)]}", "images": [img]} for i, img in enumerate(imgs)]
    return items[:NUM_IMAGES] + [{"conversation": "what is in the image"}] + items[NUM_IMAGES:]


def _processed(processor, item: dict):
    return processor(item["conversation"], images=item.get("images"), add_generation_prompt=False)


def phase_build(spec: dict) -> dict:
    """Calibrate + export once (cached by the ``BUNDLE_CACHE`` marker); return the bundle path and the tiles file."""
    import torch

    from nvila_edge import NVILAProcessor
    from nvila_edge.calibration import calibrate
    from nvila_edge.export import export_bundle

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    work = Path(spec["work"])
    cfg, tok = _config_tok(spec)
    processor = NVILAProcessor(cfg, tok)
    items = calibration_items(cfg)

    def calibrated():
        model = _torch_model(spec)
        model.tokenizer = tok
        log(f"  calibrating: vision {VISION_RECIPE}, llm {LLM_RECIPE} on {NUM_IMAGES} synthetic images")
        calibrate(model, work / "calibrated", vision=VISION_RECIPE, llm=LLM_RECIPE, data=items[:-1],
                  num_samples=len(items) - 1, heldout=[_processed(processor, items[-1])], num_heldout=1, processor=processor, progress=False)

    targets = spec.get("bundle_targets") or bundle_targets()  # the parent decides (a test may hide llama_cpp)

    def bundle():
        gc.collect()
        for stale in (BUNDLE_CACHE, BUNDLE_CACHE + "-gguf"):  # the export replaces the bundle: no marker survives
            (work / f"{stale}.done").unlink(missing_ok=True)
        log(f"  exporting the {' + '.join(targets)} target{'s' if len(targets) > 1 else ''}")
        export_bundle(work / "calibrated", work / "bundle", targets, progress=False)

    cached(work, "calibrated", calibrated)
    if not (work / f"{BUNDLE_CACHE}-gguf.done").exists():  # a cached cpu + gguf bundle serves either run
        cached(work, BUNDLE_CACHE + ("-gguf" if "gguf" in targets else ""), bundle)
    tiles = np.concatenate([_processed(processor, it).pixel_values for it in items[:NUM_IMAGES]]).astype(np.float32)
    np.save(work / "calib_tiles.npy", tiles)
    return {"artifacts": {"bundle": str(work / "bundle"), "calib_tiles": str(work / "calib_tiles.npy")},
            "targets": targets, "recipes": {"vision": VISION_RECIPE, "llm": LLM_RECIPE}, "calibration_images": NUM_IMAGES}
