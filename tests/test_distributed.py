"""run_recipe under ``torchrun --nproc_per_node 2`` on CPU (gloo): DDP training, rank-0 checkpoints, resume."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    '''
    """Two-stage demo recipe on a tiny synthetic set; each rank records a hash of its weights per stage."""
    import hashlib, json, os, sys
    from pathlib import Path

    import torch

    from nvila_edge.training import trainer
    from nvila_edge.training.recipe import DataSource, Recipe, Stage
    from nvila_edge.training.tokenizer import demo_tokenizer

    data, out, hashes = map(Path, sys.argv[1:4])
    rank = int(os.environ["RANK"])


    def weights_hash(model):
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().contiguous().numpy().tobytes())
        return h.hexdigest()


    real = trainer.train_stage


    def recording(model, processor, stage, records, out_dir, **kw):
        metrics = real(model, processor, stage, records, out_dir, **kw)
        (hashes / f"{stage.name}.rank{rank}").write_text(weights_hash(model))
        return metrics


    trainer.train_stage = recording
    recipe = Recipe(name="ddp", preset="demo", base_dir=str(data), seed=1, stages=(
        Stage("projector", ("mm_projector",), 1e-3, (DataSource("train.jsonl"),), max_steps=3, batch_size=2),
        Stage("llm", ("mm_projector", "llm"), 1e-3, (DataSource("train.jsonl"),), max_steps=2, batch_size=2),
    ))
    results = trainer.run_recipe(recipe, out, tokenizer=demo_tokenizer(), progress=False)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    # one file per rank: two ranks printing to one pipe can interleave their lines
    (hashes / f"result.rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "stages": [[r.name, r.metrics["train_loss"], r.skipped] for r in results]}))
    '''
)

NUM_RECORDS = 10


def _weights_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_torchrun_two_ranks_trains_and_saves_once(tmp_path):
    import torch

    from nvila_edge import NVILAModel, NVILAProcessor
    from nvila_edge.training.synthetic import SyntheticConfig, make_dataset
    from nvila_edge.training.trainer import COMPLETE

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    data = tmp_path / "data"
    paths = make_dataset(data, SyntheticConfig(num_images=6, num_videos=4, num_heldout_videos=0, heldout_fraction=0.0, seed=2), progress=False)
    assert len(paths["train"].read_text().splitlines()) == NUM_RECORDS
    script = tmp_path / "run_ddp.py"
    script.write_text(SCRIPT)
    out, hashes = tmp_path / "runs", tmp_path / "hashes"
    hashes.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(data), str(out), str(hashes)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0, log

    # both ranks ran both stages in a 2-process group and agree on the (all-reduced) losses
    results = [json.loads(p.read_text()) for p in sorted(hashes.glob("result.rank*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1], log
    assert all(r["world"] == 2 for r in results)
    assert results[0]["stages"] == results[1]["stages"]
    assert [s[0] for s in results[0]["stages"]] == ["projector", "llm"]
    assert all(math.isfinite(s[1]) and not s[2] for s in results[0]["stages"])

    # each stage checkpoint exists exactly once, complete, with nothing else left behind
    assert sorted(p.name for p in out.iterdir()) == ["stage1-projector", "stage2-llm"]
    assert sorted(p.parent.name for p in out.rglob(COMPLETE)) == ["stage1-projector", "stage2-llm"]
    steps = {"stage1-projector": 3, "stage2-llm": 2}
    models = {}
    for name, max_steps in steps.items():
        ckpt = out / name
        metrics = json.loads((ckpt / COMPLETE).read_text())
        assert metrics["examples"] == NUM_RECORDS
        assert metrics["loss_history"] and all(math.isfinite(x) for x in metrics["loss_history"])
        # the data is sharded over the 2 ranks: a step sees 2 x 2 examples, an epoch is ceil(10 / 4) = 3 steps
        assert metrics["epoch"] == pytest.approx(max_steps / 3)
        assert {"recipe.json", "data_issues.json", "config.json"} <= {p.name for p in ckpt.iterdir()}
        model = NVILAModel.from_pretrained(ckpt)
        assert model.tokenizer is not None and model.config.name == "demo"
        NVILAProcessor.from_pretrained(ckpt)
        models[name] = model
        # rank 0 saved what every rank holds: the replicas stayed in sync
        stage = name.split("-", 1)[1]
        rank_hashes = {(hashes / f"{stage}.rank{r}").read_text() for r in (0, 1)}
        assert rank_hashes == {_weights_hash(model)}, name

    # stage 2 trained the LLM and projector only; the vision tower never changed
    a, b = (models[n].state_dict() for n in steps)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("vision_tower."))
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("llm."))
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("mm_projector."))

    # re-running resumes: both stages are found complete and skipped (single process, no training)
    from nvila_edge.training.recipe import Recipe
    from nvila_edge.training.trainer import run_recipe

    recipe = Recipe.from_dict(json.loads((out / "stage2-llm" / "recipe.json").read_text()))
    again = run_recipe(recipe, out, progress=False)
    assert [(r.name, r.skipped) for r in again] == [("projector", True), ("llm", True)]
    assert again[1].metrics == json.loads((out / "stage2-llm" / COMPLETE).read_text())
