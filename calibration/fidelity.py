"""How close the quantized model stays to the float one on held-out prompts.

Recorded before quantization (``reference``), compared after (``compare``) on the same model object, so
no second copy of the weights is needed:
- vision: cosine similarity of SigLIP features (per token) and of projected media embeddings;
- LLM: the float model's greedy continuation is replayed teacher-forced through the quantized model —
  KL(fp ‖ quant) of the next-token distributions and how often both pick the same greedy token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nvila_edge import NVILAModel, ProcessedInputs

TARGETS = {"vision_cosine_mean": 0.99, "greedy_agreement": 0.95, "accuracy_drop_points": 2.0}


@dataclass
class _Ref:
    features: torch.Tensor | None  # (tiles, tokens, C) SigLIP features
    embeds: torch.Tensor | None  # projected media embeddings, concatenated
    tokens: torch.Tensor  # the float model's greedy continuation (replayed teacher-forced)
    logp: torch.Tensor  # (steps, V) fp log-probs at the continuation positions


@dataclass
class FidelityReport:
    vision_cosine_mean: float | None
    vision_cosine_min: float | None
    embed_cosine_mean: float | None
    logits_kl_mean: float
    greedy_agreement: float
    num_prompts: int
    num_tokens: int
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    targets: dict = field(default_factory=lambda: dict(TARGETS))

    @property
    def accuracy_drop_points(self) -> float | None:
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return 100.0 * (self.accuracy_before - self.accuracy_after)

    @property
    def passed(self) -> dict[str, bool | None]:
        drop = self.accuracy_drop_points
        return {
            "vision_cosine_mean": None if self.vision_cosine_mean is None else self.vision_cosine_mean >= TARGETS["vision_cosine_mean"],
            "greedy_agreement": self.greedy_agreement >= TARGETS["greedy_agreement"],
            "accuracy_drop_points": None if drop is None else drop <= TARGETS["accuracy_drop_points"],
        }

    def to_dict(self) -> dict:
        return {"vision_cosine_mean": self.vision_cosine_mean, "vision_cosine_min": self.vision_cosine_min,
                "embed_cosine_mean": self.embed_cosine_mean, "logits_kl_mean": self.logits_kl_mean,
                "greedy_agreement": self.greedy_agreement, "num_prompts": self.num_prompts,
                "num_tokens": self.num_tokens, "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "accuracy_drop_points": self.accuracy_drop_points,
                "targets": self.targets, "passed": self.passed}

    def table(self) -> str:
        def f(v, fmt="{:.4f}"):
            return "—" if v is None else fmt.format(v)

        ok = {True: "ok", False: "BELOW TARGET", None: ""}
        p = self.passed
        rows = [
            ("vision feature cosine (mean)", f(self.vision_cosine_mean), "≥ 0.99", ok[p["vision_cosine_mean"]]),
            ("vision feature cosine (min)", f(self.vision_cosine_min), "", ""),
            ("media embedding cosine (mean)", f(self.embed_cosine_mean), "", ""),
            ("LLM logits KL (fp ‖ quant)", f(self.logits_kl_mean), "", ""),
            ("greedy-token agreement", f(self.greedy_agreement, "{:.1%}"), "≥ 95 %", ok[p["greedy_agreement"]]),
        ]
        if self.accuracy_before is not None:
            rows.append(("held-out accuracy fp → quant", f"{self.accuracy_before:.1%} → {self.accuracy_after:.1%}",
                         "≤ 2 pt drop", ok[p["accuracy_drop_points"]]))
        w = max(len(r[0]) for r in rows)
        lines = [f"{'metric':<{w}}  {'value':>16}  {'target':>11}  ", "-" * (w + 34)]
        lines += [f"{a:<{w}}  {b:>16}  {c:>11}  {d}" for a, b, c, d in rows]
        lines.append(f"({self.num_prompts} held-out prompts, {self.num_tokens} scored tokens)")
        return "\n".join(lines)


@torch.inference_mode()
def _vision(model: NVILAModel, inputs: ProcessedInputs):
    if not inputs.media:
        return None, None, []
    feats = model.encode_tiles(torch.as_tensor(inputs.pixel_values))
    chunks = model.embed_features(feats, inputs.media)  # one vision pass serves both comparisons
    return feats.float(), torch.cat(chunks).float(), chunks


@torch.inference_mode()
def reference(model: NVILAModel, prompts: Sequence[ProcessedInputs], max_new_tokens: int = 16,
              progress: bool = True) -> list[_Ref]:
    """Float outputs to compare against later: features, embeddings, greedy continuation, log-probs."""
    refs = []
    for inputs in tqdm(prompts, desc="fidelity: float reference", disable=not progress):
        feats, embeds, chunks = _vision(model, inputs)
        x = model.embed_inputs(inputs.input_ids, chunks)
        ids = []
        cache = model.new_cache()
        steps = [model.prefill(x, cache).float().cpu()]
        for _ in range(max_new_tokens - 1):
            ids.append(int(steps[-1].argmax()))
            steps.append(model.decode_step(ids[-1], cache).float().cpu())
        ids.append(int(steps[-1].argmax()))
        refs.append(_Ref(feats, embeds, torch.tensor(ids), torch.log_softmax(torch.stack(steps), -1)))
    return refs


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)


@torch.inference_mode()
def compare(model: NVILAModel, prompts: Sequence[ProcessedInputs], refs: Sequence[_Ref],
            progress: bool = True) -> FidelityReport:
    """Quantized vs recorded float outputs on the same prompts (teacher-forced on the float continuation)."""
    vis, emb, kls, agree = [], [], [], []
    for inputs, ref in tqdm(list(zip(prompts, refs)), desc="fidelity: quantized", disable=not progress):
        feats, embeds, chunks = _vision(model, inputs)
        if feats is not None:
            vis.append(_cos(feats, ref.features))
            emb.append(_cos(embeds, ref.embeds))
        x = model.embed_inputs(inputs.input_ids, chunks)
        cont = model.llm.get_input_embeddings()(ref.tokens[:-1].to(model.device))[None].to(x.dtype)
        logits = model.llm(inputs_embeds=torch.cat([x, cont], 1)).logits[0, x.shape[1] - 1:].float()
        logq = torch.log_softmax(logits, -1)
        kls.append((ref.logp.exp() * (ref.logp - logq)).sum(-1))
        agree.append((logq.argmax(-1) == ref.logp.argmax(-1)).float())
    vis_all = torch.cat(vis) if vis else None
    return FidelityReport(
        vision_cosine_mean=None if vis_all is None else float(vis_all.mean()),
        vision_cosine_min=None if vis_all is None else float(vis_all.min()),
        embed_cosine_mean=float(torch.cat(emb).mean()) if emb else None,
        logits_kl_mean=float(torch.cat(kls).mean()),
        greedy_agreement=float(torch.cat(agree).mean()),
        num_prompts=len(prompts),
        num_tokens=int(sum(a.numel() for a in agree)),
    )
