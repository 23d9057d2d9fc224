"""UNTESTED TensorRT backend (GPU): the bundle's TensorRT vision engine; projector, embeddings and decoder from the
bundle's cpu target on ONNX Runtime's **CPU** provider (same IOBinding KV path as the CPU backend): that
decoder is an fp32 GroupQueryAttention graph, for which ONNX Runtime's CUDA provider has no kernel, and no
extra installs onnxruntime-gpu. ``backend="auto"`` never picks this backend; the GPU path that runs is the
torch backend on the ``cuda`` target.

UNTESTED: tensorrt / pycuda cannot be installed on the machines this project is built on. The code follows
the TensorRT 10 Python API (named I/O tensors, ``execute_async_v3``). ``tensorrt`` and ``pycuda`` are
imported only here, and a missing one raises ``BackendUnavailable`` naming the ``[gpu]`` extra.

Not wired yet: the TensorRT-LLM engine (``tensorrt/trtllm_engine``). Its runtime generates whole answers
from a prompt table; the step API this interface needs (``new_cache``, ``prefill``, ``decode_step``) is the ORT decoder's.
"""

from __future__ import annotations

import numpy as np

from nvila_edge.errors import BundleError
from nvila_edge.optional import require

from .onnxruntime import OrtBackend


def _import(module: str):
    return require(module, "gpu", "the TensorRT backend")


class TensorRTVision:
    """A TensorRT engine: pixel_values (N, 3, S, S) → features (N, g*g, C), N within its profile."""

    def __init__(self, engine_path, input_name: str = "pixel_values", output_name: str = "features"):
        trt = _import("tensorrt")
        self.cuda = _import("pycuda.driver")
        _import("pycuda.autoinit")  # creates the CUDA context
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(engine_path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise BundleError(f"TensorRT could not load {engine_path} (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = input_name, output_name
        self.max_batch = int(self.engine.get_tensor_profile_shape(input_name, 0)[2][0])
        self.stream = self.cuda.Stream()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        outs = [self._run(np.ascontiguousarray(pixels[s:s + self.max_batch], np.float32))
                for s in range(0, pixels.shape[0], self.max_batch)]
        return np.concatenate(outs)

    def _run(self, x: np.ndarray) -> np.ndarray:
        cuda, ctx = self.cuda, self.context
        ctx.set_input_shape(self.input_name, x.shape)
        out = np.empty(tuple(ctx.get_tensor_shape(self.output_name)), np.float32)
        d_in, d_out = cuda.mem_alloc(x.nbytes), cuda.mem_alloc(out.nbytes)
        cuda.memcpy_htod_async(d_in, x, self.stream)
        ctx.set_tensor_address(self.input_name, int(d_in))
        ctx.set_tensor_address(self.output_name, int(d_out))
        if not ctx.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT vision engine failed to run")
        cuda.memcpy_dtoh_async(out, d_out, self.stream)
        self.stream.synchronize()
        return out


class TensorRTBackend(OrtBackend):
    name = "tensorrt"

    @classmethod
    def from_bundle(cls, bundle, threads: int | None = None, device: str | None = "cuda", **kw) -> "TensorRTBackend":
        _import("tensorrt")
        if not bundle.has("vision_engine", "tensorrt"):
            how = bundle.target("tensorrt").get("engines", {}).get("how", "export with --engines build on the GPU")
            raise BundleError(f"bundle {bundle.path} has no built TensorRT engines; {how}")
        if "cpu" not in bundle.targets:
            raise BundleError(f"bundle {bundle.path}: the TensorRT backend takes the projector and decoder from the "
                              "cpu target; export with --target all")
        be = super().from_bundle(bundle, threads=threads, device="cpu", **kw)  # see the module docstring
        be.trt_vision = TensorRTVision(bundle.file("vision_engine", "tensorrt"))
        return be

    def encode_tiles(self, pixels: np.ndarray) -> np.ndarray:
        return self.trt_vision(pixels)

    def describe(self) -> dict:
        return {**super().describe(), "backend": self.name, "vision": "tensorrt", "tested": False}
