"""run_recipe with ``fsdp="full_shard"`` under ``torchrun`` on CPU (gloo, FSDP2 ``fully_shard``): 2 ranks equal
one process, SIGKILL + --resume (same and another world size) equals an uninterrupted run, the stage chain
feeds ``calibrate``, the per-rank memory estimate against the measured peak, and the bad-input errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from nvila_edge.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent(
    '''
    """A two-stage recipe (projector only, then everything) on a tiny synthetic set under FSDP; rank 1 SIGKILLs
    itself right after the mid-stage save at step KILL_AT of stage 2 (0: never)."""
    import json, os, signal, sys
    from pathlib import Path

    from nvila_edge.training import fsdp, trainer
    from nvila_edge.training.recipe import MODULES, DataSource, Recipe, Stage
    from nvila_edge.training.tokenizer import demo_tokenizer

    data, out, report = map(Path, sys.argv[1:4])
    save_steps, resume, kill_at, lr = int(sys.argv[4]), sys.argv[5] == "1", int(sys.argv[6]), float(sys.argv[7])
    rank = int(os.environ["RANK"])
    real = fsdp.save_shards


    def saving(out_dir, step, *a, **k):
        path = real(out_dir, step, *a, **k)
        if step == kill_at and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return path


    fsdp.save_shards = saving
    recipe = Recipe(name="fsdp", preset="demo", base_dir=str(data), seed=1, fsdp="full_shard", stages=(
        Stage("projector", ("mm_projector",), 1e-3, (DataSource("train.jsonl"),), max_steps=2, batch_size=4, warmup_ratio=0.0),
        Stage("full", MODULES, lr, (DataSource("train.jsonl"),), max_steps=4, batch_size=4, warmup_ratio=0.0),
    ))
    results = trainer.run_recipe(recipe, out, tokenizer=demo_tokenizer(), progress=False, resume=resume,
                                 save_steps=save_steps)
    if rank == 0:
        report.write_text(json.dumps({r.name: r.metrics for r in results}))
    '''
)

MEASURE = textwrap.dedent(
    '''
    import json, os, sys
    from nvila_edge.training.memory_measure import measure_sharded_peak

    out = {}
    for preset in ("tiny", "demo"):
        est, peak = measure_sharded_peak(preset, fsdp="full_shard")
        out[preset] = [est.total_bytes, peak.peak_bytes]
    with open(f"{sys.argv[1]}.rank{os.environ['RANK']}", "w") as f:
        json.dump(out, f)
    '''
)

STAGES = ("stage1-projector", "stage2-full")


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    return env


def _torchrun(nproc: int, script, *args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _log(proc) -> str:
    return f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"


def _weights(path):
    from nvila_edge import NVILAModel

    return NVILAModel.from_pretrained(path).state_dict()


def _max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same recipe uninterrupted on 2 ranks and on 1 (the reference)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from nvila_edge.training.synthetic import SyntheticConfig, make_dataset

    root = tmp_path_factory.mktemp("fsdp")
    make_dataset(root / "data", SyntheticConfig(num_images=8, num_videos=0, num_heldout_videos=0, heldout_fraction=0.0,
                                                seed=2), progress=False)
    (root / "driver.py").write_text(DRIVER)
    out = {}
    for n in (2, 1):
        proc = _torchrun(n, root / "driver.py", root / "data", root / f"out{n}", root / f"report{n}.json", 0, 0, 0, 1e-3,
                         cwd=root)
        assert proc.returncode == 0, _log(proc)
        out[n] = json.loads((root / f"report{n}.json").read_text())
    return root, out


def test_two_ranks_equal_one_process(runs):
    root, reports = runs
    two, one = reports[2], reports[1]
    for stage in ("projector", "full"):
        assert two[stage]["world_size"] == 2 and one[stage]["world_size"] == 1
        # the global batch of 4 split 2 + 2, token-weighted: the same loss as one process on all 4
        assert two[stage]["loss_history"] == pytest.approx(one[stage]["loss_history"], rel=1e-5)
    assert two["full"]["loss_history"][-1] < two["full"]["loss_history"][0]
    start = _initial_weights()
    for name in STAGES:
        a, b = _weights(root / "out2" / name), _weights(root / "out1" / name)
        # the float reduction order differs, and AdamW's first steps are ~lr·sign(gradient): an element
        # whose gradient is ~0 (SigLIP's k_proj biases, which the softmax ignores) moves a whole step either
        # way. So the gathered weights are compared as updates: |2-rank − 1-rank| against |1-rank − start|
        diff = _norm({k: a[k] - b[k] for k in a})
        assert diff < RTOL_UPDATE * _norm({k: b[k] - start[k] for k in b}), name
        start = b


RTOL_UPDATE = 0.01


def _norm(tensors) -> float:
    return sum(float(t.double().pow(2).sum()) for t in tensors.values()) ** 0.5


def _initial_weights():
    """The recipe's starting model, as the driver builds it (preset demo, seed 1)."""
    from nvila_edge.training.recipe import DataSource, Recipe, Stage
    from nvila_edge.training.tokenizer import demo_tokenizer
    from nvila_edge.training.trainer import base_model

    recipe = Recipe(name="fsdp", preset="demo", seed=1, stages=(Stage("s", ("llm",), 1e-3, (DataSource("x"),)),))
    return base_model(recipe, demo_tokenizer())[0].state_dict()


def test_outputs_are_plain_vila_checkpoints(runs):
    root, _ = runs
    # no shards or scratch left behind
    assert sorted(p.name for p in (root / "out2").iterdir()) == list(STAGES)
    assert (root / "out2" / STAGES[1] / "llm" / "model.safetensors").is_file()


def test_stage_chain_feeds_calibrate(runs):
    from nvila_edge.calibration import calibrate, is_calibrated

    root, _ = runs
    proj, full = (_weights(root / "out2" / n) for n in STAGES)
    # stage 1 trained the projector only: stage 2 started from it (the LLM / tower were trained only there)
    res = calibrate(root / "out2" / STAGES[1], root / "calibrated", vision="fp16", llm="w4a16-rtn", data=root / "data" / "train.jsonl",
                    num_samples=2, num_heldout=1, progress=False)
    assert is_calibrated(root / "calibrated") and res.path is not None
    assert res.stats["quantizers"]["llm"]["weight_quantized"] > 0
    assert any(not torch.equal(proj[k], full[k]) for k in proj if k.startswith("llm."))


def test_sigkill_then_resume_equals_the_uninterrupted_run(runs):
    root, reports = runs
    killed = _torchrun(2, root / "driver.py", root / "data", root / "killed", root / "k.json", 2, 0, 2, 1e-3, cwd=root)
    assert killed.returncode != 0 and not (root / "killed" / STAGES[1]).exists(), _log(killed)
    shards = root / "killed" / ".stage2-full.shards"
    assert sorted(p.name for p in shards.iterdir()) == ["step-00000002"]
    # a later folder that is half written (no progress.json) and a leftover temporary are never resumed from
    (shards / "step-00000003").mkdir()
    (shards / ".step-00000004.tmp").mkdir()
    (shards / ".step-00000004.tmp" / "__0_0.distcp").write_text("partial")
    shutil.copytree(root / "killed", root / "killed1")

    want = _weights(root / "out2" / STAGES[1])
    for n, out in ((2, "killed"), (1, "killed1")):  # the same world size, and resharded onto one rank
        proc = _torchrun(n, root / "driver.py", root / "data", root / out, root / f"r{n}.json", 2, 1, 0, 1e-3, cwd=root)
        assert proc.returncode == 0, _log(proc)
        report = json.loads((root / f"r{n}.json").read_text())
        assert report["full"]["resumed_from_step"] == 2
        assert report["full"]["loss_history"] == pytest.approx(reports[2]["full"]["loss_history"], rel=1e-5)
        assert _max_diff(_weights(root / out / STAGES[1]), want) < 1e-4, out
        assert sorted(p.name for p in (root / out).iterdir()) == list(STAGES)  # the shards are gone


def test_estimate_within_15_percent_of_the_measured_per_rank_peak(tmp_path):
    if not torch.distributed.is_gloo_available():
        pytest.skip("gloo is not available")
    (tmp_path / "measure.py").write_text(MEASURE)
    proc = _torchrun(2, tmp_path / "measure.py", tmp_path / "peaks", cwd=tmp_path)
    assert proc.returncode == 0, _log(proc)
    for rank in (0, 1):
        peaks = json.loads((tmp_path / f"peaks.rank{rank}").read_text())
        for preset, (est, measured) in peaks.items():
            assert abs(est - measured) / measured < 0.15, (preset, rank, est, measured)


# ---- without torchrun ------------------------------------------------------------------------------------------------
def test_train_estimate_cli_says_what_fits(capsys):
    from nvila_edge.cli import main
    from nvila_edge.config import NVILAConfig
    from nvila_edge.training.memory import estimate_training_memory, stage_estimates
    from nvila_edge.training.recipe import nvila_recipe

    assert main(["train", "--estimate", "--preset", "nvila-8b", "--stage", "4", "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "stage 4 image_it" in out and "stage 3" not in out
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines() if line.startswith(("DDP", "FSDP"))}
    assert rows["DDP"].endswith("does not fit") and rows["FSDP full_shard"].endswith("  fits")
    # the DDP copy: ~16 bytes a parameter of all 8B; FSDP divides weights, gradients and AdamW by the GPUs
    config = NVILAConfig.from_preset("nvila-8b")
    (_, _, ests), = stage_estimates(config, nvila_recipe(), 8, stage=4)
    ddp, fsdp = ests["no"], ests["full_shard"]
    assert 120e9 < sum(ddp.parts[k] for k in ("weights (fp32)", "gradients (fp32)", "optimizer states")) < 135e9
    assert fsdp.parts["weights (fp32)"] * 8 == pytest.approx(ddp.parts["weights (fp32)"], rel=1e-6)
    assert estimate_training_memory(config, ("llm",), world=16, fsdp="full_shard",
                                    gradient_checkpointing=True).total_bytes < fsdp.total_bytes
    with pytest.raises(ConfigError, match="--stage must be 1..5"):
        stage_estimates(config, nvila_recipe(), 8, stage=6)


def test_fsdp_without_a_process_group_is_a_config_error(tmp_path, monkeypatch):
    from nvila_edge.training.recipe import DataSource, Recipe, Stage
    from nvila_edge.training.trainer import run_recipe

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    recipe = Recipe(name="r", stages=(Stage("s", ("mm_projector",), 1e-3, (DataSource("x.jsonl"),)),))
    with pytest.raises(ConfigError, match="torchrun"):
        run_recipe(recipe, tmp_path / "out", fsdp="full_shard")
    with pytest.raises(ConfigError, match="--resume"):
        run_recipe(recipe, tmp_path / "out", resume=True)
    with pytest.raises(ConfigError, match="fsdp must be one of"):
        Recipe(name="r", stages=recipe.stages, fsdp="zero3")
    assert not (tmp_path / "out").exists()
    back = Recipe.from_dict({**recipe.to_dict(), "fsdp": "shard_grad_op", "save_steps": 50})
    assert back.fsdp == "shard_grad_op" and back.save_steps == 50


def test_leftover_shards_need_resume(tmp_path, monkeypatch):
    """A stage with mid-stage shards is not started over silently (checked before torchrun's group or any
    weight): the run asks for --resume."""
    from nvila_edge.training.fsdp import PROGRESS, shards_dir
    from nvila_edge.training.recipe import DataSource, Recipe, Stage
    from nvila_edge.training.trainer import run_recipe, stage_dir

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    recipe = Recipe(name="r", stages=(Stage("s", ("mm_projector",), 1e-3, (DataSource("x.jsonl"),)),))
    step = shards_dir(stage_dir(tmp_path, 0, recipe.stages[0])) / "step-00000002"
    step.mkdir(parents=True)
    (step / PROGRESS).write_text("{}")
    with pytest.raises(ConfigError, match="pass --resume"):
        run_recipe(recipe, tmp_path, fsdp="full_shard")
    with pytest.raises(ConfigError, match="torchrun"):  # with --resume: on to the process group
        run_recipe(recipe, tmp_path, fsdp="full_shard", resume=True)


def test_global_batch_the_world_does_not_divide():
    from nvila_edge.training.fsdp import check_global_batch, stage_needs
    from nvila_edge.training.recipe import DataSource, Stage

    stage = Stage("s", ("llm",), 1e-3, (DataSource("x.jsonl"),), batch_size=8)
    assert check_global_batch(stage, 4) == 2
    with pytest.raises(ConfigError, match="global batch_size 8 is not divisible by the world size 3"):
        stage_needs([stage], 3)


def test_resume_refuses_shards_of_another_recipe_and_skips_half_written_ones(tmp_path):
    from nvila_edge.training.fsdp import PROGRESS, latest_shards, load_shards, shards_dir

    out = tmp_path / "stage3-x"
    root = shards_dir(out)
    assert latest_shards(out) is None
    for step, complete in ((2, True), (4, True), (6, False)):
        d = root / f"step-{step:08d}"
        d.mkdir(parents=True)
        if complete:
            (d / PROGRESS).write_text(json.dumps({"step": step, "world_size": 2, "fingerprint": {
                "recipe": {"seed": 0, "stages": [{"learning_rate": 1e-3}]}, "stage": "x"}}))
    (root / ".step-00000008.tmp").mkdir()
    assert latest_shards(out).name == "step-00000004"
    other = {"recipe": {"seed": 0, "stages": [{"learning_rate": 2e-3}]}, "stage": "x"}
    with pytest.raises(CheckpointError, match=r"different recipe or stage \(differs in recipe.stages\[0\].learning_rate\)"):
        load_shards(latest_shards(out), None, None, other)
