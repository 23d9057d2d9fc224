"""Runtime backends behind one interface (``Backend``); each heavy library is imported only by its own backend.

``load_backend(bundle, "auto")`` picks, among the backends that can actually run here:

1. ``torch`` on the bundle's ``cuda`` target (real int4 / int8 kernels) when a CUDA GPU is present,
2. ``onnxruntime`` on the ``cpu`` target,
3. ``torch`` on the ``torch`` target (plain weights).

``openvino`` runs the same ``cpu`` target files on OpenVINO's CPU plugin (the Q/DQ tower on its int8 kernels, the
int4 decoder made stateful); it is picked only when named (``backend="openvino"``, the ``[openvino]`` extra).

A ``cuda``-only bundle on a machine without CUDA raises ``BackendUnavailable`` saying to use the cpu target
(``backend="torch", device="cpu"`` still runs it, with the CPU variants of the kernels). ``tensorrt`` is never
picked by ``auto``: it is untested (no TensorRT on any machine this project runs on), so it runs only when
named.

Whether CUDA is present is asked first without importing torch (the driver library, through ctypes), so the ONNX
Runtime path stays torch-free on a machine without a driver; where a driver answers and the bundle has a cuda
target, torch itself is asked (``torch.cuda.is_available()``: a CPU build of torch beside an NVIDIA driver
falls back to the cpu target on ONNX Runtime).
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys

from nvila_edge.errors import BackendUnavailable, BundleError

from .base import Backend, check_embeds

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt", "torch")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cuda_device_count() -> int:
    """CUDA devices visible to this process (0 without a driver), without importing torch."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll", "libcuda.dylib"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        try:
            if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
        except AttributeError:
            return 0
        return int(count.value)
    return 0


def choose_backend(bundle, name: str = "auto", device: str | None = None) -> str:
    if name not in BACKENDS:
        raise BundleError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    targets = bundle.manifest.get("targets", {})
    want_cpu = device is not None and str(device).startswith("cpu")
    if "cuda" in targets and _installed("torch") and not want_cpu and cuda_device_count() > 0:
        from .torch import torch_sees_cuda

        if torch_sees_cuda():  # the driver alone says nothing of the installed torch build
            return "torch"
    if "cpu" in targets and _installed("onnxruntime"):
        return "onnxruntime"
    if "torch" in targets and _installed("torch"):
        return "torch"
    if "cuda" in targets and _installed("torch") and want_cpu:
        return "torch"  # asked for the CPU: the cuda target on the CPU kernels
    if "cuda" in targets:
        raise BackendUnavailable("CUDA", "gpu", message=(
            f"bundle {bundle.path} has only the cuda target and this machine has no CUDA GPU: use the cpu target "
            "(`nvila-edge export CALIBRATED -o BUNDLE --target cpu,cuda`, run on ONNX Runtime), or load it with "
            "backend='torch', device='cpu' for the CPU kernels"))
    raise BackendUnavailable("onnxruntime", "export", f"running a bundle with targets {sorted(targets)}")


LLM_ENGINES = ("onnxruntime", "llamacpp")


def load_backend(bundle, name: str = "auto", *, threads: int | None = None, device: str | None = None,
                 vision_engine: str | None = None, llm_engine: str | None = None) -> Backend:
    """Open the bundle's engines with the named backend (``auto``: the fastest one that can run here).

    ``vision_engine`` (onnxruntime backend only): the engine that runs the vision graph — ``"onnxruntime"``
    (default) or ``"openvino"`` (the same Q/DQ graph on OpenVINO's CPU plugin; the decoder stays on ONNX Runtime).
    ``llm_engine`` (onnxruntime backend only): ``"onnxruntime"`` (the cpu target's decoder, default) or
    ``"llamacpp"`` (the gguf target's GGUF on llama.cpp, the ``[llamacpp]`` extra).
    """
    if llm_engine not in (None, *LLM_ENGINES):
        raise BundleError(f"unknown llm engine {llm_engine!r}; choose one of {', '.join(LLM_ENGINES)}")
    name = choose_backend(bundle, "onnxruntime" if llm_engine == "llamacpp" and name == "auto" else name, device)
    if llm_engine == "llamacpp":
        if name != "onnxruntime":
            raise BundleError(f"llm_engine='llamacpp' runs beside the onnxruntime backend's vision graphs, not the "
                              f"{name} backend (pass backend='onnxruntime' or leave backend out)")
        if "gguf" not in bundle.targets:
            raise BundleError(f"bundle {bundle.path} has no gguf target (it has: {', '.join(bundle.targets)}); export it "
                              "with `nvila-edge export CALIBRATED -o BUNDLE --target cpu,gguf`")
        from .llamacpp import LlamaCppBackend

        return LlamaCppBackend.from_bundle(bundle, threads=threads, device=device,
                                           vision_engine=vision_engine or "onnxruntime")
    if vision_engine is not None and name != "onnxruntime" and vision_engine != name:
        raise BundleError(f"vision_engine={vision_engine!r} applies to the onnxruntime backend; the {name} backend "
                          "runs its own vision graph (leave vision_engine out, or pass backend='onnxruntime')")
    if name == "onnxruntime":
        from .onnxruntime import OrtBackend

        return OrtBackend.from_bundle(bundle, threads=threads, device=device,
                                      vision_engine=vision_engine or "onnxruntime")
    if name == "openvino":
        from .openvino import OpenVINOBackend

        return OpenVINOBackend.from_bundle(bundle, threads=threads, device=device)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend.from_bundle(bundle)
    from .torch import TorchBackend

    return TorchBackend.from_bundle(bundle, device=device, threads=threads)


__all__ = ["Backend", "BACKENDS", "LLM_ENGINES", "check_embeds", "choose_backend", "cuda_device_count", "load_backend"]
