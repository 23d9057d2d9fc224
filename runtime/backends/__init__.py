"""Runtime backends behind one interface (``Backend``); each heavy library is imported only by its own backend.

``load_backend(bundle, "auto")`` picks TensorRT when the bundle has engines and tensorrt is installed, else
ONNX Runtime (CUDA provider when available, else CPU), else the torch checkpoint.
"""

from __future__ import annotations

import importlib.util

from nvila_edge.errors import BackendUnavailable, BundleError

from .base import Backend, KVCache, check_embeds

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def choose_backend(bundle, name: str = "auto") -> str:
    if name not in BACKENDS:
        raise BundleError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    targets = bundle.manifest.get("targets", {})
    if bundle.has("vision_engine", "tensorrt") and _installed("tensorrt"):  # engines built, library here
        return "tensorrt"
    if "cpu" in targets and _installed("onnxruntime"):
        return "onnxruntime"
    if "torch" in targets and _installed("torch"):
        return "torch"
    raise BackendUnavailable("onnxruntime", "export", f"running a bundle with targets {sorted(targets)}")


def load_backend(bundle, name: str = "auto", *, threads: int | None = None, device: str | None = None) -> Backend:
    """Open the bundle's engines with the named backend (``auto``: the fastest one that can run here)."""
    name = choose_backend(bundle, name)
    if name == "onnxruntime":
        from .onnxruntime import OrtBackend

        return OrtBackend.from_bundle(bundle, threads=threads, device=device)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend.from_bundle(bundle)
    from .torch import TorchBackend

    return TorchBackend.from_checkpoint(bundle.file("checkpoint", target="torch"), device=device, threads=threads)


__all__ = ["Backend", "KVCache", "BACKENDS", "check_embeds", "choose_backend", "load_backend"]
