"""ONNX Runtime backend: vision.onnx + projector.onnx + decoder.onnx + the numpy embedding table.

Decoding is the speed path. Each ``OrtKVCache`` (one per sequence, owned by its caller) holds buffers
allocated once and its own IOBinding, so a step copies nothing but one embedding row in and the logits out:

- ``past_present_share_buffer`` graphs (GroupQueryAttention, as onnxruntime-genai's builder and our
  exporter make them): past and present are the *same* (1, kv_heads, capacity, head_dim) buffer; the
  graph writes the new positions in place and reads the valid length from ``attention_mask``.
- other graphs (present = past + new, e.g. a plain HF export): each step's present outputs, allocated by
  ONNX Runtime, are bound as the next step's past inputs without passing through numpy.

The vision tower runs on the engine ``vision_engine`` names (``VISION_ENGINES``): ONNX Runtime itself (default),
or OpenVINO's CPU plugin on the same Q/DQ graph (``"openvino"``, the ``[openvino]`` extra; ~1.5× faster on an AVX-512
CPU, see ``openvino.OpenVINOVision``) while the decoder stays here.

Only onnxruntime and numpy are imported (no torch): the runtime's light path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nvila_edge.config import NVILAConfig
from nvila_edge.errors import BackendUnavailable, BundleError, GenerationError
from nvila_edge.optional import require

from nvila_edge.kv_cache import KVCache

from .base import Backend, check_embeds, encode_in_batches, tile_batch

_NP = {"float32": np.float32, "float16": np.float16}
INITIAL_CAPACITY = 4096  # KV positions allocated up front; grows (doubling) up to the graph's max_length
# prompt positions per decoder run: bounds a long prefill's activations (nvila-lite-2b, 2-core AMD EPYC,
# 2026-12-07: a 512-token prefill took 4.06–4.74 s whole, 3.89–4.18 s in 256s, 4.03–4.41 s in 128s — noise-level)
PREFILL_CHUNK = 256


def _ort():
    return require("onnxruntime", "runtime", "the ONNX Runtime backend")


def providers_for(device: str | None) -> list[str]:
    """CUDA provider when asked for (or, with ``device=None``, when available), CPU otherwise."""
    available = _ort().get_available_providers()
    want_cuda = device is None or str(device).startswith("cuda")
    if want_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device is not None and str(device).startswith("cuda"):
        raise BackendUnavailable("onnxruntime-gpu", "gpu", "the ONNX Runtime CUDA provider")
    return ["CPUExecutionProvider"]


def session(path, threads: int | None = None, providers: list[str] | None = None):
    """An InferenceSession with the runtime's options (also what ``bench`` opens its comparison graphs with)."""
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no CPU arena: it keeps the largest activations ever seen (a long prefill, a video) for the session's life;
    # without it the runtime's peak RSS is ~0.5 GB lower and decode no slower (nvila-lite-2b, 2-core AMD EPYC,
    # 2026-12-07: 2.17 vs 2.65 GB, 26.5 / 25.9 vs 24.5 / 19.6 tok/s in two A/B pairs)
    so.enable_cpu_mem_arena = False
    # intra-op spinning on: a decode step is ~560 small ops, and waking a sleeping pool thread for each parallel
    # one costs more than spinning the second core (nvila-lite-2b, 2-core AMD EPYC, 2026-12-07, interleaved A/B:
    # 24.3–24.9 vs 19.9–23.1 tok/s on the decoder alone, 26.2 / 29.5 vs 25.1 / 24.8 through Runtime.generate).
    # (An older build measured the opposite, 10 → 16 tok/s with spinning off, when its Python loop between
    # steps needed that core.) The inter-op pool is unused (sequential execution): no spinning there.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not Path(path).is_file():
        raise BundleError(f"ONNX graph not found: {path}")
    return ort.InferenceSession(str(path), sess_options=so, providers=providers or ["CPUExecutionProvider"])


class _OrtVision:
    """The vision graph on an ONNX Runtime session: ``pixels → features``."""

    def __init__(self, backend: "OrtBackend", path):
        self.session = backend._session(path)
        self.names = _io_names(self.session)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run([self.names[1]], {self.names[0]: pixels})[0]

    def describe(self) -> dict:
        return {"engine": "onnxruntime"}


def _openvino_vision(backend: "OrtBackend", path):
    if backend.device != "cpu":
        raise BundleError("vision_engine='openvino' runs on the CPU; the decoder was opened on "
                          f"{backend.device}: use vision_engine='onnxruntime'")
    from .openvino import OpenVINOVision

    return OpenVINOVision(path, threads=backend.threads)


# which engine runs the vision graph: name → (backend, graph path) → callable pixels → features
VISION_ENGINES = {"onnxruntime": _OrtVision, "openvino": _openvino_vision}


def vision_engine_for(name: str):
    if name not in VISION_ENGINES:
        raise BundleError(f"unknown vision engine {name!r}; choose one of {', '.join(VISION_ENGINES)}")
    return VISION_ENGINES[name]


class OrtKVCache(KVCache):
    """One sequence's KV buffers and the decoder IOBinding bound to them (several can be alive at once)."""

    def __init__(self, backend: "OrtBackend", capacity: int):
        self.be = backend
        self.binding = backend.decoder.io_binding()
        self.order: list[str] = []  # output names in binding order
        self.length = 0
        self.kv: list[list] = []
        self.step = np.zeros((1, 1, backend.config.llm.hidden_size), np.float32)  # one step's embedding
        self.logits = np.zeros((1, 1, backend._vocab), np.float32)  # the logits of one position
        self.alloc(min(backend.graph_max, capacity))

    # ---- buffers -------------------------------------------------------------------------------------
    def alloc(self, capacity: int) -> None:
        """(Re)allocate the KV buffers for ``capacity`` positions, keeping the cached ones."""
        be, b, old = self.be, self.binding, self.kv
        kv = []
        for i, names in enumerate(be._names):
            pair = []
            for j in range(2):
                if be.shared:
                    arr = np.zeros(be._kv_shape[:2] + (capacity,) + be._kv_shape[3:], be.kv_dtype)
                    if old and self.length:
                        arr[:, :, :self.length] = _host(old[i][j])[:, :, :self.length]
                else:
                    arr = np.zeros(be._kv_shape[:2] + (self.length,) + be._kv_shape[3:], be.kv_dtype)
                    if old and self.length:
                        arr[:] = _host(old[i][j])[:, :, :self.length]
                value = be._ortvalue(arr)
                pair.append((arr, value) if be.device == "cpu" else (None, value))
                b.bind_ortvalue_input(names[j], value)
                if be.shared:
                    if names[2 + j] not in self.order:
                        self.order.append(names[2 + j])
                    b.bind_ortvalue_output(names[2 + j], value)
                else:
                    self.bind_output(names[2 + j], be.device)
            kv.append(pair)
        self.kv = kv
        self.capacity = capacity

    def ensure(self, total: int) -> None:
        be = self.be
        if total > be.graph_max:
            raise GenerationError(f"the sequence needs {total} positions but the decoder was exported for "
                                  f"{be.graph_max}; re-export with a larger max_length")
        if be.shared and total > self.capacity:
            cap = self.capacity
            while cap < total:
                cap *= 2
            self.alloc(min(cap, be.graph_max))

    def output(self, name: str):
        return self.binding.get_outputs()[self.order.index(name)].numpy()

    def bind_output(self, name: str, *args) -> None:
        # IOBinding keeps outputs in first-bound order (re-binding a name replaces it in place)
        if name not in self.order:
            self.order.append(name)
        self.binding.bind_output(name, *args)

    def rebind_presents(self) -> None:
        """Non-shared graphs: this step's presents become the next step's pasts (no numpy round trip)."""
        outs, b = self.binding.get_outputs(), self.binding
        for i, (pk, pv, ok, ov) in enumerate(self.be._names):
            k, v = outs[self.order.index(ok)], outs[self.order.index(ov)]
            b.bind_ortvalue_input(pk, k)
            b.bind_ortvalue_input(pv, v)
            self.bind_output(ok, self.be.device)
            self.bind_output(ov, self.be.device)
            self.kv[i] = [(None, k), (None, v)]

    def truncate(self, length: int) -> None:
        length = max(0, min(int(length), self.length))
        if not self.be.shared and length < self.length:
            self.length = length
            self.alloc(self.capacity)  # copies the kept positions into fresh past inputs
        self.length = length  # shared buffers: positions past the mask's length are simply overwritten


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, config: NVILAConfig, vision: str | os.PathLike | None, projector: str | os.PathLike | None,
                 decoder: str | os.PathLike | None, embeddings, io: dict, *, threads: int | None = None,
                 device: str | None = None, capacity: int | None = None, vision_engine: str = "onnxruntime"):
        _ort()  # a clear BackendUnavailable before any work when onnxruntime is missing
        self.config = config
        self.providers = providers_for(device)
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.threads = threads
        # vision / projector may be left out (None) for LLM-only use such as decode benchmarks
        self.vision = vision_engine_for(vision_engine)(self, vision) if vision is not None else None
        self.projector = self._session(projector) if projector is not None else None
        self.decoder = self._session(decoder) if decoder is not None else None  # None: another LLM engine
        if not callable(embeddings):
            from nvila_edge.embeddings import load_embeddings

            embeddings = load_embeddings(embeddings)
        self.table = embeddings
        self.io = dict(io)
        self.num_layers = int(io["num_layers"])
        self.kv_dtype = _NP[io.get("kv_dtype", "float32")]
        self.shared = bool(io.get("past_present_share_buffer", False))
        self.graph_max = int(io.get("max_length") or config.llm.context_length)
        self.capacity = min(self.graph_max, capacity or INITIAL_CAPACITY)  # a new cache's first allocation
        self._names = [(io["past_key"].format(i=i), io["past_value"].format(i=i),
                        io["present_key"].format(i=i), io["present_value"].format(i=i)) for i in range(self.num_layers)]
        self._kv_shape = (1, int(io["num_kv_heads"]), 0, int(io["head_dim"]))
        self._vocab = int(io.get("vocab_size") or config.llm.vocab_size)
        self._last_only = io.get("logits_positions") == "last"
        # read-only buffers every cache binds by pointer: the mask (ones; its bound length grows), positions
        self._mask = np.ones((1, self.graph_max), np.int64)
        self._positions = np.arange(self.graph_max, dtype=np.int64)[None]
        self._projector_io = _io_names(self.projector)
        self.tile_batch = tile_batch(config, self.device)

    @classmethod
    def from_bundle(cls, bundle, threads: int | None = None, device: str | None = None, **kw) -> "OrtBackend":
        """``kw``: ``capacity``, ``vision_engine`` ("onnxruntime" or "openvino")."""
        spec = bundle.target("cpu")
        io = spec.get("io", {}).get("decoder")
        if not io:
            raise BundleError(f"bundle {bundle.path}: the cpu target has no decoder io contract in its manifest")
        return cls(bundle.config, bundle.file("vision"), bundle.file("projector"), bundle.file("decoder"),
                   bundle.file("embeddings"), io, threads=threads, device=device, **kw)

    def _session(self, path):
        return session(path, self.threads, self.providers)

    def _ortvalue(self, array: np.ndarray):
        ort = _ort()
        if self.device == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(array)  # shares the numpy memory
        return ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)

    def new_cache(self, capacity: int | None = None) -> OrtKVCache:
        return OrtKVCache(self, capacity or self.capacity)

    # ---- vision --------------------------------------------------------------------------------------
    def encode_tiles(self, pixels: np.ndarray) -> np.ndarray:
        if self.vision is None:
            raise BundleError("this ONNX Runtime backend was opened without a vision graph")
        return encode_in_batches(self.vision, pixels, self.tile_batch)

    def project(self, features: np.ndarray) -> np.ndarray:
        if self.projector is None:
            raise BundleError("this ONNX Runtime backend was opened without a projector graph")
        name_in, name_out = self._projector_io
        x = np.ascontiguousarray(features, dtype=np.float32)
        return self.projector.run([name_out], {name_in: x})[0].astype(np.float32, copy=False)

    # ---- LLM -----------------------------------------------------------------------------------------
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return self.table(np.asarray(ids, dtype=np.int64).reshape(-1))

    def _run(self, embeds: np.ndarray, cache: OrtKVCache) -> np.ndarray:
        """Feed (1, L, H) embeddings after the cached positions; return the last position's logits."""
        n = embeds.shape[1]
        total = cache.length + n
        cache.ensure(total)
        b, io = cache.binding, self.io
        b.bind_input(io["inputs_embeds"], "cpu", 0, np.float32, list(embeds.shape), embeds.ctypes.data)
        b.bind_input(io["attention_mask"], "cpu", 0, np.int64, [1, total], self._mask.ctypes.data)
        if io.get("position_ids"):
            pos = self._positions[:, cache.length:total]
            b.bind_input(io["position_ids"], "cpu", 0, np.int64, [1, n], pos.ctypes.data)
        one = n == 1 or self._last_only
        if one:
            cache.bind_output(io["logits"], "cpu", 0, np.float32, [1, 1, self._vocab], cache.logits.ctypes.data)
        else:
            cache.bind_output(io["logits"], "cpu")
        self.decoder.run_with_iobinding(b)
        cache.length = total
        if not self.shared:
            cache.rebind_presents()
        if one:
            return cache.logits[0, -1].copy()
        return cache.output(io["logits"])[0, -1].astype(np.float32)

    def prefill(self, embeds: np.ndarray, cache: OrtKVCache) -> np.ndarray:
        """Prefill in chunks of ``PREFILL_CHUNK`` positions: a long prompt (a video: 1 000+ tokens) then needs one
        chunk's activations, not the whole prompt's, at no cost in speed (GQA attends over the cached chunks)."""
        embeds = check_embeds(embeds, self.config.llm.hidden_size)
        n = embeds.shape[1]
        last = max(0, (n - 1) // PREFILL_CHUNK * PREFILL_CHUNK)
        for s in range(0, last, PREFILL_CHUNK):
            self._run(embeds[:, s:s + PREFILL_CHUNK], cache)
        return self._run(embeds[:, last:], cache)

    def decode_step(self, token_id: int, cache: OrtKVCache) -> np.ndarray:
        cache.step[0, 0] = self.table(np.asarray([int(token_id)]))[0]
        return self._run(cache.step, cache)

    @property
    def max_length(self) -> int:
        return self.graph_max

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "providers": self.providers,
                "kv": "shared-buffer" if self.shared else "present→past", "kv_capacity": self.capacity,
                "threads": self.threads, "vision": self.vision.describe() if self.vision is not None else None}


def _io_names(session) -> tuple[str, str] | None:
    return None if session is None else (session.get_inputs()[0].name, session.get_outputs()[0].name)


def _host(entry) -> np.ndarray:
    arr, value = entry
    return arr if arr is not None else value.numpy()
