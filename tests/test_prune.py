"""training/prune.py: DeltaLoss scores (paper Eq. 1), per-task top-K selection and JSONL pruning."""

from __future__ import annotations

import math

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nvila_edge import ConfigError, NVILAConfig, NVILAModel, NVILAProcessor
from nvila_edge.training.data import DataError, Record, read_jsonl
from nvila_edge.training.prune import (
    PruneReport,
    answer_logprobs,
    answer_token_stats,
    deltaloss_scores,
    keep_count,
    prune_jsonl,
    select_mask,
    select_top,
    write_kept_jsonl,
)
from nvila_edge.training.synthetic import SyntheticConfig, make_dataset
from nvila_edge.training.tokenizer import demo_tokenizer

try:
    from _training_helpers import train_steps
except ImportError:  # tests imported as a package
    from tests._training_helpers import train_steps

IGNORE = -100


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 20-example synthetic set (every image kind and video task), and two demo-architecture models of different size, the
    large one trained 3x longer, both saved as checkpoints."""
    root = tmp_path_factory.mktemp("prune")
    paths = make_dataset(root / "data", SyntheticConfig(num_images=12, num_videos=10, num_heldout_videos=0, heldout_fraction=0.0, seed=5),
                         progress=False)
    records = read_jsonl(paths["train"], on_error="raise")
    tok = demo_tokenizer()
    large_cfg = NVILAConfig.from_preset("demo")
    small_cfg = large_cfg.replace(name="demo-small", llm={"hidden_size": 128, "intermediate_size": 256,
                                                          "num_hidden_layers": 2, "num_attention_heads": 4})
    models, procs, losses = {}, {}, {}
    for name, cfg, steps in (("large", large_cfg, 10), ("small", small_cfg, 3)):
        torch.manual_seed(0)
        model = NVILAModel(cfg)
        proc = NVILAProcessor(cfg, tok)
        losses[name] = train_steps(model, proc, records, steps=steps, batch_size=4, lr=3e-3)
        model.save_pretrained(root / name, tokenizer=tok)
        models[name], procs[name] = model, proc
    return {"root": root, "data": paths["train"], "records": records, "models": models, "procs": procs,
            "losses": losses, "small_cfg": small_cfg}


@pytest.fixture(scope="module")
def pruned(setup):
    """prune_jsonl from the two checkpoints into another folder (media paths must be rewritten)."""
    out = setup["root"] / "pruned" / "train.pruned.jsonl"
    report = prune_jsonl(setup["data"], setup["root"] / "large", setup["root"] / "small", out, keep=0.5,
                         batch_size=8, progress=False)
    return report, json.loads(report.report_path.read_text())


@pytest.fixture(scope="module")
def scores(pruned):
    """The report's per-example numbers: log p under each model and the DeltaLoss score."""
    ex = pruned[1]["examples"]
    lp = {k: np.array([e[f"logp_{k}"] for e in ex]) for k in ("large", "small")}
    return {"lp": lp, "delta": np.array([e["score"] for e in ex])}


@pytest.mark.slow  # shares the module fixture that trains two small models
def test_models_differ_in_size_and_training(setup):
    large, small = setup["models"]["large"], setup["models"]["small"]
    assert sum(x.numel() for x in large.llm.parameters()) > 2 * sum(x.numel() for x in small.llm.parameters())
    assert setup["losses"]["large"][-1] < setup["losses"]["large"][0]


@pytest.mark.slow  # shares the module fixture that trains two small models
def test_answer_logprobs_shape_and_sum_mean(setup, scores):
    recs = setup["records"]
    for lp in scores["lp"].values():
        assert lp.shape == (len(recs),) and lp.dtype == np.float64
        assert np.isfinite(lp).all() and (lp < 0).all()
    model, proc = setup["models"]["small"], setup["procs"]["small"]
    sums, counts = answer_token_stats(model, proc, recs[:5], batch_size=2, progress=False)
    mean = answer_logprobs(model, proc, recs[:5], batch_size=5, progress=False, reduction="mean")
    # the in-memory model (batches of 2 and 5) scores like its checkpoint did in prune_jsonl (batches of 8):
    # batching, padding and mixed images / videos do not change the result
    np.testing.assert_allclose(sums, scores["lp"]["small"][:5], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(mean * counts, sums, rtol=1e-5, atol=1e-4)
    # answer tokens = each answer's tokens + its <|im_end|> (synthetic image records ask several questions)
    for r, n in zip(recs[:5], counts):
        answers = [t["value"] for t in r.conversations if t["from"] == "gpt"]
        assert n == sum(len(proc.tokenizer.encode(a)) + 1 for a in answers)
    with pytest.raises(ConfigError):
        answer_logprobs(model, proc, recs[:1], reduction="max")


def _independent_logp(model, processor, record: Record) -> float:
    """log p(answer) from the single-prompt forward's HF loss (mean NLL over the shifted answer labels)."""
    inp = processor(record.conversations, images=record.images or None, videos=[record.video] if record.video else None,
                    add_generation_prompt=False, return_labels=True)
    with torch.no_grad():
        out = model(input_ids=inp.input_ids, pixel_values=inp.pixel_values, media=inp.media, labels=inp.labels[0])
    n = int((inp.labels[0][1:] != IGNORE).sum())
    return -float(out.loss) * n


@pytest.mark.slow  # shares the module fixture that trains two small models
def test_deltaloss_is_logp_large_minus_logp_small(setup, scores):
    recs, delta = setup["records"], scores["delta"]
    m, p = setup["models"], setup["procs"]
    some = [0, 1, len(recs) - 1]
    direct = deltaloss_scores(m["large"], m["small"], p["large"], p["small"], [recs[i] for i in some],
                              batch_size=2, progress=False)
    assert direct.shape == (len(some),) and np.isfinite(direct).all()
    np.testing.assert_allclose(direct, delta[some], rtol=1e-5, atol=1e-4)
    for i in (0, len(recs) - 1):  # an image example and a video example
        expected = _independent_logp(m["large"], p["large"], recs[i]) - _independent_logp(m["small"], p["small"], recs[i])
        assert delta[i] == pytest.approx(expected, abs=2e-3, rel=1e-4)
    assert recs[0].images and recs[-1].video is not None
    # the large model, trained longer, finds the training answers easier: positive scores on average
    assert scores["lp"]["large"].mean() > scores["lp"]["small"].mean()
    assert delta.mean() > 0


@pytest.mark.slow  # shares the module fixture that trains two small models
def test_select_top_keeps_half_of_each_task(setup, scores):
    recs, delta = setup["records"], scores["delta"]
    kept = select_top(recs, delta, keep=0.5)
    tasks = sorted({r.task for r in recs})
    assert len(tasks) == 8  # 3 image kinds + 5 video tasks
    expected_total = sum(math.ceil(sum(r.task == t for r in recs) / 2) for t in tasks)
    assert len(kept) == expected_total  # ceil(keep * n) per task
    index = {id(r): i for i, r in enumerate(recs)}
    assert [index[id(r)] for r in kept] == sorted(index[id(r)] for r in kept)  # original order
    for t in tasks:
        group = [i for i, r in enumerate(recs) if r.task == t]
        chosen = [index[id(r)] for r in kept if r.task == t]
        assert len(chosen) == math.ceil(len(group) / 2)
        assert min(delta[chosen]) >= max(delta[[i for i in group if i not in chosen]])
    assert select_top(recs, delta, keep=1.0) == recs


def _rec(i: int, task: str, source: str = "a.jsonl") -> Record:
    return Record(f"r{i}", [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], [], None, source, i + 1, task)


def test_select_top_rules():
    recs = [_rec(i, t) for i, t in enumerate("aaabbbbbc")]
    s = np.array([1.0, 3.0, 2.0, 5.0, 4.0, 4.0, -1.0, np.nan, 0.0])
    # per task: ceil(0.5 * n) → a: 2 of 3, b: 3 of 5, c: 1 of 1; ties go to the earlier record, NaN ranks last
    assert [r.id for r in select_top(recs, s, keep=0.5)] == ["r1", "r2", "r3", "r4", "r5", "r8"]
    assert [keep_count(n, 0.5) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]
    assert keep_count(10, 0.3) == 3 and keep_count(7, 1.0) == 7
    # groups by source file, or all together
    by_src = [_rec(i, "x", source=f"{i % 2}.jsonl") for i in range(6)]
    s2 = np.arange(6, dtype=float)
    assert [r.id for r in select_top(by_src, s2, keep=0.5, by="source")] == ["r2", "r3", "r4", "r5"]
    assert [r.id for r in select_top(by_src, s2, keep=0.5, by="task")] == ["r3", "r4", "r5"]
    assert [r.id for r in select_top(recs, s, keep=0.25, by=None)] == ["r3", "r4", "r5"]
    assert select_mask(recs, s, keep=0.5).sum() == 6
    assert select_mask(recs, s, keep=np.float32(0.5)).sum() == 6
    for bad in (0, 0.0, -0.5, 1.01, float("nan"), "half", True, None):
        with pytest.raises(ConfigError, match="keep"):
            select_top(recs, s, keep=bad)
    with pytest.raises(ConfigError, match="by"):
        select_top(recs, s, by="colour")
    with pytest.raises(ConfigError, match="scores"):
        select_top(recs, s[:-1])


@pytest.mark.slow  # shares the module fixture that trains two small models
def test_prune_jsonl_writes_kept_lines_and_report(setup, pruned, scores):
    root, recs = setup["root"], setup["records"]
    report, rep = pruned
    out = root / "pruned" / "train.pruned.jsonl"
    assert isinstance(report, PruneReport)
    assert report.output == out and report.report_path == out.with_suffix(".report.json")
    per_task = {t: sum(r.task == t for r in recs) for t in {r.task for r in recs}}
    assert (report.total, report.kept) == (len(recs), sum(math.ceil(n / 2) for n in per_task.values()))
    # the output loads (strictly) and points at the same media files
    kept = read_jsonl(out, on_error="raise")
    expected = select_top(recs, scores["delta"], keep=0.5)
    assert [r.id for r in kept] == [r.id for r in expected]
    for a, b in zip(kept, expected):
        assert [p.resolve() for p in a.images] == [p.resolve() for p in b.images]
        assert (a.video and a.video.resolve()) == (b.video and b.video.resolve())
        assert (a.conversations, a.task) == (b.conversations, b.task)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all((r.get("image") or r.get("video")).startswith("../data/") for r in rows)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # atomic writes left no temp files
    # the report: every example with its score
    assert rep["total"] == len(recs) and rep["kept"] == len(kept) and rep["keep"] == 0.5 and rep["by"] == "task"
    assert [e["id"] for e in rep["examples"]] == [r.id for r in recs]
    assert rep["large_checkpoint"] == str(root / "large") and rep["reduction"] == "sum"
    for e in rep["examples"]:
        assert e["score"] == pytest.approx(e["logp_large"] - e["logp_small"])
    assert {e["id"] for e in rep["examples"] if e["kept"]} == {r.id for r in kept}
    assert set(rep["groups"]) == {r.task for r in recs}
    assert all(g["total"] == per_task[t] and g["kept"] == math.ceil(per_task[t] / 2) for t, g in rep["groups"].items())
    assert rep["issues"] == []


@pytest.mark.slow  # shares the module fixture that trains two small models
def test_write_kept_jsonl_same_folder_keeps_lines_verbatim(setup, tmp_path):
    data, recs = setup["data"], setup["records"]
    lines = data.read_text().splitlines()
    same = write_kept_jsonl(recs[::3], data.parent / "subset.jsonl")
    try:
        assert same.read_text().splitlines() == [lines[r.line - 1] for r in recs[::3]]
        assert [r.id for r in read_jsonl(same, on_error="raise")] == [r.id for r in recs[::3]]
    finally:
        same.unlink()
    # from another folder, relative media paths are rewritten; absolute ones stay as they are
    (tmp_path / "abs").mkdir()
    row = json.loads(lines[0])
    row["image"] = str((data.parent / row["image"]).resolve())
    (tmp_path / "abs" / "in.jsonl").write_text(json.dumps(row) + "\n")
    moved = write_kept_jsonl(read_jsonl(tmp_path / "abs" / "in.jsonl"), tmp_path / "deep" / "er" / "out.jsonl")
    assert json.loads(moved.read_text())["image"] == row["image"]
    assert read_jsonl(moved, on_error="raise")[0].images[0] == Path(row["image"])
    # raw U+2028 inside a JSON string is not a line break (line numbers stay those of read_jsonl)
    odd = dict(json.loads(lines[1]), id="odd")
    odd["conversations"][-1]["value"] = "two\u2028lines"
    src = data.parent / "odd.jsonl"
    src.write_text(json.dumps(odd, ensure_ascii=False) + "\n" + lines[2] + "\n", encoding="utf-8")
    try:
        got = read_jsonl(write_kept_jsonl(read_jsonl(src), tmp_path / "odd" / "out.jsonl"), on_error="raise")
        assert [r.id for r in got] == ["odd", json.loads(lines[2])["id"]]
        assert got[0].answer == "two\u2028lines"
    finally:
        src.unlink()


def test_prune_jsonl_validates_before_loading(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a"}]}) + "\n")
    with pytest.raises(ConfigError, match="keep"):
        prune_jsonl(data, tmp_path / "nope", tmp_path / "nope", tmp_path / "o.jsonl", keep=0)
    with pytest.raises(ConfigError, match="by"):
        prune_jsonl(data, tmp_path / "nope", tmp_path / "nope", tmp_path / "o.jsonl", by="colour")
    with pytest.raises(ConfigError, match="reduction"):
        prune_jsonl(data, tmp_path / "nope", tmp_path / "nope", tmp_path / "o.jsonl", reduction="max")
    with pytest.raises(DataError, match="not found"):
        prune_jsonl(tmp_path / "absent.jsonl", tmp_path / "nope", tmp_path / "nope", tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()
