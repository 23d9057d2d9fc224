"""The media-tag objective: each answer classified from the mean-pooled media embeddings.

Classification-style vision pretraining (after SuperClass, Huang et al. 2024), per question: for every
(question, answer) turn of an example, one linear layer maps the mean of the projector's output for the
example's media to logits over answer classes (each whole answer is one class, hashed into buckets), and the
turn's softmax runs only over the answers seen so far for the same question — the data's own questions act
as classification heads, with no labels beyond the text already there. No LLM runs, so a stage with
``objective="media_tags"`` trains the vision tower and projector at about a third of a full step's cost.

Why the demo uses it: with a from-scratch LLM the language-model loss gives the tower almost no signal
early, and what the small LLM learns to read within the demo's budget is what the mean of the visual
tokens carries (given a tower whose pooled features hold left / right, the LLM answers it at 100 %). Why
this form (measured, docs/BENCHMARKS.md): one softmax over the vocabulary, or over BPE pieces that two
answers share ("right" / "triangle"), left left / right at 55–64 %; whole answers per question with the
one-cycle schedule reach 95 %. The head is a training-time module: checkpoints never hold it.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from nvila_edge import NVILAModel

from .recipe import OBJECTIVES

ANSWER_CLASSES = 4096  # hash buckets for whole answers (a stage rarely sees more than a few hundred)


def answer_turns(input_ids, labels, ignore_index: int = -100) -> list[tuple[np.ndarray, np.ndarray]]:
    """(question ids, answer ids) per supervised turn: each run of labelled positions is an answer, the
    unlabelled tokens since the previous answer its question (template tokens included)."""
    ids = np.asarray(input_ids).reshape(-1)
    lab = np.asarray(labels).reshape(-1)
    on = np.concatenate([[False], lab != ignore_index, [False]])
    edges = np.flatnonzero(on[1:] != on[:-1])  # starts and ends of the labelled runs, alternating
    turns, prev = [], 0
    for start, end in zip(edges[::2], edges[1::2]):
        turns.append((ids[prev:start], lab[start:end]))
        prev = end
    return turns


class MediaTagModel(nn.Module):
    """Wraps an ``NVILAModel`` for ``Trainer``: the LM loss (unless ``objective == "media_tags"``) plus
    ``tag_weight`` × the media-tag loss. One vision pass serves both."""

    def __init__(self, model: NVILAModel, objective: str = "lm+media_tags", tag_weight: float = 1.0,
                 ignore_ids: Sequence[int] = ()):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.model, self.objective, self.tag_weight = model, objective, tag_weight
        cfg = model.config
        self.vocab_size = cfg.llm.vocab_size
        self.head = nn.Linear(cfg.llm.hidden_size, ANSWER_CLASSES)
        # per question (its token ids), every answer class seen so far: each turn's softmax runs over those only
        self.candidates: dict[tuple[int, ...], set[int]] = {}
        mask = torch.ones(self.vocab_size)
        mask[[i for i in ignore_ids if 0 <= i < self.vocab_size]] = 0  # turn markers say nothing about media
        self.register_buffer("tag_mask", mask, persistent=False)
        self.media_ids = {cfg.image_token_id, cfg.video_token_id}
        self.last_tag_loss: float | None = None
        self._classes: dict[bytes, int | None] = {}  # answer ids → class, question ids → key: memoised,
        self._keys: dict[bytes, tuple[int, ...]] = {}  # the same few questions and answers come back every step
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}

    def answer_class(self, answer_ids: np.ndarray) -> int | None:
        """The whole answer (turn markers dropped) as one class: a stable hash of its ids into the head's
        buckets. Whole answers, not tokens: BPE pieces are shared ("right" and "triangle" both hold "ri"),
        and one row serving two answers of different questions learned neither."""
        raw = np.asarray(answer_ids, np.int64)
        if (hit := self._classes.get(raw.tobytes(), -1)) != -1:
            return hit
        keep = self.tag_mask.cpu().numpy()
        ids = [int(i) for i in raw if 0 <= int(i) < self.vocab_size and keep[int(i)] > 0]
        cls = zlib.crc32(np.asarray(ids, np.int64).tobytes()) % ANSWER_CLASSES if ids else None
        self._classes[raw.tobytes()] = cls
        return cls

    def question_key(self, question_ids: np.ndarray) -> tuple[int, ...]:
        raw = np.asarray(question_ids, np.int64)
        key = self._keys.get(raw.tobytes())
        if key is None:
            key = self._keys[raw.tobytes()] = tuple(int(i) for i in raw if int(i) not in self.media_ids)
        return key

    def candidate_mask(self, key: tuple[int, ...], cls: int) -> torch.Tensor:
        """Remember the turn's answer under its question; return the question's answers seen so far."""
        seen = self.candidates.setdefault(key, set())
        mask = self._masks.get(key)
        if mask is None or cls not in seen:
            seen.add(cls)
            mask = torch.zeros(ANSWER_CLASSES, dtype=torch.bool, device=self.tag_mask.device)
            mask[list(seen)] = True
            self._masks[key] = mask  # a new tensor, never changed in place: earlier turns keep their own
        return mask

    def tag_loss(self, pooled: torch.Tensor, candidates: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        logits = self.head(pooled).masked_fill(~candidates, float("-inf"))
        return F.cross_entropy(logits, classes)

    def forward(self, input_ids, labels, pixel_values=None, media=None, packed: bool = False, **kwargs):
        m = self.model
        chunks = m.embed_media(pixel_values, [x for items in media for x in items])
        if self.objective == "media_tags":
            out = CausalLMOutputWithPast(loss=torch.zeros((), device=m.device))
        else:
            out = m.llm_loss(input_ids, media, labels, chunks, packed=packed)
        if self.objective == "lm":
            return out
        pooled, candidates, classes, it = [], [], [], iter(chunks)
        for b, items in enumerate(media):
            own = [next(it) for x in items for _ in range(x.num_placeholders)]
            if not own:
                continue
            media_mean = torch.cat([c[:-1] for c in own]).mean(0)  # each chunk ends with the "\n" embedding
            for q, a in answer_turns(input_ids[b], labels[b]):
                cls = self.answer_class(a)
                if cls is not None:
                    pooled.append(media_mean)
                    candidates.append(self.candidate_mask(self.question_key(q), cls))
                    classes.append(cls)
        if pooled:
            tag = self.tag_loss(torch.stack(pooled), torch.stack(candidates), torch.tensor(classes, device=m.device))
            self.last_tag_loss = float(tag.detach())
            out.loss = out.loss + self.tag_weight * tag
        elif self.objective == "media_tags":  # a text-only batch: nothing to learn, but Trainer needs a graph
            out.loss = sum(p.sum() for p in self.head.parameters()) * 0.0
        return out
