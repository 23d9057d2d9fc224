"""Torch backend: wraps an ``NVILAModel`` (CPU fp32/bf16, CUDA fp16). torch is imported here only, so the
ONNX Runtime path never loads it."""

from __future__ import annotations

import os

import numpy as np

from nvila_edge.errors import BackendUnavailable

from .base import Backend, check_embeds


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
        self._cache = None
        self._length = 0
        self._graph = None
        if cuda_graph and self.device.startswith("cuda"):
            self._graph = self._make_graph(min(self.config.llm.context_length, max_cache_len))

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

    def _run(self, **kwargs) -> np.ndarray:
        with self._torch.inference_mode():
            out = self.model.llm(cache=self._cache, use_cache=True, logits_to_keep=1, **kwargs)
        self._cache = out.cache
        return out.logits[0, -1].float().cpu().numpy()

    def prefill(self, embeds: np.ndarray) -> np.ndarray:
        embeds = check_embeds(embeds, self.config.llm.hidden_size)
        if self._graph is not None:
            logits = self._graph.prefill(self._tensor(embeds))
            self._length = self._graph.length
            return logits
        logits = self._run(inputs_embeds=self._tensor(embeds))
        self._length += embeds.shape[1]
        return logits

    def decode_step(self, token_id: int) -> np.ndarray:
        if self._graph is not None:
            logits = self._graph.decode_step(token_id)
            self._length = self._graph.length
            return logits
        logits = self._run(input_ids=self._torch.tensor([[int(token_id)]], device=self.device))
        self._length += 1
        return logits

    @property
    def cache_length(self) -> int:
        return self._length

    def truncate(self, length: int) -> None:
        length = max(0, int(length))
        if self._graph is not None:
            self._graph.truncate(length)
            self._length = self._graph.length
            return
        if length == 0:
            self._cache = None
        elif length < self._length:
            self._cache.crop(length - self._length)  # transformers 5: a negative count removes tokens
        self._length = min(self._length, length)

    @property
    def max_length(self) -> int:
        return self._graph.capacity if self._graph is not None else self.config.llm.context_length

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "dtype": str(self.model.dtype).replace("torch.", ""),
                "decode": "cuda-graph" if self._graph is not None else "eager"}
