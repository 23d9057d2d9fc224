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


def test_random_quantized_tensors_follow_quant_format(tiny_config):
    """The bench's random-weight cuda layout is quant_format's rules: int4 RTN (amax / 7 per group) for the decoder
    linears, int8 per channel with measured activation amax for the vision linears, int8 rows for the token table."""
    import numpy as np
    import torch

    from conftest import make_model
    from nvila_edge import quant_format as qf
    from nvila_edge.pipelines.bench.gpu import random_quantized_tensors

    model = make_model(tiny_config)
    s = tiny_config.vision.image_size
    px = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32))
    t = random_quantized_tensors(model, px, group_size=32)
    name = "llm.model.layers.0.mlp.down_proj"
    w = model.get_submodule(name).weight.detach().float()
    codes, scales = qf.quantize_int4_groups(w, 32)
    assert torch.equal(t[f"{name}.qweight"], qf.pack_int4(codes)) and torch.equal(t[f"{name}.scales"], scales)
    err = (qf.dequantize_int4(t[f"{name}.qweight"], t[f"{name}.scales"]) - w).abs().reshape(w.shape[0], -1, 32)
    assert bool((err <= scales[..., None] / 2 + 1e-6).all())  # round-to-nearest on each group's grid
    vis = [k[:-len(".input_amax")] for k in t if k.endswith(".input_amax")]
    assert vis and all(float(t[f"{n}.input_amax"]) > 0 for n in vis)
    vw = model.get_submodule(vis[0]).weight.detach().float()
    assert torch.allclose(t[f"{vis[0]}.weight"].float() * t[f"{vis[0]}.weight_scale"][:, None], vw,
                          atol=float(t[f"{vis[0]}.weight_scale"].max()) / 2 + 1e-6)
    q, sc = qf.quantize_int8_rows(model.llm.get_input_embeddings().weight)
    assert torch.equal(t["llm.model.embed_tokens.weight"], q) and torch.equal(t["llm.model.embed_tokens.scales"], sc)
