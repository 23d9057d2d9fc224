"""OpenVINO backend: the bundle's own ``cpu`` target (the ModelOpt Q/DQ vision ONNX, the projector, the
MatMulNBits int4 decoder ONNX, the embedding table) compiled by OpenVINO's CPU plugin instead of ONNX Runtime.

Same files, same weights: OpenVINO reads the ONNX graphs (its ONNX reader knows the com.microsoft ops our
exporter writes: MatMulNBits, GroupQueryAttention, SkipSimplifiedLayerNormalization) and runs the Q/DQ tower
with its int8 kernels. The decoder is made *stateful* (past → present pairs become plugin state, as
optimum-intel's models are), so a decode step passes one embedding row in and gets the logits out; each
``OpenVINOKVCache`` is its own infer request, so several sequences can be alive at once.

Numerics: ``precision="f32"`` (default) asks the plugin for fp32 activations, the same class of arithmetic as
ONNX Runtime; ``"bf16"`` lets it use bf16 where the CPU has it (faster, less exact).

``OpenVINOVision`` is the tower alone on the plugin: what the ONNX Runtime backend runs its vision part on with
``vision_engine="openvino"`` (the decoder stays on ONNX Runtime, whose int4 decode is the faster one). It leaves
the precision to the plugin — bf16 for the non-int8 ops (attention, softmax, norms) where the CPU has bf16, f32
elsewhere: on a 2-core AMD EPYC (avx512_bf16) one 448² SigLIP-400M tile takes ~1.46 s against ~2.2 s on ONNX
Runtime, feature cosine vs the fp32 tower 0.99975 (ONNX Runtime's: 0.99976), 2026-12-07.

Only openvino and numpy are imported (no torch), and only when this backend is chosen.
"""

from __future__ import annotations

import os

import numpy as np

from nvila_edge.config import NVILAConfig
from nvila_edge.errors import BundleError, GenerationError
from nvila_edge.optional import require

from nvila_edge.kv_cache import KVCache

from .base import Backend, check_embeds, encode_in_batches, tile_batch

PRECISIONS = ("f32", "bf16")


def _ov():
    return require("openvino", "openvino", "the OpenVINO backend")


def plugin_properties(threads: int | None = None, precision: str | None = None) -> dict:
    """One stream, latency hint; ``precision=None`` keeps the plugin's own choice (bf16 where the CPU has it)."""
    if precision is not None and precision not in PRECISIONS:
        raise BundleError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    props = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if precision is not None:
        props["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        props["INFERENCE_NUM_THREADS"] = str(int(threads))
    return props


class OpenVINOVision:
    """The vision graph compiled for OpenVINO's CPU plugin: ``pixels (N, 3, S, S) → features``."""

    def __init__(self, path, *, threads: int | None = None, precision: str | None = None):
        ov = _ov()
        props = plugin_properties(threads, precision)
        if not os.path.isfile(path):
            raise BundleError(f"ONNX graph not found: {path}")
        core = ov.Core()
        self.model = core.compile_model(core.read_model(str(path)), "CPU", props)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.model(np.ascontiguousarray(pixels, dtype=np.float32))[0]

    def describe(self) -> dict:
        precision = self.model.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type
        return {"engine": "openvino", "precision": getattr(precision, "to_string", lambda: str(precision))(),
                "openvino": _ov().__version__}


class OpenVINOKVCache(KVCache):
    """One sequence: a stateful infer request of the decoder (its KV lives in the plugin)."""

    def __init__(self, backend: "OpenVINOBackend", capacity: int):
        self.be = backend
        self.request = backend.decoder.create_infer_request()
        self.capacity = min(capacity, backend.graph_max)
        self.length = 0

    def truncate(self, length: int) -> None:
        length = max(0, min(int(length), self.length))
        if length == self.length:
            return
        if length == 0:
            self.request.reset_state()
        else:  # keep the first ``length`` positions of every K / V state
            for state in self.request.query_state():
                kept = np.ascontiguousarray(state.state.data[:, :, :length])
                state.state = _ov().Tensor(kept)
        self.length = length


class OpenVINOBackend(Backend):
    name = "openvino"
    target = "cpu"  # runs the bundle's cpu target

    def __init__(self, config: NVILAConfig, vision, projector, decoder, embeddings, io: dict, *,
                 threads: int | None = None, precision: str = "f32", capacity: int | None = None):
        ov = _ov()
        plugin_properties(threads, precision)  # a bad precision fails before any graph is compiled
        self.config, self.io, self.threads, self.precision = config, dict(io), threads, precision
        self.core = ov.Core()
        self.vision = OpenVINOVision(vision, threads=threads, precision=precision) if vision is not None else None
        self.projector = self._compile(projector) if projector is not None else None
        self.decoder = self._compile(decoder, stateful=True)
        if not callable(embeddings):
            from nvila_edge.embeddings import load_embeddings

            embeddings = load_embeddings(embeddings)
        self.table = embeddings
        self.graph_max = int(io.get("max_length") or config.llm.context_length)
        self.capacity = min(self.graph_max, capacity or self.graph_max)
        self._mask = np.ones((1, self.graph_max), np.int64)
        self.tile_batch = tile_batch(config, "cpu")

    @classmethod
    def from_bundle(cls, bundle, threads: int | None = None, device: str | None = None, **kw) -> "OpenVINOBackend":
        if device is not None and not str(device).startswith("cpu"):
            raise BundleError(f"the OpenVINO backend runs on the CPU; got device={device!r}")
        spec = bundle.target("cpu")
        io = spec.get("io", {}).get("decoder")
        if not io:
            raise BundleError(f"bundle {bundle.path}: the cpu target has no decoder io contract in its manifest")
        return cls(bundle.config, bundle.file("vision"), bundle.file("projector"), bundle.file("decoder"),
                   bundle.file("embeddings"), io, threads=threads, **kw)

    def _properties(self) -> dict:
        return plugin_properties(self.threads, self.precision)

    def _compile(self, path, stateful: bool = False):
        if not os.path.isfile(path):
            raise BundleError(f"ONNX graph not found: {path}")
        model = self.core.read_model(str(path))
        if stateful:
            self._make_stateful(model)
        return self.core.compile_model(model, "CPU", self._properties())

    def _make_stateful(self, model) -> None:
        from openvino._offline_transformations import apply_make_stateful_transformation

        io, n = self.io, int(self.io["num_layers"])
        kv, hd = int(io["num_kv_heads"]), int(io["head_dim"])
        pairs = {io[f"past_{k}"].format(i=i): io[f"present_{k}"].format(i=i) for i in range(n) for k in ("key", "value")}
        shapes = {io["inputs_embeds"]: [1, -1, self.config.llm.hidden_size], io["attention_mask"]: [1, -1]}
        shapes.update({p: [1, kv, -1, hd] for p in pairs})
        if io.get("position_ids"):
            shapes[io["position_ids"]] = [1, -1]
        model.reshape(shapes)  # a static batch of 1: the state's initial (empty) value needs it
        apply_make_stateful_transformation(model, pairs)

    def new_cache(self, capacity: int | None = None) -> OpenVINOKVCache:
        return OpenVINOKVCache(self, capacity or self.capacity)

    # ---- vision --------------------------------------------------------------------------------------
    def encode_tiles(self, pixels: np.ndarray) -> np.ndarray:
        if self.vision is None:
            raise BundleError("this OpenVINO backend was opened without a vision graph")
        return encode_in_batches(self.vision, pixels, self.tile_batch)

    def project(self, features: np.ndarray) -> np.ndarray:
        if self.projector is None:
            raise BundleError("this OpenVINO backend was opened without a projector graph")
        return self.projector(np.ascontiguousarray(features, dtype=np.float32))[0].astype(np.float32, copy=False)

    # ---- LLM -----------------------------------------------------------------------------------------
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return self.table(np.asarray(ids, dtype=np.int64).reshape(-1))

    def _run(self, embeds: np.ndarray, cache: OpenVINOKVCache) -> np.ndarray:
        total = cache.length + embeds.shape[1]
        if total > self.graph_max:
            raise GenerationError(f"the sequence needs {total} positions but the decoder was exported for "
                                  f"{self.graph_max}; re-export with a larger max_length")
        io = self.io
        feeds = {io["inputs_embeds"]: embeds, io["attention_mask"]: self._mask[:, :total]}
        if io.get("position_ids"):
            feeds[io["position_ids"]] = np.arange(cache.length, total, dtype=np.int64)[None]
        cache.request.infer(feeds, share_inputs=True)
        cache.length = total
        return np.array(cache.request.get_output_tensor(0).data[0, -1], dtype=np.float32)

    def prefill(self, embeds: np.ndarray, cache: OpenVINOKVCache) -> np.ndarray:
        return self._run(check_embeds(embeds, self.config.llm.hidden_size), cache)

    def decode_step(self, token_id: int, cache: OpenVINOKVCache) -> np.ndarray:
        row = self.table(np.asarray([int(token_id)]))[None].astype(np.float32, copy=False)
        return self._run(row, cache)

    @property
    def max_length(self) -> int:
        return self.graph_max

    def describe(self) -> dict:
        return {"backend": self.name, "device": "cpu", "kv": "stateful (plugin)", "precision": self.precision,
                "threads": self.threads, "openvino": _ov().__version__}
