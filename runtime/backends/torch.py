"""Torch backend: wraps an ``NVILAModel`` (CPU fp32/bf16, CUDA fp16). torch is imported here only, so the
ONNX Runtime path never loads it."""

from __future__ import annotations

import os

import numpy as np

from nvila_edge.errors import BackendUnavailable

from .base import Backend, KVCache, check_embeds


class TorchKVCache(KVCache):
    """Eager decoding's cache: a transformers ``DynamicCache`` (made by the first prefill) and its length."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.cache = None

    def truncate(self, length: int) -> None:
        length = max(0, min(int(length), self.length))
        if length == 0:
            self.cache = None
        elif self.cache is not None:
            # per layer, so a prefill that failed halfway (some layers appended, others not) is consistent again
            for layer in self.cache.layers:
                extra = layer.get_seq_length() - length
                if extra > 0:
                    layer.crop(-extra)  # transformers 5: a negative count removes that many positions
        self.length = length


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, device: str | None = None, dtype: str | None = None, cuda_graph: bool = True,
                 max_cache_len: int = 8192):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - torch is a base dependency today
            raise BackendUnavailable("torch", "train", "the torch backend") from e
        self._torch = torch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:  # fp16 on GPU (tensor cores), the weights' own dtype on CPU
            dtype = "float16" if str(device).startswith("cuda") else None
        if dtype is not None:
            model = model.to(getattr(torch, dtype))
        self.model = model.to(device).eval()
        self.config = model.config
        self.device = str(device)
        self.capacity = min(self.config.llm.context_length, max_cache_len)  # a static (CUDA-graph) cache's size
        self.cuda_graph = bool(cuda_graph and self.device.startswith("cuda"))
        if self.cuda_graph:  # capture once up front: a failure falls back to eager now, not mid-answer
            probe = self._make_graph(self.capacity)
            self.cuda_graph = probe is not None
            if probe is not None:
                self._default_cache = probe

    def _make_graph(self, capacity: int):
        """Static cache + captured decode step; None (eager decoding) where capture fails."""
        import warnings

        from .cuda_graph import GraphDecoder

        try:
            g = GraphDecoder(self.model.llm, capacity)
            g._capture()
            return g
        except Exception as e:  # noqa: BLE001 - any capture failure leaves the correct eager path
            warnings.warn(f"CUDA-graph decoding unavailable ({type(e).__name__}: {e}); decoding eagerly")
            return None

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """CUDA: a static cache with its own captured decode graph (device-resident); else a dynamic cache."""
        if self.cuda_graph:
            from .cuda_graph import GraphDecoder

            return GraphDecoder(self.model.llm, min(int(capacity or self.capacity), self.config.llm.context_length))
        return TorchKVCache(int(capacity or self.config.llm.context_length))

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | None = None, dtype: str | None = None,
                        threads: int | None = None) -> "TorchBackend":
        import torch

        from nvila_edge.modeling.model import NVILAModel

        if threads:
            torch.set_num_threads(int(threads))
        return cls(NVILAModel.from_pretrained(path, dtype=torch.float32), device=device, dtype=dtype)

    def _tensor(self, x: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.model.dtype)

    @staticmethod
    def _numpy(t) -> np.ndarray:
        return t.float().cpu().numpy()

    # ---- vision --------------------------------------------------------------------------------------
    def encode_tiles(self, pixels: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self._numpy(self.model.encode_tiles(self._torch.from_numpy(np.ascontiguousarray(pixels))))

    def project(self, features: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self._numpy(self.model.mm_projector(self._tensor(features)))

    # ---- LLM -----------------------------------------------------------------------------------------
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        ids = self._torch.as_tensor(np.asarray(ids, dtype=np.int64).reshape(-1), device=self.device)
        with self._torch.inference_mode():
            return self._numpy(self.model.llm.get_input_embeddings()(ids))

    def _run(self, cache: TorchKVCache, n: int, **kwargs) -> np.ndarray:
        if cache.length + n > cache.capacity:
            raise OverflowError(f"{cache.length + n} positions exceed the cache of {cache.capacity}")
        with self._torch.inference_mode():
            out = self.model.llm(cache=cache.cache, use_cache=True, logits_to_keep=1, **kwargs)
        cache.cache = out.cache
        cache.length += n
        return out.logits[0, -1].float().cpu().numpy()

    def prefill(self, embeds: np.ndarray, cache: KVCache | None = None) -> np.ndarray:
        embeds = check_embeds(embeds, self.config.llm.hidden_size)
        cache = self._cache(cache)
        if isinstance(cache, TorchKVCache):
            return self._run(cache, embeds.shape[1], inputs_embeds=self._tensor(embeds))
        return cache.prefill(self._tensor(embeds))

    def decode_step(self, token_id: int, cache: KVCache | None = None) -> np.ndarray:
        cache = self._cache(cache)
        if isinstance(cache, TorchKVCache):
            return self._run(cache, 1, input_ids=self._torch.tensor([[int(token_id)]], device=self.device))
        return cache.decode_step(token_id)

    @property
    def max_length(self) -> int:
        return self.capacity if self.cuda_graph else self.config.llm.context_length

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "dtype": str(self.model.dtype).replace("torch.", ""),
                "decode": "cuda-graph" if self.cuda_graph else "eager"}
