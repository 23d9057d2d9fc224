"""Personalization loop on a tiny model: data → QLoRA fine-tune → merge → calibrate → export → before/after,
with times and peak memory; the sample, the verb, and the missing-demo message."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from nvila_edge import NVILAConfig
from nvila_edge.errors import CheckpointError

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("onnxruntime")
SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "personalize.py"


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    from conftest import make_model

    cfg = NVILAConfig.from_preset("tiny", vision={"image_size": 112},  # one 112-pixel tile per picture
                                  preprocessing={"image_aspect_ratio": "resize", "s2_scales": (112,)})
    model = make_model(cfg)
    path = tmp_path_factory.mktemp("perso") / "base"
    model.save_pretrained(path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="module")
def sample():
    return runpy.run_path(str(SAMPLE))


@pytest.mark.slow
def test_sample_runs_the_whole_loop(base, sample, tmp_path, capsys):
    assert sample["main"](["--label", "zorbo", "--checkpoint", str(base), "-o", str(tmp_path / "p"),
                           "--steps", "25"]) == 0
    out = capsys.readouterr().out
    for part in ("before:", "after:", "finetune", "merge", "calibrate", "export", "peak RSS", "total"):
        assert part in out
    report = json.loads((tmp_path / "p" / "personalize.json").read_text())
    assert report["learned"] and "zorbo" not in report["before"]  # a held-out drawing: learned, not memorised
    assert report["loss_last"] < 0.2 * report["loss_first"]
    assert set(report["seconds"]) == {"data", "before", "finetune", "merge", "calibrate", "export", "after"}
    assert all(v > 0 for v in report["peak_rss_mb"].values())
    from nvila_edge.bundle import Bundle

    b = Bundle.open(report["bundle"])  # a verified, quantized bundle
    assert b.target("cpu")["precision"]["llm"] == "int4"


@pytest.mark.slow
def test_verb_with_a_folder_of_pictures(base, sample, tmp_path, capsys):
    from nvila_edge.cli import main

    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(3):
        sample["draw_robot"](10 + i).save(pics / f"r{i}.png")
    known = tmp_path / "known"  # the base model's own data, replayed against forgetting
    (known / "img").mkdir(parents=True)
    rows = []
    for i in range(3):
        sample["draw_robot"](20 + i).save(known / "img" / f"k{i}.png")
        rows.append({"image": f"img/k{i}.png", "conversations": [{"from": "human", "value": "<image>\nhow many robots?"},
                                                                 {"from": "gpt", "value": "one"}]})
    rows.append({"video": "v.mp4", "conversations": [{"from": "human", "value": "<vila/video>\nq"},
                                                     {"from": "gpt", "value": "a"}]})  # videos are not replayed
    (known / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    rc = main(["personalize", str(pics), "--label", "zorbo", "--checkpoint", str(base), "-o", str(tmp_path / "v"),
               "--steps", "2", "--mode", "lora", "--replay", str(known / "train.jsonl"), "--replay-samples", "2",
               "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test_image"].endswith("r2.png") and Path(report["bundle"]).is_dir()
    rows = [json.loads(r) for r in (tmp_path / "v" / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 3 + 2  # 2 pictures (the 3rd is held out) x flipped x 3 phrasings + 2 replayed
    assert all(Path(r["image"]).is_absolute() for r in rows[12:])
    control = report["control"]
    assert control["question"] == "how many robots?" and control["expected"] == "one"
    assert Path(control["image"]).name not in {Path(r["image"]).name for r in rows} and "after" in control


def test_missing_demo_checkpoint_says_how_to_make_it(tmp_path, monkeypatch):
    from nvila_edge.pipelines.personalize import default_checkpoint

    monkeypatch.setenv("NVILA_EDGE_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="nvila-edge demo"):
        default_checkpoint()
    from nvila_edge.pipelines.demo import DEMO_VERSION

    done = tmp_path / f"demo-{DEMO_VERSION}" / "checkpoints"
    for name in ("stage1-a", "stage2-b", "stage10-c", "stage11-unfinished"):
        (done / name).mkdir(parents=True)
    for name in ("stage1-a", "stage2-b", "stage10-c"):
        (done / name / "metrics.json").write_text("{}")
    assert default_checkpoint().name == "stage10-c"
