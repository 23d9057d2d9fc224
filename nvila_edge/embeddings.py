"""Token-embedding lookup for the torch-free runtime (numpy only).

Reads ``embeddings.safetensors`` written by ``nvila_edge.export.llm_onnx.export_embeddings``: "weight"
(float32 / float16, or int8 with per-row float32 "scales"). The file is memory-mapped by default, so a
151k x 1536 table costs RSS only for the rows a prompt touches.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from .errors import BundleError

_DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8}


class EmbeddingTable:
    """``table(ids)`` → float32 embeddings of shape ``ids.shape + (hidden_size,)``."""

    def __init__(self, weight: np.ndarray, scales: np.ndarray | None = None, metadata: dict | None = None):
        if weight.ndim != 2:
            raise BundleError(f"embedding weight must be 2-D, got shape {weight.shape}")
        if weight.dtype == np.int8 and (scales is None or scales.shape != (weight.shape[0],)):
            raise BundleError("an int8 embedding table needs one float32 scale per row ('scales')")
        self.weight, self.scales, self.metadata = weight, scales, dict(metadata or {})

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def end_token_ids(self) -> tuple[int, ...]:
        """The ids appended after each media item ("\\n"), as exported."""
        raw = self.metadata.get("end_token_ids", "")
        return tuple(int(t) for t in raw.split(",") if t.strip())

    def __call__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise IndexError(f"token id out of range 0..{self.vocab_size - 1}")
        rows = self.weight[ids].astype(np.float32)
        if self.scales is not None:
            rows *= self.scales[ids][..., None]
        return rows


def load_embeddings(path: str | os.PathLike, mmap: bool = True) -> EmbeddingTable:
    """Open an embeddings.safetensors file (memory-mapped unless ``mmap=False``)."""
    path = Path(path)
    if not mmap:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        t = load_file(str(path))
        return EmbeddingTable(t["weight"], t.get("scales"), meta)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise BundleError(f"cannot read embedding table {path}: {e}") from e
    meta = header.pop("__metadata__", None) or {}
    arrays = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise BundleError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise BundleError(f"{path}: tensor {name!r} has inconsistent size")
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape)
    if "weight" not in arrays:
        raise BundleError(f"{path} has no 'weight' tensor")
    scales = np.asarray(arrays["scales"]) if "scales" in arrays else None  # small: keep in RAM
    return EmbeddingTable(arrays["weight"], scales, meta)
