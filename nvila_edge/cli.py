"""The ``nvila-edge`` command line. Each verb imports its stage lazily so ``--help`` stays instant."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import platform
import re
import sys

from .errors import NVILAEdgeError

# every stage, pipeline and app registers its own verbs (in --help order); each module imports nothing heavy
STAGE_CLIS = ("nvila_edge.pipelines.cli", "nvila_edge.training.cli", "nvila_edge.calibration.cli", "nvila_edge.export.cli",
              "nvila_edge.runtime.cli", "nvila_edge.apps.camera_app", "nvila_edge.pipelines.bench",
              "nvila_edge.apps.server_cli", "nvila_edge.pipelines.personalize")

OPTIONAL_BACKENDS = {
    # module: (pip distribution, extra, purpose)
    "torch": ("torch", "torch", "reference model"),
    "transformers": ("transformers", "torch", "reference model"),
    "peft": ("peft", "train", "LoRA / QLoRA fine-tuning"),
    "bitsandbytes": ("bitsandbytes", "train", "NF4 base weights for QLoRA"),
    "accelerate": ("accelerate", "train", "distributed training"),
    "modelopt": ("nvidia-modelopt", "calib", "W8A8 / W4A16 calibration"),
    "onnx": ("onnx", "export", "ONNX export"),
    "onnxruntime": ("onnxruntime", "runtime", "CPU runtime"),
    "onnxruntime_genai": ("onnxruntime-genai", "export", "int4 decoder baseline"),
    "openvino": ("openvino", "openvino", "OpenVINO CPU backend (the cpu target's graphs)"),
    "tensorrt": ("tensorrt", "gpu", "TensorRT vision engine"),
    "tensorrt_llm": ("tensorrt-llm", "gpu", "TensorRT-LLM decoder"),
    "pycuda": ("pycuda", "gpu", "CUDA buffers for TensorRT"),
}


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def cmd_info(args) -> int:
    """Versions and which optional backends are importable (found by metadata; GPU libs are not imported)."""
    from . import __version__

    rows = {"nvila-edge": __version__, "python": platform.python_version(), "platform": platform.platform()}
    backends = {}
    for module, (dist, extra, purpose) in OPTIONAL_BACKENDS.items():
        ver = _version(dist)
        backends[module] = {"installed": ver is not None, "version": ver, "extra": extra, "purpose": purpose}
    cuda = None
    if backends["torch"]["installed"]:
        import torch

        cuda = torch.cuda.is_available()
        rows["cuda"] = torch.version.cuda or "cpu build"
        rows["cuda_available"] = cuda
    if args.json:
        print(json.dumps({"versions": rows, "backends": backends}, indent=2))
        return 0
    for k, v in rows.items():
        print(f"{k:16s} {v}")
    print("\noptional backends:")
    for module, b in backends.items():
        state = b["version"] if b["installed"] else f"missing (pip install 'nvila-edge[{b['extra']}]')"
        print(f"  {module:18s} {state:40s} {b['purpose']}")
    return 0


def _parse_size(text: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cmd_plan(args) -> int:
    """Tiling plan and visual-token budget of an image (a file or WIDTHxHEIGHT), without any model."""
    from .config import NVILAConfig
    from .media.image import load_image
    from .media.tiling import plan_image

    if args.checkpoint:
        from .checkpoint import read_config

        config, _ = read_config(args.checkpoint)
    else:
        config = NVILAConfig.from_preset(args.preset)
    size = _parse_size(args.image)
    if size is None:
        size = load_image(args.image, config.preprocessing.max_image_pixels).size
    plan = plan_image(size, config, multi=args.multi)
    if args.json:
        print(json.dumps({"model": config.name, **plan.to_dict()}, indent=2))
        return 0
    print(f"model: {config.name} ({config.preprocessing.image_aspect_ratio}, projector {config.projector.type})")
    print(plan.describe())
    ctx = config.llm.context_length
    print(f"  context used by the image: {plan.num_tokens} / {ctx} tokens ({100 * plan.num_tokens / ctx:.1f} %)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import PRESETS

    p = argparse.ArgumentParser(prog="nvila-edge", description="NVILA from training to the edge.")
    p.add_argument("--version", action="version", version=f"nvila-edge {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    info = sub.add_parser("info", help="versions and which optional backends are installed")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    plan = sub.add_parser("plan", help="tiling plan and visual-token budget of an image")
    plan.add_argument("image", help="image file, or a size such as 1920x1080")
    plan.add_argument("--preset", default="nvila-8b", choices=sorted(PRESETS), help="model preset (default nvila-8b)")
    plan.add_argument("--checkpoint", help="read the preprocessing settings from this checkpoint instead")
    plan.add_argument("--multi", action="store_true", help="plan as one of several images (plain resize)")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=cmd_plan)

    # the stages, pipelines and apps own their verbs (their cli modules import nothing heavy at import time)
    for module in STAGE_CLIS:
        importlib.import_module(module).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # bitsandbytes logs a warning about optional CPU kernels on import; it is noise for our users
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import warnings

    # ModelOpt warns on import that it has not been tested with this transformers version; it works (tested)
    warnings.filterwarnings("ignore", message=r"transformers .* is not tested with current version of modelopt")
    try:
        return args.func(args)
    except NVILAEdgeError as e:
        print(f"nvila-edge {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
