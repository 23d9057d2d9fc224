"""``nvila-edge bench`` on the tiny preset (--quick): every metric measured and positive, ratios and targets
computed, the docs section + PNG written (to tmp, replaced in place on a re-run), a bundle benched, and a
missing onnxruntime-genai reported as skipped."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
cv2 = pytest.importorskip("cv2")

from nvila_edge.cli import main  # noqa: E402
from nvila_edge.pipelines import bench_report as report  # noqa: E402
from nvila_edge.pipelines.bench import genai_available, run_bench  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-work")  # exports are cached here across the tests


@pytest.fixture(scope="module")
def quick_run(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    rc = main(["bench", "--preset", "tiny", "--quick", "--threads", "1", "--work-dir", str(work), "--json",
               str(out / "r.json"), "--write-docs", "--docs", str(out / "docs" / "BENCH.md")])
    assert rc == 0
    return json.loads((out / "r.json").read_text()), out


def _positive(d, *path):
    for k in path:
        d = d[k]
    assert isinstance(d, (int, float)) and d > 0, (path, d)


def test_every_metric_measured(quick_run):
    r, _ = quick_run
    assert r["quick"] and r["target"] == "tiny" and r["machine"]["cores"] >= 1
    for path in [("torch", "vision_ms"), ("torch", "llm_float32", "prefill_s"), ("torch", "llm_float32", "decode_tok_s"),
                 ("torch", "llm_bfloat16", "prefill_s"), ("torch", "llm_bfloat16", "decode_tok_s"),
                 ("ort", "vision_int8_ms"), ("ort", "vision_fp32_ms"), ("ort", "llm", "prefill_s"),
                 ("ort", "llm", "decode_tok_s"), ("ort", "ttft_image", "ttft_ms"), ("ort", "ttft_video", "ttft_ms"),
                 ("ort", "ttft_video", "visual_tokens"), ("ort", "runtime_peak_rss_mb"), ("bandwidth_gbs",),
                 ("bytes_per_token", "weights"), ("bytes_per_token", "kv")]:
        _positive(r, *path)
    assert r["ort"]["ttft_video"]["tiles"] == 8  # one tile per frame
    assert r["ort"]["describe"]["backend"] == "onnxruntime"
    if genai_available():
        _positive(r, "genai", "llm", "decode_tok_s")
        _positive(r, "genai_bytes_per_token", "total")
    # every ratio computed, every target judged (a miss is reported, never an error)
    wanted = ["decode_vs_torch_fp32", "decode_fraction_of_bound", "prefill_vs_torch_bf16", "vision_int8_vs_fp32_ort"]
    wanted += ["decode_vs_genai"] if genai_available() else []
    for key in wanted:
        assert r["ratios"][key] > 0, key
    assert len(r["targets"]) == len(report.CPU_TARGETS)
    assert {t["status"] for t in r["targets"] if t["ratio"] is not None} <= {"met", "not met"}


def test_docs_table_and_png(quick_run, tmp_path):
    r, out = quick_run
    md = (out / "docs" / "BENCH.md").read_text()
    assert "| metric | ours (ORT, int4 LLM, INT8 vision)" in md and "decode tok/s" in md
    assert "| target | ratio | needed | status |" in md and "bench_tiny.png" in md
    png = out / "docs" / "bench_tiny.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imread(str(png))
    assert img is not None and img.shape[1] == 900 and img.shape[0] > 200 and (img < 250).any()
    # a second write replaces this run's section and keeps the rest of the file
    doc = tmp_path / "B.md"
    doc.write_text("# Benchmarks\n\n## Older section\n\nkept\n")
    report.write_docs(r, doc)
    report.write_docs(r, doc)
    text = doc.read_text()
    assert text.count("<!-- nvila-edge bench: tiny -->") == 1 and "kept" in text


def test_report_renders_saved_result(quick_run, tmp_path, capsys):
    _, out = quick_run
    assert main(["bench", "--report", str(out / "r.json"), "--write-docs", "--docs", str(tmp_path / "R.md")]) == 0
    assert "decode tok/s" in capsys.readouterr().out
    assert (tmp_path / "bench_tiny.png").is_file() and "<!-- /nvila-edge bench: tiny -->" in (tmp_path / "R.md").read_text()


def test_missing_genai_is_skipped(work, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails as if not installed
    r = run_bench(preset="tiny", quick=True, threads=1, work_dir=work)
    assert "not installed" in r["genai"]["skipped"]
    genai_target = next(t for t in r["targets"] if "genai" in t["target"])
    assert genai_target["status"].startswith("skipped") and r["ratios"]["decode_vs_genai"] is None
    assert r["ort"]["llm"]["decode_tok_s"] > 0
    assert "skipped" in report.render_text(r)


def test_gpu_report_renders(tmp_path):
    """The GPU result's table / targets / plot path, from a synthetic result (no GPU needed)."""
    g = {"device": "cuda", "dtype": "float16", "gpu_name": "Test GPU", "vision_ms": 12.0, "describe": {"decode": "cuda-graph"},
         "eager": {"prefill_s": 0.05, "decode_tok_s": 40.0}, "backend": {"prefill_s": 0.04, "decode_tok_s": 300.0},
         "ttft_image": {"ttft_ms": 60.0, "tiles": 1, "prompt_tokens": 140, "visual_tokens": 121},
         "ttft_video": {"ttft_ms": 90.0, "tiles": 8, "prompt_tokens": 900, "visual_tokens": 880},
         "bytes_per_token": {"weights": 3_000_000_000, "kv": 1, "total": 3_000_000_001}, "bandwidth_gbs": 2000.0}
    r = {"target": "nvila-lite-2b", "backend": "torch", "gpu": g, "counts": {"prefill": 512}, "date": "d",
         "machine": report.machine_info("Test GPU"), "load_avg_start": [0.0], "load_avg_end": [0.0], "seconds": 1.0}
    r["ratios"], r["targets"] = report.evaluate(r)
    assert r["ratios"]["decode_vs_eager"] == 7.5 and [t["status"] for t in r["targets"]] == ["met", "met"]
    assert "Test GPU" in report.render_markdown(r, "x.png") and report.slug(r) == "nvila-lite-2b_cuda"
    assert report.write_docs(r, tmp_path / "B.md").name == "bench_nvila-lite-2b_cuda.png"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tokenizer):
    """A tiny cpu + torch bundle: fp16 vision recipe (an fp32 graph, so the bench makes a dynamic-INT8
    variant) and an RTN int4 LLM, calibrated without data-dependent steps."""
    from conftest import make_model

    from nvila_edge import NVILAConfig, NVILAProcessor
    from nvila_edge.calibration import calibrate
    from nvila_edge.export import export_bundle

    tmp = tmp_path_factory.mktemp("bench-bundle")
    model = make_model(NVILAConfig.from_preset("tiny"))
    model.tokenizer = tokenizer
    items = [{"conversation": "<image>\nwhat color is the circle?",
              "images": [np.random.default_rng(0).integers(0, 256, (100, 120, 3), np.uint8)]},
             {"conversation": "how many shapes"}]
    calibrate(model, tmp / "cal", vision="fp16", llm="w4a16-rtn", data=items, num_samples=2, num_heldout=1,
              processor=NVILAProcessor(model.config, tokenizer), progress=False)
    export_bundle(tmp / "cal", tmp / "bundle", ["cpu", "torch"], progress=False)
    return tmp / "bundle"


def test_bench_on_a_bundle(tiny_bundle, tmp_path):
    r = run_bench(bundle=tiny_bundle, quick=True, threads=1, work_dir=tmp_path / "w")
    assert r["target"] == "bundle" and r["ort"]["vision_int8_kind"].startswith("dynamic")
    for path in [("ort", "llm", "decode_tok_s"), ("ort", "vision_fp32_ms"), ("ort", "ttft_video", "ttft_ms"),
                 ("torch", "llm_float32", "decode_tok_s"), ("torch", "vision_ms")]:
        _positive(r, *path)
    assert r["ratios"]["decode_vs_torch_fp32"] > 0
