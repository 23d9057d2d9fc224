"""ONNX Runtime backend: vision.onnx + projector.onnx + decoder.onnx + the numpy embedding table.

Decoding is the speed path. The decoder's KV cache lives in buffers allocated once and bound with
IOBinding, so a step copies nothing but one embedding row in and the logits out:

- ``past_present_share_buffer`` graphs (GroupQueryAttention, as onnxruntime-genai's builder and our
  exporter make them): past and present are the *same* (1, kv_heads, capacity, head_dim) buffer; the
  graph writes the new positions in place and reads the valid length from ``attention_mask``.
- other graphs (present = past + new, e.g. a plain HF export): each step's present outputs, allocated by
  ONNX Runtime, are bound as the next step's past inputs without passing through numpy.

Only onnxruntime and numpy are imported (no torch): the runtime's light path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nvila_edge.config import NVILAConfig
from nvila_edge.errors import BackendUnavailable, BundleError, GenerationError

from .base import Backend, check_embeds

_NP = {"float32": np.float32, "float16": np.float16}
INITIAL_CAPACITY = 4096  # KV positions allocated up front; grows (doubling) up to the graph's max_length


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailable("onnxruntime", "export", "the ONNX Runtime backend") from e
    return onnxruntime


def providers_for(device: str | None) -> list[str]:
    """CUDA provider when asked for (or, with ``device=None``, when available), CPU otherwise."""
    available = _ort().get_available_providers()
    want_cuda = device is None or str(device).startswith("cuda")
    if want_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device is not None and str(device).startswith("cuda"):
        raise BackendUnavailable("onnxruntime-gpu", "gpu", "the ONNX Runtime CUDA provider")
    return ["CPUExecutionProvider"]


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, config: NVILAConfig, vision: str | os.PathLike | None, projector: str | os.PathLike | None,
                 decoder: str | os.PathLike, embeddings, io: dict, *, threads: int | None = None,
                 device: str | None = None, capacity: int | None = None):
        _ort()  # a clear BackendUnavailable before any work when onnxruntime is missing
        self.config = config
        self.providers = providers_for(device)
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.threads = threads
        # vision / projector may be left out (None) for LLM-only use such as decode benchmarks
        self.vision = self._session(vision) if vision is not None else None
        self.projector = self._session(projector) if projector is not None else None
        self.decoder = self._session(decoder)
        if not callable(embeddings):
            from nvila_edge.embeddings import load_embeddings

            embeddings = load_embeddings(embeddings)
        self.table = embeddings
        self.io = dict(io)
        self.num_layers = int(io["num_layers"])
        self.kv_dtype = _NP[io.get("kv_dtype", "float32")]
        self.shared = bool(io.get("past_present_share_buffer", False))
        self.graph_max = int(io.get("max_length") or config.llm.context_length)
        self._cap = min(self.graph_max, capacity or INITIAL_CAPACITY)
        self._names = [(io["past_key"].format(i=i), io["past_value"].format(i=i),
                        io["present_key"].format(i=i), io["present_value"].format(i=i)) for i in range(self.num_layers)]
        self._kv_shape = (1, int(io["num_kv_heads"]), 0, int(io["head_dim"]))
        self._vocab = int(io.get("vocab_size") or config.llm.vocab_size)
        self._last_only = io.get("logits_positions") == "last"
        self._outputs = [o.name for o in self.decoder.get_outputs()]
        # fixed buffers bound by pointer: the mask (ones; its bound length grows), one step's embedding,
        # positions, and the logits of one position
        self._mask = np.ones((1, self.graph_max), np.int64)
        self._positions = np.arange(self.graph_max, dtype=np.int64)[None]
        self._step = np.zeros((1, 1, config.llm.hidden_size), np.float32)
        self._logits = np.zeros((1, 1, self._vocab), np.float32)
        self._binding = self.decoder.io_binding()
        self._order: list[str] = []  # output names in binding order
        self._length = 0
        self._kv: list[list] = []
        self._alloc(self._cap)
        self._vision_io = _io_names(self.vision)
        self._projector_io = _io_names(self.projector)
        self.tile_batch = max(1, 8192 // (config.vision.grid ** 2))  # bounds activation memory, like torch

    @classmethod
    def from_bundle(cls, bundle, threads: int | None = None, device: str | None = None, **kw) -> "OrtBackend":
        spec = bundle.target("cpu")
        io = spec.get("io", {}).get("decoder")
        if not io:
            raise BundleError(f"bundle {bundle.path}: the cpu target has no decoder io contract in its manifest")
        return cls(bundle.config, bundle.file("vision"), bundle.file("projector"), bundle.file("decoder"),
                   bundle.file("embeddings"), io, threads=threads, device=device, **kw)

    def _session(self, path):
        ort = _ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no spinning: between decode steps Python samples the next token, and spinning pool threads take
        # the cores it needs (measured on 2 cores: 10 → 16 tok/s); onnxruntime-genai turns it off too
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
            so.inter_op_num_threads = 1
        if not Path(path).is_file():
            raise BundleError(f"ONNX graph not found: {path}")
        return ort.InferenceSession(str(path), sess_options=so, providers=self.providers)

    # ---- KV buffers ----------------------------------------------------------------------------------
    def _ortvalue(self, array: np.ndarray):
        ort = _ort()
        if self.device == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(array)  # shares the numpy memory
        return ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)

    def _alloc(self, capacity: int) -> None:
        """(Re)allocate the KV buffers for ``capacity`` positions, keeping the cached ones."""
        b = self._binding
        old = self._kv
        kv = []
        for i, names in enumerate(self._names):
            pair = []
            for j in range(2):
                if self.shared:
                    arr = np.zeros(self._kv_shape[:2] + (capacity,) + self._kv_shape[3:], self.kv_dtype)
                    if old and self._length:
                        arr[:, :, :self._length] = _host(old[i][j])[:, :, :self._length]
                else:
                    arr = np.zeros(self._kv_shape[:2] + (self._length,) + self._kv_shape[3:], self.kv_dtype)
                    if old and self._length:
                        arr[:] = _host(old[i][j])[:, :, :self._length]
                value = self._ortvalue(arr)
                pair.append((arr, value) if self.device == "cpu" else (None, value))
                b.bind_ortvalue_input(names[j], value)
                if self.shared:
                    if names[2 + j] not in self._order:
                        self._order.append(names[2 + j])
                    b.bind_ortvalue_output(names[2 + j], value)
                else:
                    self._bind_output(names[2 + j], self.device)
            kv.append(pair)
        self._kv = kv
        self._cap = capacity

    def _ensure(self, total: int) -> None:
        if total > self.graph_max:
            raise GenerationError(f"the sequence needs {total} positions but the decoder was exported for "
                                  f"{self.graph_max}; re-export with a larger max_length")
        if self.shared and total > self._cap:
            cap = self._cap
            while cap < total:
                cap *= 2
            self._alloc(min(cap, self.graph_max))

    # ---- vision --------------------------------------------------------------------------------------
    def encode_tiles(self, pixels: np.ndarray) -> np.ndarray:
        if self.vision is None:
            raise BundleError("this ONNX Runtime backend was opened without a vision graph")
        name_in, name_out = self._vision_io
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        outs = [self.vision.run([name_out], {name_in: pixels[s:s + self.tile_batch]})[0]
                for s in range(0, pixels.shape[0], self.tile_batch)]
        return np.concatenate(outs).astype(np.float32, copy=False)

    def project(self, features: np.ndarray) -> np.ndarray:
        if self.projector is None:
            raise BundleError("this ONNX Runtime backend was opened without a projector graph")
        name_in, name_out = self._projector_io
        x = np.ascontiguousarray(features, dtype=np.float32)
        return self.projector.run([name_out], {name_in: x})[0].astype(np.float32, copy=False)

    # ---- LLM -----------------------------------------------------------------------------------------
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return self.table(np.asarray(ids, dtype=np.int64).reshape(-1))

    def _run(self, embeds: np.ndarray) -> np.ndarray:
        """Feed (1, L, H) embeddings after the cached positions; return the last position's logits."""
        n = embeds.shape[1]
        total = self._length + n
        self._ensure(total)
        b, io = self._binding, self.io
        b.bind_input(io["inputs_embeds"], "cpu", 0, np.float32, list(embeds.shape), embeds.ctypes.data)
        b.bind_input(io["attention_mask"], "cpu", 0, np.int64, [1, total], self._mask.ctypes.data)
        if io.get("position_ids"):
            pos = self._positions[:, self._length:total]
            b.bind_input(io["position_ids"], "cpu", 0, np.int64, [1, n], pos.ctypes.data)
        one = n == 1 or self._last_only
        if one:
            self._bind_output(io["logits"], "cpu", 0, np.float32, [1, 1, self._vocab], self._logits.ctypes.data)
        else:
            self._bind_output(io["logits"], "cpu")
        self.decoder.run_with_iobinding(b)
        self._length = total
        if not self.shared:
            self._rebind_presents()
        if one:
            return self._logits[0, -1].copy()
        return self._output(io["logits"])[0, -1].astype(np.float32)

    def _output(self, name: str):
        return self._binding.get_outputs()[self._order.index(name)].numpy()

    def _bind_output(self, name: str, *args) -> None:
        # IOBinding keeps outputs in first-bound order (re-binding a name replaces it in place)
        if name not in self._order:
            self._order.append(name)
        self._binding.bind_output(name, *args)

    def _rebind_presents(self) -> None:
        """Non-shared graphs: this step's presents become the next step's pasts (no numpy round trip)."""
        outs = self._binding.get_outputs()
        b = self._binding
        for i, (pk, pv, ok, ov) in enumerate(self._names):
            k, v = outs[self._order.index(ok)], outs[self._order.index(ov)]
            b.bind_ortvalue_input(pk, k)
            b.bind_ortvalue_input(pv, v)
            self._bind_output(ok, self.device)
            self._bind_output(ov, self.device)
            self._kv[i] = [(None, k), (None, v)]

    def prefill(self, embeds: np.ndarray) -> np.ndarray:
        return self._run(check_embeds(embeds, self.config.llm.hidden_size))

    def decode_step(self, token_id: int) -> np.ndarray:
        self._step[0, 0] = self.table(np.asarray([int(token_id)]))[0]
        return self._run(self._step)

    @property
    def cache_length(self) -> int:
        return self._length

    def truncate(self, length: int) -> None:
        length = max(0, min(int(length), self._length))
        if not self.shared and length < self._length:
            self._length = length
            self._alloc(self._cap)  # copies the kept positions into fresh past inputs
        self._length = length  # shared buffers: positions past the mask's length are simply overwritten

    @property
    def max_length(self) -> int:
        return self.graph_max

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "providers": self.providers,
                "kv": "shared-buffer" if self.shared else "present→past", "kv_capacity": self._cap,
                "threads": self.threads}


def _io_names(session) -> tuple[str, str] | None:
    return None if session is None else (session.get_inputs()[0].name, session.get_outputs()[0].name)


def _host(entry) -> np.ndarray:
    arr, value = entry
    return arr if arr is not None else value.numpy()
