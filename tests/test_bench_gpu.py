"""``nvila-edge bench --backend torch`` with the quantized comparison (pipelines/bench/gpu.py), run on the CPU
kernels (--quick, tiny preset): every path measured, ratios and the issue's targets judged, the table rendered.
GPU figures come from scripts/gpu_check.sh on a lent GPU."""

from __future__ import annotations

import json

import pytest

from nvila_edge.pipelines.bench import report
from nvila_edge.cli import main

pytest.importorskip("onnxruntime")


def test_quantized_bench_on_cpu_kernels(tmp_path, capsys):
    rc = main(["bench", "--preset", "tiny", "--backend", "torch", "--device", "cpu", "--quick", "--threads", "1",
               "--work-dir", str(tmp_path / "w"), "--json", str(tmp_path / "r.json"), "--no-write-docs"])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    g = r["gpu"]
    for path in [("vision_ms",), ("vision_w8a8_ms",), ("eager", "decode_tok_s"), ("fp16_graph", "llm", "decode_tok_s"),
                 ("w4a16", "llm", "decode_tok_s"), ("w4a16", "llm", "prefill_s"), ("w4a16", "ttft_image", "ttft_ms"),
                 ("w4a16", "ttft_video", "ttft_ms"), ("fp16_graph", "ttft_image", "ttft_ms"), ("bytes_per_token", "total")]:
        v = g
        for k in path:
            v = v[k]
        assert v > 0, path
    assert g["vision_cosine"] >= 0.99 and g["w4a16"]["describe"]["target"] == "cuda"
    assert g["kernels"]["Int4Linear:int4"] == 14 and g["w4a16"]["ttft_video"]["tiles"] == 8
    # int4 codes + scales and an int8 head against the fp32 weights this CPU run keeps: under a third here
    assert g["bytes_per_token"]["weights"] < g["fp16_bytes_per_token"]["weights"] / 3
    labels = [t["target"] for t in r["targets"]]
    assert len(labels) == len(report.GPU_TARGETS) + len(report.QUANT_TARGETS)
    for t in r["targets"]:  # each verdict is the ratio against its threshold
        want = "skipped (not measured)" if t["ratio"] is None else ("met" if t["ratio"] >= t["needed"] else "not met")
        assert t["status"] == want, t
    by = {t["target"]: t for t in r["targets"]}  # what the CPU run measures on both sides is judged, not skipped
    for label, key, _ in report.QUANT_TARGETS:
        if key in ("w4a16_vs_fp16_graph", "vision_cosine", "ttft_fp16_over_quant"):
            assert by[label]["ratio"] is not None, label
    out = capsys.readouterr().out
    assert "cuda target (W4A16 LLM, W8A8 vision" in out and "W4A16 decode ≥ 2.5×" in out


def test_gpu_check_script_parts(tmp_path):
    """scripts/gpu_check.py: ``env`` refuses a CUDA-less torch (exit 2), ``summary`` reads the bench JSON."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    p = subprocess.run([sys.executable, str(script), "env"], capture_output=True, text=True, timeout=120)
    info = json.loads(p.stdout)
    assert p.returncode == (0 if torch.cuda.is_available() else 2) and info["torch"] == torch.__version__
    (tmp_path / "bench-nvila-lite-2b-cuda.json").write_text(json.dumps(
        {"date": "d", "gpu": {"gpu_name": "G", "kernels": {"Int4Linear:int4": 1}}, "ratios": {"x": 1.0},
         "targets": [{"target": "t", "status": "met", "ratio": 2.0}]}))
    p = subprocess.run([sys.executable, str(script), "summary", str(tmp_path), "0", "1"], capture_output=True,
                       text=True, timeout=120)
    s = json.loads(p.stdout)
    assert s["gpu"] == "G" and s["bench_rc"] == 1 and s["targets"] == [["t", "met", 2.0]]
