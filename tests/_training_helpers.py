"""Shared helpers for the training tests (plain functions, no fixtures).

Import as ``from _training_helpers import ...`` (pytest puts ``tests/`` on ``sys.path``). Everything uses the
"demo" preset (112-pixel tiles) and the demo tokenizer, so batches are cheap on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def write_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def write_mp4(path: Path, num_frames: int = 8, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (w, h))
    for _ in range(num_frames):
        writer.write(np.ascontiguousarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    writer.release()
    return path


def record(question: str, answer: str, **media) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **media}


def write_jsonl(path: Path, rows: Sequence) -> Path:
    """Rows are dicts (dumped as JSON) or raw strings (written verbatim, for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def train_steps(model, processor, records, steps: int, batch_size: int = 4, lr: float = 1e-3, seed: int = 0,
                freeze_vision: bool = True) -> list[float]:
    """A plain AdamW loop over collated batches (cycling through ``records``); returns the losses."""
    import torch

    from nvila_edge.training.data import NVILACollator, NVILADataset

    torch.manual_seed(seed)
    items = [NVILADataset(records, processor)[i] for i in range(len(records))]
    collate = NVILACollator()
    batches = [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    if freeze_vision:
        for p in model.vision_tower.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses
