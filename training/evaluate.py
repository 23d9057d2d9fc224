"""Held-out accuracy by exact answer match (case and surrounding punctuation ignored), per task; for answers
that name a segment with time tokens ("when"), also the temporal IoU of the predicted segment (paper Table 10:
mean IoU and precision at IoU 0.5)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from nvila_edge import NVILAModel, NVILAProcessor

from .data import Record
from .synthetic_video import answer_segment, segment_iou


def single_questions(records: Sequence[Record]) -> list[Record]:
    """Each (question, answer) pair of each record as its own single-turn record, media placeholder first
    (per-question tasks from ``Record.tasks`` when present)."""
    out = []
    for r in records:
        turns = [t for t in r.conversations if t["from"] != "system"]
        pairs = [(turns[k]["value"], turns[k + 1]["value"]) for k in range(0, len(turns) - 1, 2)]
        placeholder = "<vila/video>" if r.video else ("<image>" * len(r.images))
        for k, (q, a) in enumerate(pairs):
            q = q.replace("<image>", "").replace("<vila/video>", "").strip()
            conv = [{"from": "human", "value": f"{placeholder}\n{q}" if placeholder else q}, {"from": "gpt", "value": a}]
            task = r.tasks[k] if k < len(r.tasks) else r.task
            out.append(dataclasses.replace(r, id=f"{r.id}#{k}", conversations=conv, task=task, tasks=(task,)))
    return out


def normalize_answer(text: str) -> str:
    return text.strip().strip(".!?,;:").strip().lower()


@dataclass
class EvalReport:
    accuracy: float
    correct: int
    total: int
    per_task: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    # over the questions whose reference answer is a time-token segment: {"questions", "mean_iou",
    # "precision_at_0_5"}; empty when there are none
    temporal: dict = field(default_factory=dict)
    per_task_counts: dict[str, list[int]] = field(default_factory=dict)  # task -> [correct, total]

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "per_task": self.per_task,
                "per_task_counts": self.per_task_counts, "temporal": self.temporal, "samples": self.samples[:20]}


@torch.inference_mode()
def evaluate(model: NVILAModel, processor: NVILAProcessor, records: Sequence[Record], max_new_tokens: int = 8,
             progress: bool = True) -> EvalReport:
    """Greedy answers to each record's last question, compared with its reference answer."""
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    ious: list[float] = []
    fmt = model.config.video.time_token_format
    samples = []
    for r in tqdm(records, desc="evaluate", disable=not progress):
        inputs = processor(r.question, images=r.images or None, videos=[r.video] if r.video else None)
        out = model.generate(**inputs, tokenizer=processor.tokenizer, max_new_tokens=max_new_tokens)
        ok = normalize_answer(out.text) == normalize_answer(r.answer)
        hits[r.task or "all"].append(ok)
        sample = {"id": r.id, "task": r.task, "answer": r.answer, "prediction": out.text, "correct": ok}
        if (ref := answer_segment(r.answer, fmt)) is not None:
            ious.append(segment_iou(answer_segment(out.text, fmt), ref))
            sample["iou"] = ious[-1]
        samples.append(sample)
    flat = [x for v in hits.values() for x in v]
    return EvalReport(
        accuracy=sum(flat) / max(len(flat), 1),
        correct=sum(flat),
        total=len(flat),
        per_task={k: sum(v) / len(v) for k, v in sorted(hits.items())},
        samples=samples,
        temporal=temporal_summary(ious),
        per_task_counts={k: [sum(v), len(v)] for k, v in sorted(hits.items())},
    )


def temporal_summary(ious: Sequence[float]) -> dict:
    """Mean IoU and precision@0.5 of predicted time-token segments (empty without any)."""
    if not ious:
        return {}
    return {"questions": len(ious), "mean_iou": sum(ious) / len(ious),
            "precision_at_0_5": sum(i >= 0.5 for i in ious) / len(ious)}
