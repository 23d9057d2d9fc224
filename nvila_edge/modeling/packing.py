"""Sequence packing for training: several examples share one row of a batch, so steps stop paying for padding.

Each example's ``position_ids`` restart at 0; with ``attention_mask=None`` and no cache, transformers reads
the restarts as block-diagonal causal attention (``masking_utils.find_packed_sequence_indices``), so every
example attends only to itself and the loss equals the padded batch's (tests/test_packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class PackedBatch:
    inputs_embeds: torch.Tensor  # (rows, capacity, H)
    position_ids: torch.Tensor  # (rows, capacity), restarting at 0 per example (and for each row's filler)
    labels: torch.Tensor | None  # (rows, capacity), ignore_index on filler
    rows: list[list[int]]  # example indices in each row, in order

    @property
    def num_tokens(self) -> int:
        return self.position_ids.numel()


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: example indices grouped into rows of at most ``capacity`` tokens."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example of {max(lengths)} tokens does not fit rows of {capacity}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return [sorted(r) for r in rows]


def pack_sequences(embeds: Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None = None,
                   capacity: int | None = None, ignore_index: int = -100) -> PackedBatch:
    """Per-example (L_i, H) embeddings (and (L_i,) labels) → a packed batch of rows of ``capacity`` tokens
    (default: the longest example, so attention costs no more than in the padded batch)."""
    lengths = [int(e.shape[0]) for e in embeds]
    capacity = capacity or max(lengths)
    rows = pack_rows(lengths, capacity)
    ref = embeds[0]
    out = ref.new_zeros(len(rows), capacity, ref.shape[-1])
    positions = torch.zeros(len(rows), capacity, dtype=torch.long, device=ref.device)
    out_labels = (torch.full((len(rows), capacity), ignore_index, dtype=torch.long, device=ref.device)
                  if labels is not None else None)
    for r, idx in enumerate(rows):
        pos = 0
        for i in idx:
            n = lengths[i]
            out[r, pos:pos + n] = embeds[i]
            positions[r, pos:pos + n] = torch.arange(n, device=ref.device)
            if out_labels is not None:
                out_labels[r, pos:pos + n] = labels[i]
            pos += n
        # the filler is one more "example" (restarting at 0), so no real token attends to it
        positions[r, pos:] = torch.arange(capacity - pos, device=ref.device)
    return PackedBatch(out, positions, out_labels, rows)
