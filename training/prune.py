"""DeltaLoss data pruning (NVILA paper, Eq. 1).

Every training example ``x`` gets the score

    score(x) = log p_large(x) - log p_small(x)

where ``log p(x)`` is the log-probability a model gives to the supervised answer tokens of ``x`` (the
assistant turns and their ``<|im_end|>``, i.e. the positions with label != -100), summed over those tokens
by default. Sign convention: a **high** score means the large model finds the example much easier than the
small one (the example carries what the bigger model learnt and the small one did not: informative). A score
near 0 means both models agree — both find it easy (redundant) or both find it hard (often noisy) — and a
negative score means the small model prefers it over the large one. Pruning keeps the **top-K fraction by
score within each sub-dataset** (``Record.task`` by default, or the source file), so every task keeps its
share; the paper keeps 50 % with no accuracy loss.

Summed log-probabilities compare whole answers and are independent of how each tokenizer splits the text,
so the large and small models may use different tokenizers; ``reduction="mean"`` (per answer token) is
available too.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from nvila_edge.errors import ConfigError, NVILAEdgeError

from .data import DataError, DataIssue, NVILACollator, NVILADataset, Record, read_jsonl

IGNORE_INDEX = -100
GROUP_BY = ("task", "source")
REDUCTIONS = ("sum", "mean")


# ---- scoring -------------------------------------------------------------------------------------------
@torch.inference_mode()
def answer_token_stats(model, processor, records: Sequence[Record], batch_size: int = 8,
                       progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per record: (summed log-probability of its answer tokens, number of answer tokens).

    Records are processed with ``NVILADataset`` + ``NVILACollator`` and the model's batched forward (one
    vision pass per batch, right-padded sequences). Logits are computed only at the positions that predict
    an answer token (causal shift: position ``t`` predicts label ``t + 1``), so memory stays small even for
    a 150k vocabulary."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    dataset = NVILADataset(records, processor)
    collate = NVILACollator()
    was_training = model.training
    model.eval()
    sums = np.zeros(len(dataset), dtype=np.float64)
    counts = np.zeros(len(dataset), dtype=np.int64)
    bar = tqdm(total=len(dataset), desc="answer log-probs", disable=not progress)
    try:
        for start in range(0, len(dataset), batch_size):
            idx = range(start, min(start + batch_size, len(dataset)))
            examples = []
            for i in idx:
                try:
                    examples.append(dataset[i])
                except DataError:
                    raise
                except NVILAEdgeError as e:  # e.g. a context overflow: say which line
                    r = records[i]
                    raise DataError(f"{r.source}:{r.line}: {e}") from e
            batch = collate(examples)
            embeds, mask, labels = model.embed_batch(batch["input_ids"], batch["pixel_values"], batch["media"],
                                                     batch["labels"], ignore_index=IGNORE_INDEX)
            targets = labels[:, 1:]  # what positions 0..L-2 predict
            supervised = targets != IGNORE_INDEX
            positions = torch.nonzero(supervised.any(dim=0)).flatten()  # union over the batch
            if positions.numel() == 0:
                bar.update(len(idx))
                continue
            out = model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=positions)
            logits = out.logits
            if logits.shape[1] != positions.numel():  # a model that ignores logits_to_keep: full logits
                logits = logits[:, positions]
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B, K, V)
            tgt = targets[:, positions]
            sel = supervised[:, positions]
            tok_lp = logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            tok_lp = torch.where(sel, tok_lp, torch.zeros_like(tok_lp))
            sums[start:start + len(idx)] = tok_lp.sum(dim=1).double().cpu().numpy()
            counts[start:start + len(idx)] = sel.sum(dim=1).cpu().numpy()
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return sums, counts


def answer_logprobs(model, processor, records: Sequence[Record], batch_size: int = 8, progress: bool = True,
                    reduction: str = "sum") -> np.ndarray:
    """Per record, the log-probability of its supervised answer tokens under ``model``: summed over the
    tokens (``reduction="sum"``, log p(x) of paper Eq. 1) or averaged per token (``"mean"``). float64,
    shape ``(len(records),)``; a record with no supervised token would get NaN."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    sums, counts = answer_token_stats(model, processor, records, batch_size=batch_size, progress=progress)
    out = sums.copy()
    out[counts == 0] = np.nan
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            out = out / counts
    return out


def deltaloss_scores(large, small, processor_large, processor_small, records: Sequence[Record],
                     batch_size: int = 8, progress: bool = True, reduction: str = "sum") -> np.ndarray:
    """DeltaLoss (paper Eq. 1): ``log p_large(x) - log p_small(x)`` per record, over the answer tokens.

    High score = the large model finds the example much easier than the small one: those are kept by
    ``select_top``. Shape ``(len(records),)``."""
    lp_large = answer_logprobs(large, processor_large, records, batch_size, progress, reduction)
    lp_small = answer_logprobs(small, processor_small, records, batch_size, progress, reduction)
    return lp_large - lp_small


# ---- selection -----------------------------------------------------------------------------------------
def _check_keep(keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0 < keep <= 1:
        raise ConfigError(f"keep must be a fraction in (0, 1], got {keep!r}")


def _check_by(by: str | None) -> None:
    if by is not None and by not in GROUP_BY:
        raise ConfigError(f"by must be one of {GROUP_BY} or None, got {by!r}")


def group_key(record: Record, by: str | None) -> str:
    _check_by(by)
    if by is None:
        return ""
    if by == "task":
        return record.task
    if by == "source":
        return record.source


def keep_count(n: int, keep: float) -> int:
    """How many of ``n`` examples a group keeps: ``ceil(keep * n)`` (never rounds a fraction away)."""
    return min(n, math.ceil(keep * n - 1e-9))


def select_mask(records: Sequence[Record], scores, keep: float = 0.5, by: str | None = "task") -> np.ndarray:
    """Boolean mask of the kept records: per group, the ``keep_count`` highest scores (ties → earlier
    record; NaN scores rank last)."""
    _check_keep(keep)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(records):
        raise ConfigError(f"{len(scores)} scores for {len(records)} records")
    groups: dict[str, list[int]] = OrderedDict()
    for i, r in enumerate(records):
        groups.setdefault(group_key(r, by), []).append(i)
    mask = np.zeros(len(records), dtype=bool)
    for idx in groups.values():
        s = scores[idx]
        ranked = sorted(range(len(idx)), key=lambda j: (np.isnan(s[j]), -s[j] if not np.isnan(s[j]) else 0.0, j))
        for j in ranked[:keep_count(len(idx), keep)]:
            mask[idx[j]] = True
    return mask


def select_top(records: Sequence[Record], scores, keep: float = 0.5, by: str | None = "task") -> list[Record]:
    """Keep the top ``keep`` fraction by score in each sub-dataset (``by="task"``: ``Record.task``;
    ``"source"``: the JSONL file; ``None``: all together), in the original order."""
    mask = select_mask(records, scores, keep, by)
    return [r for r, k in zip(records, mask) if k]


# ---- files ---------------------------------------------------------------------------------------------
@dataclass
class PruneReport:
    output: Path
    report_path: Path
    keep: float
    by: str | None
    total: int
    kept: int
    groups: dict[str, dict] = field(default_factory=dict)  # group → {"total", "kept", "mean_score", "min_kept_score"}
    examples: list[dict] = field(default_factory=list)  # {"id", "source", "line", "task", "score", "logp_large", ...}
    issues: list[str] = field(default_factory=list)  # skipped input lines

    def to_dict(self) -> dict:
        return {"output": str(self.output), "keep": self.keep, "by": self.by, "total": self.total,
                "kept": self.kept, "groups": self.groups, "issues": self.issues, "examples": self.examples}


def _float(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _media_fields(obj: dict, src_dir: Path, dst_dir: Path) -> dict:
    """Rewrite relative media paths of a JSONL record from ``src_dir`` to ``dst_dir``."""

    def move(p: str) -> str:
        if os.path.isabs(p):
            return p
        return Path(os.path.relpath(os.path.abspath(src_dir / p), os.path.abspath(dst_dir))).as_posix()

    obj = dict(obj)
    for key in ("image", "video"):
        if isinstance(obj.get(key), str):
            obj[key] = move(obj[key])
    if isinstance(obj.get("images"), list):
        obj["images"] = [move(p) if isinstance(p, str) else p for p in obj["images"]]
    elif isinstance(obj.get("images"), str):
        obj["images"] = move(obj["images"])
    return obj


def _source_lines(records: Sequence[Record]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in records:
        if r.source not in out:
            # the same line splitting as read_jsonl's file iteration (str.splitlines would also split on
            # U+2028 and friends, which may appear raw inside JSON strings)
            with open(r.source, encoding="utf-8", errors="replace") as f:
                out[r.source] = f.read().split("\n")
    return out


def write_kept_jsonl(records: Sequence[Record], output_jsonl: str | Path) -> Path:
    """Write the original JSON lines of ``records`` to ``output_jsonl`` atomically, media paths made
    relative to the output's folder when it differs from the source's."""
    from nvila_edge.io import atomic_write_text

    output_jsonl = Path(output_jsonl)
    dst_dir = output_jsonl.parent.resolve()
    lines = _source_lines(records)
    out = []
    for r in records:
        text = lines[r.source][r.line - 1].strip()
        src_dir = Path(r.source).parent.resolve()
        if src_dir != dst_dir:
            text = json.dumps(_media_fields(json.loads(text), src_dir, dst_dir), ensure_ascii=False)
        out.append(text + "\n")
    atomic_write_text(output_jsonl, "".join(out))
    return output_jsonl


def prune_jsonl(data: str | Path | Sequence[str | Path], large_checkpoint: str | Path, small_checkpoint: str | Path,
                output_jsonl: str | Path, keep: float = 0.5, by: str | None = "task",
                report_path: str | Path | None = None, batch_size: int = 8, on_error: str = "skip",
                reduction: str = "sum", device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                progress: bool = True) -> PruneReport:
    """Score ``data`` (JSONL file(s)) with DeltaLoss between two checkpoints, keep the top ``keep`` per
    group and write the kept lines to ``output_jsonl``; a JSON report (every example's id, task, score and
    whether it was kept, plus per-group counts) goes to ``report_path`` (default: the output path with
    ``.report.json`` in place of its suffix). Both files are written atomically. The two models are
    loaded one after the other (``dtype`` / ``device`` as in ``NVILAModel.from_pretrained``), each with the
    tokenizer and preprocessing of its own checkpoint."""
    from nvila_edge import NVILAModel, NVILAProcessor
    from nvila_edge.io import atomic_write_text

    _check_keep(keep)  # before any heavy work
    _check_by(by)
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    output_jsonl = Path(output_jsonl)
    report_path = Path(report_path) if report_path is not None else output_jsonl.with_suffix(".report.json")
    issues: list[DataIssue] = []
    records = read_jsonl(data, on_error=on_error, issues=issues)

    def score(ckpt) -> np.ndarray:
        model = NVILAModel.from_pretrained(ckpt, dtype=dtype, device=device)
        processor = NVILAProcessor.from_pretrained(ckpt)
        try:
            return answer_logprobs(model, processor, records, batch_size, progress, reduction)
        finally:
            del model

    lp_large = score(large_checkpoint)
    lp_small = score(small_checkpoint)
    scores = lp_large - lp_small
    mask = select_mask(records, scores, keep, by)
    kept = [r for r, k in zip(records, mask) if k]
    write_kept_jsonl(kept, output_jsonl)

    groups: dict[str, dict] = OrderedDict()
    for r, s, k in zip(records, scores, mask):
        g = groups.setdefault(group_key(r, by), {"total": 0, "kept": 0, "_scores": [], "_kept": []})
        g["total"] += 1
        g["kept"] += int(k)
        g["_scores"].append(s)
        if k:
            g["_kept"].append(s)
    for g in groups.values():
        s, ks = np.asarray(g.pop("_scores")), np.asarray(g.pop("_kept"))
        g["mean_score"] = _float(float(np.nanmean(s))) if np.isfinite(s).any() else None
        g["min_kept_score"] = _float(float(np.nanmin(ks))) if ks.size and np.isfinite(ks).any() else None
    examples = [
        {"id": r.id, "source": r.source, "line": r.line, "task": r.task, "score": _float(s),
         "logp_large": _float(a), "logp_small": _float(b), "kept": bool(k)}
        for r, s, a, b, k in zip(records, scores, lp_large, lp_small, mask)
    ]
    report = PruneReport(output=output_jsonl, report_path=report_path, keep=float(keep), by=by, total=len(records),
                         kept=int(mask.sum()), groups=dict(groups), examples=examples, issues=[str(i) for i in issues])
    atomic_write_text(report_path, json.dumps({"large_checkpoint": str(large_checkpoint),
                                               "small_checkpoint": str(small_checkpoint),
                                               "reduction": reduction, **report.to_dict()}, indent=2))
    return report
