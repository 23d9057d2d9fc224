"""The training loss of the LM head, computed only where it is supervised and a chunk of positions at a time.

A fine-tuning example is mostly prompt and visual tokens; only its answer carries labels. Running the LM
head over every position made ``positions × vocab`` fp32 logits (26 GB for a batch of four NVILA-8B
examples) of which all but the answers' were thrown away. Here the final hidden states of the supervised
positions are gathered first, and the head + cross-entropy run ``chunk_tokens`` positions at a time, each
chunk under activation checkpointing, so at most one chunk's logits exist, in forward and in backward.
The result equals transformers' ``ForCausalLMLoss`` (shift by one, -100 ignored, mean or sum /
``num_items_in_batch``) to float tolerance (tests/test_lm_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024  # positions per LM-head chunk: 0.6 GB of fp32 logits at Qwen2's 151 936-word vocabulary


def supervised_positions(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """(N, H) hidden states of the positions that predict a label, and those N labels: position ``t``
    predicts ``labels[t + 1]`` (the causal shift), within each row."""
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    keep = shifted != ignore_index
    return hidden[keep], shifted[keep]


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_tokens: int = CHUNK_TOKENS,
                    num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` against ``targets`` (already gathered: no ignored entries), summed
    chunk by chunk, divided by ``num_items_in_batch`` (gradient accumulation over micro-batches) or by the
    number of targets (the mean)."""
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        # checkpointed: the forward keeps only h (already alive); backward recomputes this chunk's logits
        part = checkpoint(_chunk_loss, h, t, head, use_reentrant=False) if grad else _chunk_loss(h, t, head)
        total = total + part
    denom = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    if torch.is_tensor(denom):
        denom = denom.to(total.device)
    return total / denom
