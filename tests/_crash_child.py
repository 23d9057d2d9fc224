"""Child process of the kill -9 tests: overwrite an existing artifact with a different one (seed 1), pausing
at a chosen point of the write so the parent can SIGKILL it there. Prints the pause label when it gets there.

    python tests/_crash_child.py save_pretrained|calibrate|export|swap TARGET [SOURCE]

- ``save_pretrained``: after the first weight file of the new checkpoint is written (mid-write)
- ``calibrate``: ``calibrate`` → ``save_calibrated``, after ``model.safetensors`` (before the ModelOpt state)
- ``export``: ``export_bundle`` after every file is written, before the manifest (mid-export)
- ``swap``: ``save_pretrained`` right after the new directory took the old one's place, before the old copy
  is deleted
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pause(label: str) -> None:
    print(label, flush=True)
    time.sleep(600)  # the parent kills us here


def after(fn, label: str):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        pause(label)
        return out

    return wrapper


def calibration_items():
    from conftest import random_image

    return [{"conversation": "<image>\nwhat color is the circle?", "images": [random_image(96, 64, seed=i)]}
            for i in range(2)] + [{"conversation": "how many shapes"}]


def calibrate_tiny(model, tokenizer, out):
    from nvila_edge import NVILAProcessor
    from nvila_edge.calibration import calibrate

    model.tokenizer = tokenizer
    return calibrate(model, out, vision="fp16", llm="fp16", data=calibration_items(), num_samples=2, num_heldout=1,
                     processor=NVILAProcessor(model.config, tokenizer), progress=False)


def main(kind: str, target: str, source: str | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    import safetensors.torch as st
    from conftest import _corpus, make_model

    from nvila_edge import NVILAConfig, NVILATokenizer

    tokenizer = NVILATokenizer.train(_corpus())
    model = make_model(NVILAConfig.from_preset("tiny"), seed=1)
    if kind == "save_pretrained":
        st.save_file = after(st.save_file, "WRITING")
        model.save_pretrained(target, tokenizer=tokenizer)
    elif kind == "swap":
        import nvila_edge.io as nio

        nio.shutil.rmtree = lambda *a, **k: pause("SWAPPED")
        model.save_pretrained(target, tokenizer=tokenizer)
    elif kind == "calibrate":
        st.save_model = after(st.save_model, "WRITING")
        calibrate_tiny(model, tokenizer, target)
    elif kind == "export":
        from nvila_edge.bundle import BundleWriter
        from nvila_edge.export import export_bundle

        BundleWriter._manifest = after(BundleWriter._manifest, "WRITING")
        export_bundle(source, target, "cpu", progress=False)
    else:
        raise SystemExit(f"unknown kind {kind}")
    print("FINISHED", flush=True)  # the parent kills us before this


if __name__ == "__main__":
    main(*sys.argv[1:])
