"""Torch backend: wraps an ``NVILAModel`` — the bundle's ``torch`` target (plain weights: CPU fp32, CUDA fp16)
or its ``cuda`` target (real int4 / int8 kernels: CUDA bf16, or the CPU variants of the same kernels).
torch is imported here only, so the ONNX Runtime path never loads it.

The step is the model's own (``nvila_edge.modeling.decoding``): ``prefill`` / ``decode_step`` hand the caller's
cache to it. Everything stays on the device: ``encode_tiles`` returns device features, ``prompt_embeds`` runs the
model's own merge / TSP / splice in torch, on CUDA each cache is a static one with its own captured decode graph
(``cuda_graph.GraphDecoder``), and ``sampler`` picks tokens from the device logits (greedy / top-k / top-p /
repetition penalty), so a token costs one graph replay and one small copy (its id).
"""

from __future__ import annotations

import os

import numpy as np

from nvila_edge.errors import BackendUnavailable
from nvila_edge.optional import require

from nvila_edge.kv_cache import KVCache
from nvila_edge.modeling.decoding import TorchKVCache

from .base import Backend, check_embeds


def torch_sees_cuda() -> bool:
    """Whether the installed torch can run on a CUDA GPU (False for a CPU build, even beside a driver)."""
    import torch

    return bool(torch.cuda.is_available())


class TorchSampler:
    """``nvila_edge.sampling.Sampler``'s rules on torch logits, on their device. Greedy is identical to the numpy
    sampler (first maximum); sampled tokens follow the same distribution from a torch generator.

    Every mode is fixed-shape and sync-free until the one copy a token (its id): the repetition penalty reads a
    (V,) mask of the ids seen, kept on the device and updated with the sampler's own device pick (the history
    crosses host → device only for ids it did not pick itself); top-k / top-p mask instead of indexing by a
    data-dependent length; the draw is an exponential race (argmax p / E, E ~ Exp(1): the categorical
    distribution, as ``torch.multinomial``) rather than a kernel that checks its input on the host."""

    def __init__(self, params, device):
        import torch

        self.torch, self.params = torch, params
        self.gen = torch.Generator(device=device)
        if params.seed is not None:
            self.gen.manual_seed(int(params.seed))
        else:
            self.gen.seed()
        self._seen = None  # (V,) bool on the device
        self._counted = 0  # how many of ``previous`` the mask holds
        self._last = None  # (device pick, its host id)

    def _penalised(self, x, previous):
        torch, p = self.torch, self.params
        v = x.shape[0]
        if self._seen is None or self._seen.shape[0] != v or self._seen.device != x.device or \
                len(previous) < self._counted:
            self._seen, self._counted = torch.zeros(v, dtype=torch.bool, device=x.device), 0
        new = list(previous[self._counted:])
        if len(new) == 1 and self._last is not None and self._last[1] == new[0]:
            self._seen.index_fill_(0, self._last[0].reshape(1), True)  # device → device: its own pick
        else:
            ids = [int(t) for t in new if 0 <= int(t) < v]
            if ids:
                self._seen.index_fill_(0, torch.tensor(ids, dtype=torch.long).to(x.device, non_blocking=True), True)
        self._counted = len(previous)
        return torch.where(self._seen, torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)

    def pick(self, logits, previous=()):
        """The chosen id as a 0-d device tensor (nothing crosses to the host)."""
        torch, p = self.torch, self.params
        x = logits.reshape(-1).float()
        if p.repetition_penalty != 1.0:
            x = self._penalised(x, previous)
        if p.greedy:
            return torch.argmax(x)
        x = x / p.temperature
        if p.top_k and p.top_k < x.shape[0]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = torch.where(x < kth, torch.full_like(x, float("-inf")), x)
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True, stable=True)
            keep = (torch.cumsum(sorted_p, 0) - sorted_p) < p.top_p  # smallest set whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p * keep)
        race = torch.empty_like(probs).exponential_(1.0, generator=self.gen)
        return torch.argmax(probs / race)

    def __call__(self, logits, previous=()) -> int:
        tok = self.pick(logits, previous)
        tid = int(tok)  # the one copy a token
        self._last = (tok, tid)
        return tid


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, device: str | None = None, dtype: str | None = None, cuda_graph: bool = True,
                 max_cache_len: int = 8192, target: str = "torch"):
        torch = require("torch", "torch", "the torch backend")  # the light install has no torch
        self._torch = torch
        self.quantized = bool(getattr(model, "quant_modes", None))
        self.target = "cuda" if self.quantized else target  # the layout it runs (the cuda target's modules)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.quantized:  # already on its device in the kernels' dtype (load_quantized)
            dtype = None
        elif dtype is None:  # fp16 on GPU (tensor cores), the weights' own dtype on CPU
            dtype = "float16" if str(device).startswith("cuda") else None
        if dtype is not None:
            model = model.to(getattr(torch, dtype))
        self.model = model.to(device).eval() if not self.quantized else model.eval()
        self.config = model.config
        self.device = str(device)
        self.capacity = min(self.config.llm.context_length, max_cache_len)  # a static (CUDA-graph) cache's size
        self.cuda_graph = bool(cuda_graph and self.device.startswith("cuda"))

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """CUDA: a static cache with its own captured decode graph (device-resident); else a dynamic cache.
        The graph is captured here, so a failure falls back to eager decoding now, never mid-answer."""
        if self.cuda_graph:
            import warnings

            from .cuda_graph import GraphDecoder, cache_bucket

            want = min(int(capacity or self.capacity), self.config.llm.context_length)
            try:
                return GraphDecoder(self.model.llm, cache_bucket(want, self.config.llm.context_length))
            except Exception as e:  # noqa: BLE001 - any capture failure leaves the correct eager path
                warnings.warn(f"CUDA-graph decoding unavailable ({type(e).__name__}: {e}); decoding eagerly")
                self.cuda_graph = False
        return self.model.new_cache(capacity)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | None = None, dtype: str | None = None,
                        threads: int | None = None) -> "TorchBackend":
        import torch

        from nvila_edge.modeling.model import NVILAModel

        if threads:
            torch.set_num_threads(int(threads))
        return cls(NVILAModel.from_pretrained(path, dtype=torch.float32), device=device, dtype=dtype)

    @classmethod
    def from_bundle(cls, bundle, device: str | None = None, dtype: str | None = None, threads: int | None = None,
                    kernels: bool = True) -> "TorchBackend":
        """The bundle's ``cuda`` target (real low-bit kernels) if it has one, else its ``torch`` target.

        ``device=None``: CUDA when present; without CUDA the ``torch`` target if the bundle has one, else
        ``BackendUnavailable`` (use the cpu target) — ``device="cpu"`` asks for the CPU kernels explicitly."""
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        has_cuda = torch.cuda.is_available()
        plain = "torch" in bundle.targets
        if "cuda" not in bundle.targets or (plain and device is None and not has_cuda):
            return cls.from_checkpoint(bundle.file("checkpoint", target="torch"), device=device, dtype=dtype)
        if device is None:
            if not has_cuda:
                raise BackendUnavailable("CUDA", "gpu", message=(
                    f"bundle {bundle.path}'s cuda target needs a CUDA GPU and this machine has none: use the cpu "
                    "target (export it with --target cpu; backend='onnxruntime'), or device='cpu' for the CPU kernels"))
            device = "cuda"
        if str(device).startswith("cuda") and not has_cuda:
            raise BackendUnavailable("CUDA", "gpu", message=(
                f"device={device!r}: torch {torch.__version__} sees no CUDA GPU on this machine; use the bundle's "
                "cpu target on ONNX Runtime, or device='cpu' for the CPU kernels"))
        from nvila_edge.modeling.quantized import load_quantized

        model = load_quantized(bundle.config, bundle.file("weights", target="cuda"), device=device,
                               dtype=getattr(torch, dtype) if dtype else None, kernels=kernels)
        return cls(model, device=device, target="cuda")

    def _tensor(self, x):
        torch = self._torch
        if isinstance(x, torch.Tensor):
            return x.to(self.device, self.model.dtype)
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.model.dtype)

    def to_numpy(self, value) -> np.ndarray:
        if isinstance(value, self._torch.Tensor):
            return value.float().cpu().numpy()
        return np.asarray(value, dtype=np.float32)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self._torch.cuda.synchronize()

    # ---- vision --------------------------------------------------------------------------------------
    def encode_tiles(self, pixels: np.ndarray):
        """Device features; synchronised once, so the caller's timing (latency-aware tiling) is the real one."""
        with self._torch.inference_mode():
            feats = self.model.encode_tiles(self._torch.from_numpy(np.ascontiguousarray(pixels)))
        self._sync()
        return feats

    def project(self, features: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.to_numpy(self.model.mm_projector(self._tensor(features)))

    def prompt_embeds(self, input_ids, media, features, end=None):
        """The model's own torch merge / TSP / splice, on the device (``end`` is recomputed there)."""
        with self._torch.inference_mode():
            chunks = self.model.embed_features(self._tensor(features), media) if media else []
            return self.model.embed_inputs(np.asarray(input_ids), chunks)

    # ---- LLM -----------------------------------------------------------------------------------------
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        ids = self._torch.as_tensor(np.asarray(ids, dtype=np.int64).reshape(-1), device=self.device)
        with self._torch.inference_mode():
            return self.to_numpy(self.model.llm.get_input_embeddings()(ids))

    def _embeds(self, embeds):
        if isinstance(embeds, self._torch.Tensor):
            h = self.config.llm.hidden_size
            if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != h or embeds.shape[1] < 1:
                raise ValueError(f"prefill needs embeddings of shape (1, L>=1, {h}), got {tuple(embeds.shape)}")
            return self._tensor(embeds)
        return self._tensor(check_embeds(embeds, self.config.llm.hidden_size))

    def prefill(self, embeds, cache: TorchKVCache):
        """Device logits (V,) of the prompt's last position."""
        return self.model.prefill(self._embeds(embeds), cache)

    def decode_step(self, token_id: int, cache: TorchKVCache):
        return self.model.decode_step(token_id, cache)

    def sampler(self, params) -> TorchSampler:
        return TorchSampler(params, self.device)

    @property
    def max_length(self) -> int:
        return self.capacity if self.cuda_graph else self.config.llm.context_length

    def describe(self) -> dict:
        d = {"backend": self.name, "device": self.device, "dtype": str(self.model.dtype).replace("torch.", ""),
             "decode": "cuda-graph" if self.cuda_graph else "eager", "target": self.target}
        if self.quantized:
            d["kernels"] = dict(self.model.quant_modes)
        return d
