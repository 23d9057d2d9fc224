"""The cuda target's test artefacts, made once on a CPU machine with ModelOpt and carried to a GPU machine that
has none (scripts/gpu_check.sh): a calibrated tiny model exported to a cpu + cuda bundle, and the fp32
fake-quant model's reference outputs on fixed inputs (``reference.safetensors``). tests/test_cuda_target.py
builds the same things in-process where ModelOpt is installed, and reads the carried ones where it is not."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = "NVILA_GPU_ARTEFACTS"  # a folder made by `python scripts/gpu_check.py prepare FOLDER`
DEFAULT = ROOT / ".gpu-check"
VERSION = 1  # bump when what is made here changes: a stale carried folder then fails the preflight


def folder() -> Path:
    return Path(os.environ.get(ENV) or DEFAULT)


def carried() -> Path | None:
    """The carried folder when it is complete and of this version, else None."""
    d = folder()
    try:
        ok = json.loads((d / "manifest.json").read_text()).get("version") == VERSION
    except (OSError, ValueError):
        return None
    return d if ok and (d / "bundle").is_dir() and (d / "reference.safetensors").is_file() else None


def missing() -> list[str]:
    """What the carried folder lacks (for the preflight's message)."""
    d = folder()
    out = [str(d / f) for f in ("manifest.json", "bundle", "reference.safetensors") if not (d / f).exists()]
    if not out and carried() is None:
        out.append(f"{d / 'manifest.json'} of version {VERSION} (this one is stale: re-run the prepare step)")
    return out


def calibration_items(random_image):
    return [{"conversation": "<image>\nwhat color is the circle?", "images": [random_image(120 + 40 * i, 100, seed=i)]}
            for i in range(3)] + [{"conversation": "how many shapes"}]


def build(out: Path, tokenizer, make_model, random_image) -> tuple[Path, Path, object]:
    """Calibrate (ModelOpt) and export the tiny model into ``out``; returns (calibrated, bundle, processor)."""
    from nvila_edge import NVILAConfig, NVILAProcessor
    from nvila_edge.calibration import calibrate
    from nvila_edge.export import export_bundle

    model = make_model(NVILAConfig.from_preset("tiny"), seed=3)
    model.tokenizer = tokenizer
    proc = NVILAProcessor(model.config, tokenizer)
    calibrate(model, out / "cal", data=calibration_items(random_image), num_samples=3, num_heldout=1,
              processor=proc, progress=False)
    export_bundle(out / "cal", out / "bundle", ["cpu", "cuda"], progress=False)
    return out / "cal", out / "bundle", proc


def reference_inputs(config, proc, random_image) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 11, config.llm.hidden_size, generator=g)
    px = torch.as_tensor(proc("<image>\nwhat?", images=[random_image(300, 120, seed=5)]).pixel_values)[:2]  # 2 tiles: small to carry
    return {"x": x, "pixels": px}


def write_reference(out: Path, fake, proc, random_image) -> None:
    """The fp32 fake-quant model's logits and vision features on the fixed inputs, and the manifest."""
    from safetensors.torch import save_file

    from nvila_edge.io import atomic_write_text

    ref = reference_inputs(fake.config, proc, random_image)
    with torch.inference_mode():
        ref["logits"] = fake.llm(inputs_embeds=ref["x"]).logits.float()
        ref["features"] = fake.encode_tiles(ref["pixels"]).float()
    save_file({k: v.contiguous() for k, v in ref.items()}, str(out / "reference.safetensors"))
    import transformers

    atomic_write_text(out / "manifest.json", json.dumps(
        {"version": VERSION, "torch": torch.__version__, "transformers": transformers.__version__,
         }, indent=1))


def read_reference(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "reference.safetensors"))
