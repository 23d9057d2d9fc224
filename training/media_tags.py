"""The media-tag objective: each answer's tokens predicted from the mean-pooled media embeddings.

Classification-style vision pretraining (after SuperClass, Huang et al. 2024), conditioned on the question:
for every (question, answer) turn of an example, one linear layer maps the mean of the projector's output
for the example's media to logits over the vocabulary, a second adds a bias from the question's token ids, and a softmax cross-entropy scores the answer's tokens (a normalised multi-hot target:
one id for a one-word answer, the bag of words for a caption). It needs nothing beyond the text already
in the data and no LLM forward, so a stage with ``objective="media_tags"`` trains the vision tower and
projector at about a third of a full step's cost.

Why the demo uses it: with a from-scratch LLM the language-model loss gives the tower almost no signal
early, and what the small LLM learns to read within the demo's budget is what the mean of the visual
tokens carries (with a tower whose pooled features hold left / right, the LLM answers it at 100 %). The
question bias matters: it narrows each turn to its own answers; one bag of all an image's answers left
left / right at 60 % where per-question heads reach 99 % (docs/BENCHMARKS.md). The heads are training-time
modules: checkpoints never hold them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from nvila_edge import NVILAModel

from .recipe import OBJECTIVES


def answer_turns(input_ids, labels, ignore_index: int = -100) -> list[tuple[np.ndarray, np.ndarray]]:
    """(question ids, answer ids) per supervised turn: each run of labelled positions is an answer, the
    unlabelled tokens since the previous answer its question (template tokens included)."""
    ids = np.asarray(input_ids).reshape(-1)
    lab = np.asarray(labels).reshape(-1)
    turns, start, k = [], 0, 0
    while k < len(lab):
        if lab[k] == ignore_index:
            k += 1
            continue
        end = k
        while end < len(lab) and lab[end] != ignore_index:
            end += 1
        turns.append((ids[start:k], lab[k:end]))
        start = k = end
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
        self.head = nn.Linear(cfg.llm.hidden_size, self.vocab_size)
        self.question_bias = nn.Linear(self.vocab_size, self.vocab_size, bias=False)
        mask = torch.ones(self.vocab_size)
        mask[[i for i in ignore_ids if 0 <= i < self.vocab_size]] = 0  # turn markers say nothing about media
        self.register_buffer("tag_mask", mask, persistent=False)
        self.media_ids = {cfg.image_token_id, cfg.video_token_id}
        self.last_tag_loss: float | None = None

    def tag_target(self, answer_ids: np.ndarray) -> torch.Tensor:
        """Normalised multi-hot over the answer's ids (turn markers masked); zeros when nothing is left."""
        out = torch.zeros(self.vocab_size, device=self.tag_mask.device)
        ids = torch.as_tensor(answer_ids[(answer_ids >= 0) & (answer_ids < self.vocab_size)], device=out.device)
        out[ids] = 1.0
        out = out * self.tag_mask
        return out / out.sum() if out.sum() > 0 else out

    def question_embedding(self, question_ids: np.ndarray) -> torch.Tensor:
        """The question as a multi-hot over the vocabulary (media placeholders dropped): the few ids that
        tell one question from another keep full weight, where a mean of embeddings blurs them."""
        out = torch.zeros(self.vocab_size, device=self.tag_mask.device)
        ids = [int(i) for i in question_ids if int(i) not in self.media_ids and 0 <= int(i) < self.vocab_size]
        if ids:
            out[torch.as_tensor(ids, device=out.device)] = 1.0
        return out

    def tag_loss(self, pooled: torch.Tensor, questions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(pooled) + self.question_bias(questions)
        logits = logits.masked_fill(self.tag_mask == 0, float("-inf"))
        logp = torch.log_softmax(logits, -1).masked_fill(self.tag_mask == 0, 0.0)
        return -(targets * logp).sum(-1).mean()

    def forward(self, input_ids, labels, pixel_values=None, media=None, **kwargs):
        m = self.model
        chunks = m.embed_media(pixel_values, [x for items in media for x in items])
        if self.objective == "media_tags":
            out = CausalLMOutputWithPast(loss=torch.zeros((), device=m.device))
        else:
            embeds, mask, labs = m.embed_batch(input_ids, None, media, labels, chunks=chunks)
            out = m.llm(inputs_embeds=embeds, attention_mask=mask, labels=labs)
        if self.objective == "lm":
            return out
        pooled, questions, targets, it = [], [], [], iter(chunks)
        for b, items in enumerate(media):
            own = [next(it) for x in items for _ in range(x.num_placeholders)]
            if not own:
                continue
            media_mean = torch.cat([c[:-1] for c in own]).mean(0)  # each chunk ends with the "\n" embedding
            for q, a in answer_turns(input_ids[b], labels[b]):
                target = self.tag_target(a)
                if target.sum() > 0:
                    pooled.append(media_mean)
                    questions.append(self.question_embedding(q))
                    targets.append(target)
        if pooled:
            tag = self.tag_loss(torch.stack(pooled), torch.stack(questions), torch.stack(targets))
            self.last_tag_loss = float(tag.detach())
            out.loss = out.loss + self.tag_weight * tag
        elif self.objective == "media_tags":  # a text-only batch: nothing to learn, but Trainer needs a graph
            out.loss = sum(p.sum() for p in self.head.parameters()) * 0.0
        return out
