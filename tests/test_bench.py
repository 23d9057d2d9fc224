"""``nvila-edge bench`` on the tiny preset (--quick): the bundle the real recipes make is what "ours" runs, every
metric measured and positive, ratios and targets computed, the docs section + PNG written atomically (to tmp,
replaced in place on a re-run), a bundle benched, peers that are missing / fail to build / crash reported as
rows, and a user's files in --work-dir left alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
cv2 = pytest.importorskip("cv2")

from nvila_edge.cli import main  # noqa: E402
from nvila_edge.errors import ConfigError  # noqa: E402
from nvila_edge.pipelines.bench import runner as bench  # noqa: E402
from nvila_edge.pipelines.bench import llamacpp  # noqa: E402
from nvila_edge.pipelines.bench import report  # noqa: E402
from nvila_edge.pipelines.bench.runner import genai_available, openvino_missing, run_bench  # noqa: E402


USER_FILES = {"config.json": "my own config", "bundle/mine.txt": "keep me", "notes.txt": "hello"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("bench-work")  # exports are cached here across the tests
    for rel, text in USER_FILES.items():  # a user's files, with names the bench also uses for its own
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_text(text)
    return w


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
                 ("bytes_per_token", "weights"), ("bytes_per_token", "kv"), ("ort", "runtime_bytes", "weights"),
                 ("ort", "vision_cosine_vs_fp32")]:
        _positive(r, *path)
    assert r["ort"]["ttft_video"]["tiles"] == 8  # one tile per frame
    assert r["ort"]["describe"]["backend"] == "onnxruntime"
    if genai_available():
        _positive(r, "genai", "llm", "decode_tok_s")
        _positive(r, "genai_bytes_per_token", "total")
    # every ratio computed, every target judged (a miss is reported, never an error)
    wanted = ["decode_vs_torch_float32", "decode_fraction_of_bound", "prefill_vs_torch_bfloat16", "vision_vs_ort_fp32",
              "ttft_image_vs_1500ms", "rss_vs_1_3x_weights_kv", "vision_cosine_vs_fp32"]
    wanted += ["decode_vs_genai", "decode_vs_fastest_peer", "prefill_vs_fastest_peer"] if genai_available() else []
    if openvino_missing() is None:
        _positive(r, "openvino", "vision", "vision_int8_ms")
        _positive(r, "openvino", "llm", "llm", "decode_tok_s")
        wanted += ["vision_vs_fastest_int8_peer", "decode_vs_openvino", "vision_vs_ours_ort"]
        # ours runs the tower on OpenVINO beside the ORT decoder; the same graph on ORT is timed for the record
        assert r["ort"]["describe"]["vision"]["engine"] == "openvino"
        _positive(r, "ort", "vision_int8_ort_ms")
    else:
        assert r["ort"]["describe"]["vision"] == {"engine": "onnxruntime"} and "vision_int8_ort_ms" not in r["ort"]
    for key in wanted:
        assert r["ratios"][key] > 0, key
    assert [t["target"] for t in r["targets"]] == [label for label, _, _ in report.CPU_TARGETS]
    for t in r["targets"]:  # each verdict is the ratio against its threshold
        want = "skipped (not measured)" if t["ratio"] is None else ("met" if t["ratio"] >= t["needed"] else "not met")
        assert t["status"] == want, t
    measured = {t["target"] for t in r["targets"] if t["ratio"] is not None}
    assert {label for label, key, _ in report.CPU_TARGETS  # ours alone decides these: always measured
            if key in ("ttft_image_vs_1500ms", "rss_vs_1_3x_weights_kv", "vision_cosine_vs_fp32")} <= measured


def test_ours_is_the_shipped_bundle(quick_run, work):
    """The row "ours" runs the bundle that ModelOpt W8A8 SmoothQuant + W4A16 AWQ and the cpu target made."""
    from nvila_edge.bundle import Bundle

    r, _ = quick_run
    assert r["build"]["recipes"] == {"vision": "w8a8-smoothquant", "llm": "w4a16-awq"}
    b = Bundle.open(work / "nvila-edge-bench-tiny-seed0" / "bundle")
    assert b.target("cpu")["precision"]["vision"] == "int8-qdq" and b.target("cpu")["precision"]["llm"] == "int4"
    assert r["ort"]["vision_int8_kind"] == "bundle's ModelOpt w8a8-smoothquant Q/DQ"
    assert r["ort"]["describe"]["backend"] == "onnxruntime" and 0.99 <= r["ort"]["vision_cosine_vs_fp32"] <= 1.0


def test_work_dir_user_files_untouched(quick_run, work):
    for rel, text in USER_FILES.items():
        assert (work / rel).read_text() == text, rel
    assert sorted(p.name for p in (work / "bundle").iterdir()) == ["mine.txt"]
    own = work / "nvila-edge-bench-tiny-seed0"
    assert (own / bench.OWNED).is_file() and (own / "bundle" / "manifest.json").is_file()
    # a folder of the bench's name that the bench did not make is refused, not reused
    (work / "nvila-edge-bench-other-seed0").mkdir()
    (work / "nvila-edge-bench-other-seed0" / "x.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not made by"):
        bench._work_dir(str(work), "other", None, 0, "onnxruntime")
    assert (work / "nvila-edge-bench-other-seed0" / "x.txt").read_text() == "mine"


def test_docs_table_and_png(quick_run, tmp_path):
    r, out = quick_run
    md = (out / "docs" / "BENCH.md").read_text()
    assert "| engine (Qwen2 LLM) |" in md and "| engine (vision tower, 1 tile) |" in md and "decode tok/s" in md
    for engine in ("ours: bundle via Runtime", "onnxruntime-genai", "llama.cpp Q4_0", "llama.cpp Q4_K_M", "OpenVINO INT4",
                   "OpenVINO NNCF INT8", "transformers eager float32"):
        assert engine in md, engine
    assert "| target | needed | onnxruntime backend: ratio | status |" in md or "| target | ratio | needed | status |" in md
    assert "bench_tiny.png" in md
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


def test_missing_peers_are_rows(work, monkeypatch, tmp_path):
    for mod in ("onnxruntime_genai", "openvino", "nncf", "llama_cpp"):  # llama_cpp: the [llamacpp] extra may be here
        monkeypatch.setitem(sys.modules, mod, None)  # import fails as if not installed
    r = run_bench(preset="tiny", quick=True, threads=1, work_dir=work, llama_cpp=str(tmp_path / "no-llama"))
    assert "not installed" in r["genai"]["skipped"] and "not installed" in r["openvino"]["skipped"]
    assert "llama-bench not found" in r["llamacpp"]["skipped"]
    peer = next(t for t in r["targets"] if "fastest peer" in t["target"] and "decode" in t["target"])
    assert peer["status"].startswith("skipped") and r["ratios"].get("decode_vs_genai") is None
    assert r["ort"]["llm"]["decode_tok_s"] > 0
    text = report.render_text(r)
    rows = {line.split("  ")[0]: line for line in text.splitlines()}
    assert "not run: llama.cpp's llama-bench not found" in rows["llama.cpp Q4_0 (llama-bench)"]
    assert "not run: openvino and nncf not installed" in rows["OpenVINO INT4 (NNCF group 128, stateful)"]


def _fake_llama_cpp(root: Path, bench_script: str, convert_ok: bool = True) -> Path:
    """A llama.cpp tree whose tools are shell / Python stand-ins (the real converter + tools are not needed to
    see how the bench handles them failing)."""
    (root / "conversion").mkdir(parents=True)
    (root / "conversion" / "__init__.py").write_text("")
    (root / "conversion" / "base.py").write_text("class TextModel:\n    pass\n")
    out = "sys.argv[sys.argv.index('--outfile') + 1]"
    (root / "convert_hf_to_gguf.py").write_text(
        "import sys\n" + (f"open({out}, 'wb').write(b'GGUF')\n" if convert_ok else "raise SystemExit('no such tensor')\n"))
    bin_dir = root / "build" / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in (("llama-quantize", 'cp "$1" "$2"'), ("llama-bench", bench_script)):
        (bin_dir / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    return root


def _llama_spec(tmp_path, root) -> dict:
    (tmp_path / "hf").mkdir()
    return {"llama_cpp": str(root), "counts": dict(bench.QUICK), "threads": 1, "work": str(tmp_path / "w"),
            "hf_llm": str(tmp_path / "hf")}


def test_crashing_llama_bench_is_a_row(tmp_path):
    root = _fake_llama_cpp(tmp_path / "llama.cpp", "echo boom >&2; exit 3")
    res = llamacpp.phase_llamacpp(_llama_spec(tmp_path, root))
    assert set(res["quants"]) == {"Q4_0", "Q4_K_M"}
    for q in res["quants"].values():
        assert q["error"] == "RuntimeError: llama-bench exited 3: boom"
    rows = report.llm_engines({"llamacpp": res})
    assert next(e for e in rows if e.key == "llamacpp_Q4_0").why.startswith("failed: RuntimeError: llama-bench exited 3")


def test_llama_bench_output_is_read(tmp_path):
    rows = '[{"n_prompt": 128, "n_gen": 0, "avg_ts": 256.0, "build_commit": "abc"}, {"n_prompt": 0, "n_gen": 8, "avg_ts": 40.0}]'
    root = _fake_llama_cpp(tmp_path / "llama.cpp", f"echo '{rows}'")
    res = llamacpp.phase_llamacpp(_llama_spec(tmp_path, root))
    q = res["quants"]["Q4_0"]
    assert q["prefill_s"] == 0.5 and q["decode_tok_s"] == 40.0 and q["build"] == "abc" and q["peak_rss_mb"] > 0


def test_failing_conversion_is_a_row(tmp_path):
    root = _fake_llama_cpp(tmp_path / "llama.cpp", "exit 0", convert_ok=False)
    res = llamacpp.phase_llamacpp(_llama_spec(tmp_path, root))
    assert res["error"].startswith("GGUF conversion failed: RuntimeError: convert_hf_to_gguf.py failed (exit 1): no such tensor")
    assert not (tmp_path / "w" / "gguf" / "gguf-f16.done").exists()  # not cached: the next run tries again


def test_crashing_phase_is_an_error_not_a_crash(tmp_path):
    res = bench.run_child("no-such-phase", {"work": str(tmp_path)})
    assert res["error"].startswith("phase no-such-phase failed (exit status 2")  # the usage error, no traceback


def test_report_written_atomically(quick_run, tmp_path, monkeypatch):
    r, _ = quick_run
    doc = tmp_path / "B.md"
    doc.write_text("# Benchmarks\n\nold\n")
    import nvila_edge.io as nio

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(nio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        report.write_docs(r, doc)
    assert doc.read_text() == "# Benchmarks\n\nold\n" and sorted(p.name for p in tmp_path.iterdir()) == ["B.md"]


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


def test_llama_cpp_python_runner(monkeypatch, capsys, tmp_path):
    """Without llama-bench, llama-cpp-python quantizes and times (its child entry points, on a stand-in library)."""
    import ctypes
    import types

    class Params(ctypes.Structure):
        _fields_ = [("ftype", ctypes.c_int)]

    calls = []
    fake = types.SimpleNamespace(__version__="0.0-test", LLAMA_FTYPE_MOSTLY_Q4_0=2, LLAMA_FTYPE_MOSTLY_Q4_K_M=15)
    fake.llama_model_quantize_default_params = Params
    fake.llama_model_quantize = lambda src, dst, params: calls.append((src, dst, params._obj.ftype)) or 0

    class Llama:
        def __init__(self, **kw):
            self.kw, self.tokens = kw, []

        def n_vocab(self):
            return 512

        def eval(self, ids):
            self.tokens += ids

        def reset(self):
            self.tokens = []

    fake.Llama = Llama
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    assert llamacpp._quantize_main("a.gguf", "b.gguf", "Q4_K_M") == 0 and calls == [(b"a.gguf", b"b.gguf", 15)]
    assert llamacpp._time_main("m.gguf", "1", "32", "4", "2") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["n_prompt"] == 32 and rows[1]["n_gen"] == 4 and rows[0]["avg_ts"] > 0
    # found as the runner when there is no llama-bench; the converter still comes from a source tree
    src = tmp_path / "src"
    src.mkdir()
    (src / "convert_hf_to_gguf.py").write_text("")
    assert llamacpp.find_tools(str(src))["runner"] == "llama-cpp-python"
    assert "convert_hf_to_gguf.py" in llamacpp.find_tools(None)["missing"]


def test_prepare_builds_and_times_nothing(work, capsys):
    """--prepare fills the cache (the tiny one is already built by the quick run: reused, not redone)."""
    assert main(["bench", "--preset", "tiny", "--prepare", "--threads", "1", "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "build: " in out and "bundle" in out and "torch: " in out and "decode tok/s" not in out
