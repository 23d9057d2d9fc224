"""``nvila-edge bench`` support: machine facts (CPU/GPU, memory bandwidth, bytes a decode step reads), the
baselines' artifacts (dynamic-INT8 vision, onnxruntime-genai's builder), the ratios vs the targets, and what
is printed and written: the table, the docs section (replaced in place on a re-run) and a bar plot drawn
with OpenCV (matplotlib is not a dependency)."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

import numpy as np

from nvila_edge.resources import package_versions
from nvila_edge.resources import peak_rss_mb as _peak_rss_mb

NA = "–"
# (label, ratio key, threshold): the runtime issue's targets; "met" when ratio >= threshold
CPU_TARGETS = [
    ("decode ≥ 10× transformers eager fp32", "decode_vs_torch_fp32", 10.0),
    ("decode ≥ 75 % of the memory-bandwidth bound", "decode_fraction_of_bound", 0.75),
    ("decode ≥ onnxruntime-genai (same int4 LLM)", "decode_vs_genai", 1.0),
    ("prefill 512 no slower than transformers eager bf16", "prefill_vs_torch_bf16", 1.0),
    ("INT8 vision ≥ 2× fp32 ONNX Runtime", "vision_int8_vs_fp32_ort", 2.0),
]
TINYCHAT_MS = 4.27  # TinyChat NVILA-2B INT4 decode on an RTX 4090, the GPU reference
GPU_TARGETS = [
    ("CUDA-graph decode faster than transformers eager fp16", "decode_vs_eager", 1.0),
    (f"decode ≤ {TINYCHAT_MS} ms/token (TinyChat NVILA-2B INT4, RTX 4090)", "decode_vs_tinychat", 1.0),
]


# ---- machine and model facts ---------------------------------------------------------------------------------
# (label, ratio key, threshold): the quantized-GPU issue's targets (benchmarks, not tests)
QUANT_TARGETS = [
    ("W4A16 decode ≥ 2.5× fp16 CUDA-graph decode", "w4a16_vs_fp16_graph", 2.5),
    ("W4A16 decode ≤ 3.0 ms/token", "w4a16_vs_3ms", 1.0),
    ("W8A8 vision ≥ 1.3× fp16 per tile", "vision_w8a8_vs_fp16", 1.3),
    ("W8A8 vision features cosine ≥ 0.99 vs fake-quant", "vision_cosine", 0.99),
    ("TTFT 1 image ≤ 0.6× the fp16 path", "ttft_fp16_over_quant", 1 / 0.6),
]



def machine_info(gpu_name: str | None = None) -> dict:
    cpu, flags, mem = platform.processor() or platform.machine(), "", None
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
        flags = re.search(r"flags\s*:\s*(.*)", text).group(1).split()
        mem = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    except (OSError, AttributeError):
        pass
    versions = package_versions(("torch", "transformers", "onnxruntime", "onnxruntime-genai", "numpy"))
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": isa, "mem_gb": round(mem, 1) if mem else None,
            "gpu": gpu_name, "versions": versions}


def decoder_bytes(path, io: dict, kv_positions: int) -> dict:
    """Bytes one decode step reads: the graph's weights (int4/int8 codes + scales + norms; not the RoPE
    tables or a Gather-only embedding table, of which a step reads one row) + the float32 KV cache."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    users: dict[str, set] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, set()).add(n.op_type)
    weights = 0
    for t in g.initializer:
        if "cos_cache" in t.name or "sin_cache" in t.name or users.get(t.name) == {"Gather"}:
            continue
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            weights += int(ext["length"])
        else:
            weights += len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    kv = 2 * int(io["num_layers"]) * int(io["num_kv_heads"]) * int(io["head_dim"]) * kv_positions * 4
    return {"weights": weights, "kv": kv, "total": weights + kv, "kv_positions": kv_positions}



def peak_rss_mb() -> float:
    return round(_peak_rss_mb(), 1)

def bandwidth_gbs(threads: int, size_mb: int = 1024, reps: int = 5) -> float:
    """Memory read bandwidth: ``threads`` threads OR-reduce disjoint parts of a 1 GiB int64 array (numpy
    releases the GIL in the loop; a float sum is compute-bound here and one thread understates it)."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones((size_mb << 20) // 8, np.int64)
    parts = np.array_split(a, 8 * threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(reps):
            t = time.perf_counter()
            list(ex.map(lambda i: [np.bitwise_or.reduce(p) for p in parts[i::threads]], range(threads)))
            best = min(best, time.perf_counter() - t)
    return round(a.nbytes / best / 1e9, 2)


def gpu_bandwidth_gbs(device: str, reps: int = 10) -> float:
    """Device memory bandwidth from a 1 GiB device-to-device copy (counts read + write)."""
    import torch

    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    return round(2 * reps * a.numel() / (time.perf_counter() - t) / 1e9, 1)


def torch_llm_bytes(llm, cfg, kv_positions: int) -> dict:
    """Bytes a torch decode step reads: every LLM weight but the embedding table (one row), + the KV cache."""
    weights = sum(p.numel() * p.element_size() for name, p in llm.named_parameters() if "embed_tokens" not in name)
    if cfg.llm.tie_word_embeddings:  # the LM head reads the shared table every token
        weights += llm.lm_head.weight.numel() * llm.lm_head.weight.element_size()
    k, item = cfg.llm, llm.lm_head.weight.element_size()
    kv = 2 * k.num_hidden_layers * k.num_key_value_heads * (k.hidden_size // k.num_attention_heads) * kv_positions * item
    return {"weights": int(weights), "kv": int(kv), "total": int(weights + kv), "kv_positions": kv_positions}


# ---- baseline artifacts (built by the torch phase) ------------------------------------------------------
GENAI_BLOCK = 128  # genai builder int4 block: the same as our decoder's, so both read the same bytes


def quantize_dynamic(src, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # MatMul only: weights int8 per tensor, activations quantized at run time (cosine 0.9999 on SigLIP)
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def build_genai(llm, out: Path) -> None:
    """onnxruntime-genai's model builder (int4, CPU) on these very HF weights: its loader is pointed at the
    in-memory model (no second copy, no tokenizer needed)."""
    import copy

    from onnxruntime_genai.models import builder as B

    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(llm.config)
    cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = 0
    B.get_hf_details = lambda *a, **k: {"extra_kwargs": {}, "hf_name": str(out), "hf_config": cfg}
    B.QwenModel.load_weights = lambda self, p: llm
    B.QwenModel.save_processing = lambda *a, **k: None
    opts = [f"block_size={GENAI_BLOCK}", "accuracy_level=4"]
    kv = B.parse_extra_options(None, str(out), str(out), "int4", "cpu", str(out / "cache"), opts)
    B.create_model(None, str(out), str(out), "int4", "cpu", str(out / "cache"), **kv)


# ---- ratios and targets ------------------------------------------------------------------------------------
def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _div(a, b):
    return round(a / b, 3) if a is not None and b else None


def evaluate(result: dict) -> tuple[dict, list[dict]]:
    """Ratios (None where a side is missing) and each target as met / not met / skipped."""
    if "gpu" in result:
        g = result["gpu"]
        ours_ms = _div(1000, _get(g, "backend", "decode_tok_s"))
        bound = _div(_get(g, "bandwidth_gbs") and g["bandwidth_gbs"] * 1e9, _get(g, "bytes_per_token", "total"))
        r = {"decode_vs_eager": _div(_get(g, "backend", "decode_tok_s"), _get(g, "eager", "decode_tok_s")),
             "prefill_vs_eager": _div(_get(g, "eager", "prefill_s"), _get(g, "backend", "prefill_s")),
             "decode_ms_per_token": ours_ms, "decode_vs_tinychat": _div(TINYCHAT_MS, ours_ms),
             "bound_tok_s": bound, "decode_fraction_of_bound": _div(_get(g, "backend", "decode_tok_s"), bound)}
        if "w4a16" in g:  # the quantized comparison (bench_gpu.py)

            r.update(quant_ratios(g))
            return r, _targets(r, GPU_TARGETS + QUANT_TARGETS)
        return r, _targets(r, GPU_TARGETS)
    ours = _get(result, "ort", "llm", "decode_tok_s")
    bw, total = result.get("bandwidth_gbs"), _get(result, "bytes_per_token", "total")
    bound = _div(bw * 1e9, total) if bw and total else None
    genai_total = _get(result, "genai_bytes_per_token", "total")
    genai_bound = _div(bw * 1e9, genai_total) if bw and genai_total else None
    r = {
        "decode_vs_torch_fp32": _div(ours, _get(result, "torch", "llm_float32", "decode_tok_s")),
        "decode_vs_torch_bf16": _div(ours, _get(result, "torch", "llm_bfloat16", "decode_tok_s")),
        "decode_vs_genai": _div(ours, _get(result, "genai", "llm", "decode_tok_s")),
        "bound_tok_s": bound,
        "decode_fraction_of_bound": _div(ours, bound),
        "genai_fraction_of_bound": _div(_get(result, "genai", "llm", "decode_tok_s"), genai_bound),
        "prefill_vs_torch_bf16": _div(_get(result, "torch", "llm_bfloat16", "prefill_s"), _get(result, "ort", "llm", "prefill_s")),
        "prefill_vs_torch_fp32": _div(_get(result, "torch", "llm_float32", "prefill_s"), _get(result, "ort", "llm", "prefill_s")),
        "vision_int8_vs_fp32_ort": _div(_get(result, "ort", "vision_fp32_ms"), _get(result, "ort", "vision_int8_ms")),
        "vision_int8_vs_torch_fp32": _div(_get(result, "torch", "vision_ms"), _get(result, "ort", "vision_int8_ms")),
    }
    return r, _targets(r, CPU_TARGETS)


def _targets(ratios: dict, table) -> list[dict]:
    out = []
    for label, key, need in table:
        v = ratios.get(key)
        status = "skipped (not measured)" if v is None else ("met" if v >= need else "not met")
        out.append({"target": label, "ratio": v, "needed": need, "status": status})
    return out


# ---- table ---------------------------------------------------------------------------------------------------
def _fmt(v, nd=1):
    return NA if v is None else (f"{v:,.{nd}f}" if isinstance(v, float) else f"{v:,}")


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings): metrics × engines."""
    if "gpu" in result and "w4a16" in result["gpu"]:

        return QUANT_HEAD, quant_rows(result["gpu"])
    if "gpu" in result:
        g = result["gpu"]
        head = ["metric", f"torch backend ({_get(g, 'describe', 'decode') or '?'}, {g.get('dtype')})",
                f"transformers eager {g.get('dtype')}"]
        ms = lambda d: _div(1000, _get(d, "decode_tok_s"))  # noqa: E731
        rows = [["vision ms / tile", _fmt(g.get("vision_ms")), "(same eager tower)"],
                [f"prefill {result['counts'].get('prefill', 512)} tok (ms)", _fmt(_mul(_get(g, "backend", "prefill_s"))),
                 _fmt(_mul(_get(g, "eager", "prefill_s")))],
                ["decode ms / token", _fmt(ms(g.get("backend")), 2), _fmt(ms(g.get("eager")), 2)],
                ["decode tok/s", _fmt(_get(g, "backend", "decode_tok_s")), _fmt(_get(g, "eager", "decode_tok_s"))],
                ["TTFT 1 image (ms)", _ttft(g.get("ttft_image")), NA],
                ["TTFT 8-frame video (ms)", _ttft(g.get("ttft_video")), NA],
                ["peak GPU memory (MB)", _fmt(g.get("gpu_peak_mem_mb"), 0), NA]]
        return head, rows
    o, t, gen = result.get("ort", {}), result.get("torch", {}), result.get("genai", {})
    n = result["counts"]["prefill"]
    head = ["metric", "ours (ORT, int4 LLM, INT8 vision)", "fp32 ONNX Runtime", "transformers eager fp32",
            "transformers eager bf16", "onnxruntime-genai int4"]
    rows = [["vision ms / tile", _fmt(o.get("vision_int8_ms"), 0), _fmt(o.get("vision_fp32_ms"), 0),
             _fmt(t.get("vision_ms"), 0), NA, NA],
            [f"prefill {n} tok (s)", _fmt(_get(o, "llm", "prefill_s"), 2), NA, _fmt(_get(t, "llm_float32", "prefill_s"), 2),
             _fmt(_get(t, "llm_bfloat16", "prefill_s"), 2), _fmt(_get(gen, "llm", "prefill_s"), 2)],
            ["decode tok/s", _fmt(_get(o, "llm", "decode_tok_s")), NA, _fmt(_get(t, "llm_float32", "decode_tok_s"), 2),
             _fmt(_get(t, "llm_bfloat16", "decode_tok_s"), 2), _fmt(_get(gen, "llm", "decode_tok_s"))],
            ["TTFT 1 image (ms)", _ttft(o.get("ttft_image")), NA, NA, NA, NA],
            ["TTFT 8-frame video (ms)", _ttft(o.get("ttft_video")), NA, NA, NA, NA],
            ["peak RSS (MB)", _fmt(o.get("runtime_peak_rss_mb"), 0), NA, _fmt(t.get("peak_rss_mb"), 0) + " (phase)",
             "(same phase)", _fmt(gen.get("peak_rss_mb"), 0)]]
    return head, rows


def _mul(v, k=1000):
    return None if v is None else round(v * k, 1)


def _ttft(d):
    if not d:
        return NA
    return f"{d['ttft_ms']:,.0f} ({d['tiles']} tile{'' if d['tiles'] == 1 else 's'}, {d['prompt_tokens']} tok)"


def _bound_lines(result: dict) -> list[str]:
    r = result.get("ratios", {})
    if "gpu" in result:
        b = result["gpu"].get("bytes_per_token") or {}
        bw = result["gpu"].get("bandwidth_gbs")
    else:
        b, bw = result.get("bytes_per_token") or {}, result.get("bandwidth_gbs")
    if not b:
        return []
    lines = [f"decode bound: {b['total'] / 1e9:.3f} GB read per token ({b['weights'] / 1e9:.3f} GB weights + "
             f"{b['kv'] / 1e6:.1f} MB KV) / {_fmt(bw)} GB/s measured"
             + (" (device copy, read + write)" if "gpu" in result else " (2-thread read)") + f" = {_fmt(r.get('bound_tok_s'))} tok/s; "
             f"achieved {_pct(r.get('decode_fraction_of_bound'))}"]
    gb = result.get("genai_bytes_per_token")
    if gb:
        lines.append(f"onnxruntime-genai reads {gb['total'] / 1e9:.3f} GB per token: {_pct(r.get('genai_fraction_of_bound'))} "
                     "of its own bound")
    return lines


def _pct(v):
    return NA if v is None else f"{100 * v:.0f} %"


def _notes(result: dict) -> list[str]:
    notes = []
    for k in ("torch", "ort", "genai"):
        d = result.get(k) or {}
        for why in ("error", "skipped"):
            if d.get(why):
                notes.append(f"{k}: {why}: {d[why]}")
    if _get(result, "ort", "vision_int8_kind"):
        notes.append(f"INT8 vision graph: {result['ort']['vision_int8_kind']}")
    return notes


def render_text(result: dict) -> str:
    head, rows = table(result)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [f"nvila-edge bench: {result['target']} ({result['backend']}) on {result['machine']['cpu']}"
           + (f" + {result['machine']['gpu']}" if result["machine"].get("gpu") else ""), line(head)]
    out += [line(r) for r in rows] + _bound_lines(result)
    out += [f"  [{t['status']}] {t['target']} (ratio {_fmt(t['ratio'], 2)}, needed {t['needed']})" for t in result["targets"]]
    out += _notes(result)
    return "\n".join(out)


# ---- docs + plot -----------------------------------------------------------------------------------------
def slug(result: dict) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(result["target"]))
    return s + ("_" + result["gpu"]["device"].split(":")[0] if "gpu" in result else "")


def render_markdown(result: dict, png_name: str) -> str:
    m = result["machine"]
    head, rows = table(result)
    key = slug(result)
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items() if x)
    machine = (f"{m['cpu']}, {m['cores']} cores ({' '.join(m['isa'])}), {_fmt(m['mem_gb'])} GB"
               + (f"; GPU: {m['gpu']}" if m.get("gpu") else ""))
    load = f"1-min load average {result['load_avg_start'][0]:.2f} at the start, {result['load_avg_end'][0]:.2f} at the end"
    out = [f"<!-- nvila-edge bench: {key} -->",
           f"## `nvila-edge bench` — {result['target']} ({result['backend']}"
           + (f", {result['gpu']['device']}" if "gpu" in result else ", CPU") + f"), {result['date']}", "",
           f"Machine: {machine}. {v}. {load}. Whole run {result['seconds']:.0f} s"
           + (" (--quick)" if result.get("quick") else "") + ". Random weights "
           + (f"(preset, seed {result.get('seed', 0)})" if result.get("preset") else "(the bundle's)")
           + ". Iterations (medians): " + ", ".join(f"{k} {v}" for k, v in result.get("counts", {}).items()) + ".", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += [""] + [f"- {x}" for x in _bound_lines(result)]
    out += ["", "| target | ratio | needed | status |", "|---|---|---|---|"]
    out += [f"| {t['target']} | {_fmt(t['ratio'], 2)} | {t['needed']} | **{t['status']}** |" for t in result["targets"]]
    notes = _notes(result)
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    out += ["", f"![{key}]({png_name})", f"<!-- /nvila-edge bench: {key} -->"]
    return "\n".join(out) + "\n"


def write_docs(result: dict, md_path) -> Path:
    """Write / replace this run's section of ``md_path`` and its plot beside it; return the PNG path."""
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    png = md_path.parent / f"bench_{slug(result)}.png"
    plot(result, png)
    section = render_markdown(result, png.name)
    text = md_path.read_text() if md_path.is_file() else "# Benchmarks\n"
    key = re.escape(slug(result))
    pat = re.compile(rf"<!-- nvila-edge bench: {key} -->.*?<!-- /nvila-edge bench: {key} -->\n?", re.S)
    text = pat.sub(lambda _: section, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + section
    md_path.write_text(text)
    return png


def _bars(result: dict) -> list[tuple[str, list[tuple[str, float | None]]]]:
    if "gpu" in result:
        g = result["gpu"]
        return [("decode tok/s (higher is better)", [("torch backend", _get(g, "backend", "decode_tok_s")),
                                                     ("transformers eager", _get(g, "eager", "decode_tok_s"))]),
                ("prefill 512 ms (lower is better)", [("torch backend", _mul(_get(g, "backend", "prefill_s"))),
                                                      ("transformers eager", _mul(_get(g, "eager", "prefill_s")))]),
                ("vision ms / tile (lower is better)", [("torch eager", g.get("vision_ms"))])]
    o, t, gen = result.get("ort", {}), result.get("torch", {}), result.get("genai", {})
    return [("decode tok/s (higher is better)", [("ours ORT int4", _get(o, "llm", "decode_tok_s")),
                                                 ("onnxruntime-genai", _get(gen, "llm", "decode_tok_s")),
                                                 ("transformers bf16", _get(t, "llm_bfloat16", "decode_tok_s")),
                                                 ("transformers fp32", _get(t, "llm_float32", "decode_tok_s")),
                                                 ("bandwidth bound", result.get("ratios", {}).get("bound_tok_s"))]),
            (f"prefill {result['counts']['prefill']} tok, s (lower is better)",
             [("ours ORT int4", _get(o, "llm", "prefill_s")), ("onnxruntime-genai", _get(gen, "llm", "prefill_s")),
              ("transformers bf16", _get(t, "llm_bfloat16", "prefill_s")),
              ("transformers fp32", _get(t, "llm_float32", "prefill_s"))]),
            ("vision ms / tile (lower is better)", [("ORT INT8", o.get("vision_int8_ms")), ("ORT fp32", o.get("vision_fp32_ms")),
                                                    ("transformers fp32", t.get("vision_ms"))])]


def plot(result: dict, path) -> None:
    """Horizontal bar panels (one per metric), drawn with OpenCV."""
    import cv2

    panels = _bars(result)
    W, bar_h, label_w = 900, 26, 190
    H = 50 + sum(40 + bar_h * len(b) + 10 for _, b in panels)
    img = np.full((H, W, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    where = result["machine"].get("gpu") or result["machine"].get("cpu", "")
    title = f"nvila-edge bench: {result['target']} ({result['backend']}, {where}) {result['date']}"
    cv2.putText(img, title, (10, 30), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    colors = [(200, 120, 30), (60, 160, 60), (40, 110, 220), (60, 60, 200), (150, 150, 150)]  # BGR
    y = 50
    for name, bars in panels:
        y += 28
        cv2.putText(img, name, (10, y), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        y += 12
        top = max([v for _, v in bars if v] or [1.0])
        for i, (label, v) in enumerate(bars):
            cv2.putText(img, label, (10, y + 18), font, 0.45, (40, 40, 40), 1, cv2.LINE_AA)
            if v:
                x1 = label_w + int((W - label_w - 120) * v / top)
                cv2.rectangle(img, (label_w, y + 3), (max(x1, label_w + 1), y + bar_h - 3), colors[i % len(colors)], -1)
                cv2.putText(img, f"{v:,.2f}" if v < 10 else f"{v:,.0f}", (x1 + 6, y + 18), font, 0.45, (0, 0, 0), 1,
                            cv2.LINE_AA)
            else:
                cv2.putText(img, "not measured", (label_w + 6, y + 18), font, 0.45, (120, 120, 120), 1, cv2.LINE_AA)
            y += bar_h
        y += 10
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")


# ---- the quantized GPU comparison (bench_gpu.py measures it) ------------------------------------------------
def quant_ratios(g: dict) -> dict:
    """The quantized-path ratios (None where a side is missing)."""
    q_ms = _div(1000, _get(g, "w4a16", "llm", "decode_tok_s"))
    return {"w4a16_vs_fp16_graph": _div(_get(g, "w4a16", "llm", "decode_tok_s"), _get(g, "fp16_graph", "llm", "decode_tok_s")),
            "w4a16_ms_per_token": q_ms, "w4a16_vs_3ms": _div(3.0, q_ms),
            "fp16_graph_vs_eager": _div(_get(g, "fp16_graph", "llm", "decode_tok_s"), _get(g, "eager", "decode_tok_s")),
            "vision_w8a8_vs_fp16": _div(g.get("vision_ms"), g.get("vision_w8a8_ms")),
            "vision_cosine": g.get("vision_cosine"),
            "ttft_fp16_over_quant": _div(_get(g, "fp16_graph", "ttft_image", "ttft_ms"), _get(g, "w4a16", "ttft_image", "ttft_ms")),
            "fp16_graph_fraction_of_bound": _div(_get(g, "fp16_graph", "llm", "decode_tok_s"),
                                                 _div(g.get("bandwidth_gbs") and g["bandwidth_gbs"] * 1e9,
                                                      _get(g, "fp16_bytes_per_token", "total")))}


def quant_rows(g: dict) -> list[list[str]]:
    """Table rows: metric, W4A16/W8A8 (cuda target), fp16 CUDA graph, fp16 eager."""
    ms = lambda d: _div(1000, _get(d, "decode_tok_s"))  # noqa: E731
    q, f = g.get("w4a16") or {}, g.get("fp16_graph") or {}
    return [["vision ms / tile", _fmt(g.get("vision_w8a8_ms")) + " (W8A8)", _fmt(g.get("vision_ms")) + " (fp16)", "same"],
            [f"prefill {g.get('prefill_tokens', 512)} tok (ms)", _fmt(_mul(_get(q, "llm", "prefill_s"))),
             _fmt(_mul(_get(f, "llm", "prefill_s"))), _fmt(_mul(_get(g, "eager", "prefill_s")))],
            ["decode ms / token", _fmt(ms(q.get("llm")), 2), _fmt(ms(f.get("llm")), 2), _fmt(ms(g.get("eager")), 2)],
            ["decode tok/s", _fmt(_get(q, "llm", "decode_tok_s")), _fmt(_get(f, "llm", "decode_tok_s")),
             _fmt(_get(g, "eager", "decode_tok_s"))],
            ["TTFT 1 image (ms)", _ttft(q.get("ttft_image")), _ttft(f.get("ttft_image")), "–"],
            ["TTFT 8-frame video (ms)", _ttft(q.get("ttft_video")), _ttft(f.get("ttft_video")), "–"],
            ["peak GPU memory (MB)", _fmt(q.get("gpu_peak_mem_mb"), 0), _fmt(f.get("gpu_peak_mem_mb"), 0), "–"]]


QUANT_HEAD = ["metric", "cuda target (W4A16 LLM, W8A8 vision, CUDA graph)", "fp16 (CUDA graph)", "transformers eager fp16"]
