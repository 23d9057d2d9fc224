"""Do two backends of one bundle give the same answers? (the ``cuda`` target on the torch backend vs the
``cpu`` target on ONNX Runtime, say). Greedy answers to the same questions about the same media, compared
token for token; used by ``samples/check_cuda_target.py`` on the demo's held-out questions."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable


@dataclass
class Agreement:
    total: int = 0
    identical: int = 0
    mismatches: list[dict] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.identical / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"total": self.total, "identical": self.identical, "fraction": round(self.fraction, 4),
                "mismatches": self.mismatches[:20]}


def heldout_questions(jsonl: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Single-turn questions of a training-format JSONL (image / images / video records): each human turn with
    its media, placeholders removed (the runtime puts media first, as the reference does)."""
    path = Path(jsonl)
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        media = {}
        if rec.get("video"):
            media["video"] = str(path.parent / rec["video"])
        elif rec.get("image") or rec.get("images"):
            imgs = rec.get("images") or [rec["image"]]
            media["images"] = [str(path.parent / i) for i in imgs]
        for turn in rec.get("conversations", []):
            if turn.get("from") == "human":
                q = turn["value"].replace("<image>", "").replace("<video>", "").replace("<vila/video>", "").strip()
                out.append({"question": q, **media})
                if limit and len(out) >= limit:
                    return out
    return out


def agreement(a, b, items: Iterable[dict], max_new_tokens: int = 16) -> Agreement:
    """Greedy answers of runtimes ``a`` and ``b`` to ``items`` ({"question", "images" | "video"})."""
    res = Agreement()
    for it in items:
        kw = {k: it[k] for k in ("images", "video") if k in it}
        ra = a.generate(it["question"], max_new_tokens=max_new_tokens, temperature=0, **kw)
        rb = b.generate(it["question"], max_new_tokens=max_new_tokens, temperature=0, **kw)
        res.total += 1
        if ra.token_ids == rb.token_ids:
            res.identical += 1
        else:
            res.mismatches.append({"question": it["question"], "a": ra.text, "b": rb.text})
    return res


def compare_targets(bundle, items: Iterable[dict], *, device: str = "cpu", max_new_tokens: int = 16,
                    threads: int | None = None) -> Agreement:
    """The bundle's ``cuda`` target (torch backend on ``device``) vs its ``cpu`` target (ONNX Runtime)."""
    from .runtime import Runtime

    ort = Runtime.load(bundle, backend="onnxruntime", threads=threads)
    tq = Runtime.load(bundle, backend="torch", device=device, threads=threads)
    if tq.backend.describe().get("target") != "cuda":
        raise ValueError(f"bundle {bundle} has no cuda target (export it with --target cuda)")
    return agreement(ort, tq, items, max_new_tokens)
