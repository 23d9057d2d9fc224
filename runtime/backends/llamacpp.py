"""The llama.cpp LLM engine: the bundle's ``gguf`` target (``llm.gguf``) through llama-cpp-python's low-level API,
beside the cpu target's vision tower and projector on ONNX Runtime (or OpenVINO, ``vision_engine``).

Our code makes every input embedding, as on ONNX Runtime (vision features through the projector, text through the
cpu target's table), and hands them to llama.cpp in a ``llama_batch`` with ``embd``; decode steps feed the next
token's embedding the same way, so the GGUF's own token table is never read. One ``llama_context`` holds every
cache: each ``LlamaCppKVCache`` is a llama.cpp sequence id of a unified KV buffer (``kv_unified``), so sessions,
video streams and the server's interleaved requests keep their own positions; ``truncate`` is a
``llama_memory_seq_rm``, and a cache given back (a finished or killed stream) is emptied the same way. The logits
come back as numpy and our sampler picks the token (greedy equals the ORT engine's on the same codes).

Only llama_cpp, gguf (the load-time check) and numpy are imported: no torch.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from nvila_edge.errors import BundleError, ContextOverflowError, GenerationError
from nvila_edge.kv_cache import KVCache
from nvila_edge.optional import require

from .base import check_embeds
from .onnxruntime import OrtBackend

MAX_SEQUENCES = 8  # caches alive at once (a session, a stream, the server's admitted requests)
BATCH = 512  # positions a llama_decode call takes (llama.cpp's n_batch / n_ubatch)


def _llama():
    return require("llama_cpp", "llamacpp", "the llama.cpp LLM engine")


def check_gguf(path, info: dict) -> None:
    """Every tensor's shape and type against the manifest's config, before llama.cpp loads anything: a mismatch is a
    ``BundleError`` naming the tensor (llama.cpp would abort the process or compute garbage)."""
    gguf = require("gguf", "llamacpp", "reading the bundle's GGUF")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is a broken bundle file
        raise BundleError(f"{path} is not a readable GGUF: {type(e).__name__}: {e}") from e
    H, F, V = int(info["hidden_size"]), int(info["intermediate_size"]), int(info["vocab_size"])
    kv = int(info["num_kv_heads"]) * int(info["head_dim"])
    want = {"token_embd.weight": (H, V), "output_norm.weight": (H,), "output.weight": (H, V)}
    for i in range(int(info["num_layers"])):
        p = f"blk.{i}"
        want.update({f"{p}.attn_norm.weight": (H,), f"{p}.ffn_norm.weight": (H,), f"{p}.attn_q.weight": (H, H),
                     f"{p}.attn_k.weight": (H, kv), f"{p}.attn_v.weight": (H, kv), f"{p}.attn_output.weight": (H, H),
                     f"{p}.ffn_gate.weight": (H, F), f"{p}.ffn_up.weight": (H, F), f"{p}.ffn_down.weight": (F, H),
                     f"{p}.attn_q.bias": (H,), f"{p}.attn_k.bias": (kv,), f"{p}.attn_v.bias": (kv,)})
    types = info.get("types") or {}
    have = {t.name: t for t in reader.tensors}
    for name, shape in want.items():
        t = have.get(name)
        if t is None:
            if name.endswith(".bias"):
                continue  # Qwen2 without q/k/v biases
            raise BundleError(f"{path}: tensor {name} is missing (the config needs shape {shape})")
        got = tuple(int(x) for x in t.shape)
        if got != shape:
            raise BundleError(f"{path}: tensor {name} has shape {got}, the config needs {shape} (ggml order)")
        if name in types and t.tensor_type.name.lower() != types[name].split("-")[0]:
            raise BundleError(f"{path}: tensor {name} is {t.tensor_type.name}, the manifest says {types[name]}")


class LlamaCppKVCache(KVCache):
    """One llama.cpp sequence of the engine's context (its id is taken from, and given back to, the engine)."""

    def __init__(self, engine: "LlamaCppLLM", capacity: int):
        self.engine = engine
        self.seq = engine._take_seq()
        self.capacity = min(int(capacity), engine.n_ctx)
        self.length = 0

    def truncate(self, length: int) -> None:
        length = max(0, min(int(length), self.length))
        if length < self.length and self.seq is not None:
            self.engine._seq_rm(self.seq, length)
        self.length = length

    def close(self) -> None:
        """Free the sequence (its positions and its id)."""
        if self.seq is not None:
            self.engine._seq_rm(self.seq, 0)
            self.engine._give_seq(self.seq)
            self.seq, self.length = None, 0

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class LlamaCppLLM:
    """A GGUF on a llama.cpp context: ``step(embeds, cache)`` appends (n, H) embeddings to the cache's sequence and
    returns the last position's logits (V,)."""

    def __init__(self, path, info: dict, *, threads: int | None = None, n_ctx: int | None = None,
                 sequences: int = MAX_SEQUENCES, check: bool = True):
        L = self.L = _llama()
        if check:
            check_gguf(path, info)
        self.hidden, self.vocab = int(info["hidden_size"]), int(info["vocab_size"])
        L.llama_backend_init()
        _quiet(L)
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise BundleError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = int(n_ctx or info["context_length"])
        cp.n_batch = cp.n_ubatch = BATCH
        cp.n_seq_max = int(sequences)
        cp.kv_unified = True  # every sequence may use the whole context
        cp.embeddings = False
        import os

        n = int(threads or os.cpu_count() or 1)
        cp.n_threads = cp.n_threads_batch = n
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise BundleError(f"llama.cpp could not make a context for {path} (n_ctx {cp.n_ctx})")
        self.n_ctx = int(L.llama_n_ctx(self.ctx))
        self.threads = n
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(BATCH, self.hidden, 1)
        self._free = list(range(int(sequences)))
        self._lock = threading.Lock()

    # ---- sequences -------------------------------------------------------------------------------------
    def _take_seq(self) -> int:
        with self._lock:
            if not self._free:
                raise GenerationError(f"the llama.cpp engine holds {MAX_SEQUENCES} caches at once; close one first")
            return self._free.pop(0)

    def _give_seq(self, seq: int) -> None:
        with self._lock:
            self._free.append(seq)

    def _seq_rm(self, seq: int, start: int) -> None:
        if self.ctx:  # after close() the context (and every sequence in it) is gone already
            self.L.llama_memory_seq_rm(self.mem, seq, int(start), -1)

    # ---- steps -----------------------------------------------------------------------------------------
    def step(self, embeds: np.ndarray, cache: LlamaCppKVCache) -> np.ndarray:
        """(n, H) float32 after the cache's positions, BATCH at a time; the last position's logits."""
        L, b, n = self.L, self.batch, embeds.shape[0]
        if not isinstance(cache, LlamaCppKVCache) or cache.engine is not self:
            raise GenerationError("the llama.cpp engine steps only the caches its own new_cache() made")
        if cache.seq is None:
            raise GenerationError("this KV cache was closed")
        total = cache.length + n
        if total > self.n_ctx:
            raise ContextOverflowError(total, self.n_ctx, "the llama.cpp context")
        for s in range(0, n, BATCH):
            chunk = np.ascontiguousarray(embeds[s:s + BATCH], dtype=np.float32)
            m = chunk.shape[0]
            ctypes.memmove(b.embd, chunk.ctypes.data, chunk.nbytes)
            for j in range(m):
                b.pos[j] = cache.length + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = cache.seq
                b.logits[j] = 0
            b.logits[m - 1] = 1 if s + m == n else 0
            b.n_tokens = m
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                self._seq_rm(cache.seq, cache.length)  # nothing half-written stays in the sequence
                raise GenerationError(f"llama_decode failed (status {rc}) at position {cache.length}")
            cache.length += m
        ptr = L.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab,)).copy()

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.L.llama_model_free(self.model)
            self.ctx = self.mem = None


_LOG_CB = None


def _quiet(L) -> None:
    """llama.cpp's load log off (errors still raise here)."""
    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = L.llama_log_callback(lambda level, text, data: None)
        L.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


class LlamaCppBackend(OrtBackend):
    """The onnxruntime backend with its LLM on llama.cpp: vision + projector + token table from the cpu target,
    the decoder from the gguf target."""

    target = "gguf"

    def __init__(self, config, vision, projector, gguf_path, embeddings, info: dict, *, threads: int | None = None,
                 vision_engine: str = "onnxruntime", n_ctx: int | None = None):
        self.llm = LlamaCppLLM(gguf_path, info, threads=threads, n_ctx=n_ctx)  # refuses a bad GGUF before anything
        io = {k: info[k] for k in ("num_layers", "num_kv_heads", "head_dim", "vocab_size")}
        io.update({k: "" for k in ("past_key", "past_value", "present_key", "present_value")}, max_length=self.llm.n_ctx)
        super().__init__(config, vision, projector, None, embeddings, io, threads=threads, device="cpu",
                         vision_engine=vision_engine)
        self.info = info

    @classmethod
    def from_bundle(cls, bundle, threads: int | None = None, device: str | None = None, **kw) -> "LlamaCppBackend":
        if device is not None and not str(device).startswith("cpu"):
            raise BundleError(f"llm_engine='llamacpp' runs on the CPU, not {device}")
        spec = bundle.target("gguf")
        info = (spec.get("io") or {}).get("llm")
        if not info:
            raise BundleError(f"bundle {bundle.path}: the gguf target has no llm io contract in its manifest")
        return cls(bundle.config, bundle.file("vision", "gguf"), bundle.file("projector", "gguf"),
                   bundle.file("llm", "gguf"), bundle.file("embeddings", "gguf"), info, threads=threads, **kw)

    def new_cache(self, capacity: int | None = None) -> LlamaCppKVCache:
        return LlamaCppKVCache(self.llm, capacity or self.llm.n_ctx)

    def prefill(self, embeds: np.ndarray, cache: LlamaCppKVCache) -> np.ndarray:
        embeds = check_embeds(embeds, self.config.llm.hidden_size)
        return self.llm.step(embeds[0], cache)

    def decode_step(self, token_id: int, cache: LlamaCppKVCache) -> np.ndarray:
        return self.llm.step(self.table(np.asarray([int(token_id)])).astype(np.float32), cache)

    @property
    def max_length(self) -> int:
        return self.llm.n_ctx

    def describe(self) -> dict:
        return {"backend": self.name, "device": "cpu", "llm": {"engine": "llamacpp", "threads": self.llm.threads,
                "n_ctx": self.llm.n_ctx, "types": "q4_0 + " + str(self.info.get("lm_head")) + " head"},
                "threads": self.threads, "vision": self.vision.describe() if self.vision is not None else None}

    def close(self) -> None:
        self.llm.close()
