"""`nvila-edge demo` plumbing on a shrunken data set and recipe (the real run is a benchmark, not a test)."""

from __future__ import annotations

import dataclasses
import io
import json

import nvila_edge.pipelines.demo as demo
from nvila_edge.resources import cpu_name
from nvila_edge.training.recipe import VIDEO_TASKS, demo_recipe
from nvila_edge.training.synthetic import SyntheticConfig


def test_demo_trains_caches_and_streams(tmp_path, monkeypatch, capsys):
    small = SyntheticConfig(num_images=30, num_videos=8, num_heldout_videos=5, heldout_fraction=0.3)
    monkeypatch.setattr(demo, "SyntheticConfig", lambda: small)

    def quick(data_dir):
        r = demo_recipe(data_dir)
        return dataclasses.replace(r, stages=tuple(dataclasses.replace(s, max_steps=1, batch_size=2) for s in r.stages))

    monkeypatch.setattr(demo, "demo_recipe", quick)
    monkeypatch.setattr(demo, "EVAL_QUESTIONS", 4)
    monkeypatch.setattr(demo, "CALIBRATION_SAMPLES", 6)
    out = io.StringIO()
    res = demo.run_demo(cache_dir=tmp_path / "cache", questions=2, progress=False, out=out)
    text = out.getvalue()
    assert res.trained_now and res.checkpoint.name == "stage5-video_it"
    assert "held-out accuracy" in text and text.count("Q: ") == 2 and "expected:" in text
    report = json.loads((tmp_path / "cache" / "report.json").read_text())
    image = report["image"]  # the accuracy returned is the one scored on the held-out images and saved
    assert image["total"] > 0 and res.image_accuracy == image["correct"] / image["total"] == image["accuracy"]
    assert report["checkpoint"] == str(res.checkpoint)
    # videos: every held-out clip scored, per task, and "when" answers by temporal IoU; the machine named
    video = report["video"]
    assert video["total"] == 5 and set(video["per_task"]) == set(VIDEO_TASKS)
    assert video["temporal"]["questions"] == 1 and 0.0 <= video["temporal"]["mean_iou"] <= 1.0
    assert res.temporal == video["temporal"] and report["cpu"] == cpu_name() and cpu_name() in text
    assert "videos per task: appears_first" in text and '"when" (1 questions' in text
    # quiet by default: the Trainer's dict logs are kept in each stage's metrics.json, whose path is printed
    printed = capsys.readouterr()
    assert "'train_runtime'" not in printed.out + printed.err
    metrics = json.loads((res.checkpoint / "metrics.json").read_text())
    assert "train_runtime" in metrics["log_history"][-1] and f"logs: {res.checkpoint / 'metrics.json'}" in text
    # the pipeline went on: ModelOpt calibration, CPU bundle export, answers streamed from ONNX Runtime
    assert "calibrating with ModelOpt" in text and "greedy-token agreement" in text
    assert "exporting the CPU bundle" in text and "answering with the bundle on onnxruntime" in text
    assert "bundle (ONNX Runtime) vs calibrated torch on 4 held-out questions" in text
    # with the [llamacpp] extra the bundle carries the gguf target and the llama.cpp engine gets its own line
    llama = "gguf" in demo.bundle_targets()
    assert ("bundle (llama.cpp engine) vs calibrated torch on 4 held-out questions" in text) == llama
    deploy = json.loads((tmp_path / "cache" / "deploy.json").read_text())
    assert ("bundle_llamacpp" in deploy) == llama and deploy["bundle"]["prompts"] == 4
    assert (tmp_path / "cache" / "bundle" / "manifest.json").is_file()
    # a second run reuses the cached model and report
    out2 = io.StringIO()
    res2 = demo.run_demo(cache_dir=tmp_path / "cache", questions=1, progress=False, out=out2)
    assert not res2.trained_now and res2.checkpoint == res.checkpoint
    assert "training the demo model" not in out2.getvalue()
    assert "calibrating" not in out2.getvalue() and "exporting" not in out2.getvalue()
    assert res2.image_accuracy == res.image_accuracy


def test_cache_root_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NVILA_EDGE_CACHE", str(tmp_path / "c"))
    assert demo.cache_root() == tmp_path / "c"
    monkeypatch.delenv("NVILA_EDGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert demo.cache_root() == tmp_path / "x" / "nvila-edge"


def test_demo_dir_per_seed(monkeypatch, tmp_path):
    monkeypatch.setenv("NVILA_EDGE_CACHE", str(tmp_path))
    assert demo.demo_dir() == tmp_path / f"demo-{demo.DEMO_VERSION}"
    assert demo.demo_dir(2) == tmp_path / f"demo-{demo.DEMO_VERSION}-seed2"
