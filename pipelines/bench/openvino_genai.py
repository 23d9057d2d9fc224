"""OpenVINO's own LLM path as a peer of ``nvila-edge bench``: the same Qwen2 weights (the HF folder the torch phase
writes) exported by optimum-intel (``optimum-cli export openvino --task text-generation-with-past --weight-format
int4 --group-size 128 --ratio 1.0``: int4 weights, stateful KV, the tokenizer as OpenVINO models) and run by
openvino-genai's ``LLMPipeline`` — its own generation loop and sampler, as an OpenVINO user runs an LLM. It takes
token ids (no embeddings input), so it is an LLM-table peer only; prefill is its TTFT (prompt + first token), decode
its mean time per output token after the first (its own ``perf_metrics``).

optimum-intel cannot live in this environment (``OPTIMUM_CONFLICT``): the export runs from a side venv's
``optimum-cli`` that ``--optimum-cli PATH`` names; without it, or without openvino-genai, the row says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .timing import _config_tok, _median, _prompt_ids, cached, log, module_missing

NAME = "OpenVINO GenAI (optimum-intel int4)"
GROUP = 128
GENAI_PIN = "openvino-genai==2026.4.1.0 openvino-tokenizers==2026.4.1.0"  # the wheels that match openvino 2026.4.1
OPTIMUM_CONFLICT = ("optimum-intel cannot join this env: 2.2.0 caps transformers<5.6 and huggingface-hub<1.22, its "
                    "import fails on transformers 5.25; pip's unpinned pick 1.15.0 fails on `openvino.runtime`")
IR_FILES = ("openvino_model.xml", "openvino_model.bin")


def missing(optimum_cli: str | None) -> str | None:
    """Why the peer cannot run here (None when it can)."""
    if not optimum_cli:
        return (f"needs --optimum-cli PATH, a side venv's optimum-cli (pip install optimum-intel there; "
                f"{OPTIMUM_CONFLICT})")
    p = Path(optimum_cli).expanduser()
    if not (p.is_file() and os.access(p, os.X_OK)):
        return f"--optimum-cli {optimum_cli} is not an executable file"
    if module_missing("openvino_genai"):
        return f"openvino-genai is not installed (pip install {GENAI_PIN})"
    return None


def group_size(hidden: int) -> int:
    """128 (the issue's setting) where it divides the hidden size; a small test config gets the largest that does."""
    return next(g for g in (GROUP, 64, 32, 16, 8) if hidden % g == 0)


def export_ir(cli: str, hf_dir: Path, out: Path, group: int, timeout_s: float = 3 * 3600) -> Path:
    """optimum-cli → ``out`` (written beside it, moved in place when complete: a failed export leaves no IR)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [str(Path(cli).expanduser()), "export", "openvino", "-m", str(hf_dir), "--task", "text-generation-with-past",
           "--weight-format", "int4", "--group-size", str(group), "--ratio", "1.0", str(tmp)]
    log_path = out.with_name("optimum-export.log")
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
    gone = [f for f in IR_FILES if not (tmp / f).is_file()]
    if rc != 0 or gone:
        shutil.rmtree(tmp, ignore_errors=True)
        last = [x for x in log_path.read_text(errors="replace").splitlines() if x.strip()] or ["no output"]
        what = f"exited {rc}: {last[-1][:300]}" if rc else f"left no {', '.join(gone)}"
        raise RuntimeError(f"optimum-cli {what} (log: {log_path})")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _generate(pipe, ids, n: int) -> dict:
    """Greedy ``n`` tokens (no early stop) from token ids; genai's own TTFT / TPOT (ms)."""
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    x = np.asarray([ids], dtype=np.int64)
    cfg = og.GenerationConfig()
    cfg.max_new_tokens = cfg.min_new_tokens = n
    cfg.ignore_eos, cfg.do_sample = True, False
    pm = pipe.generate(og.TokenizedInputs(ov.Tensor(x), ov.Tensor(np.ones_like(x))), cfg).perf_metrics
    return {"ttft_ms": pm.get_ttft().mean, "tpot_ms": pm.get_tpot().mean, "generated": pm.get_num_generated_tokens()}


def phase_openvino_genai(spec: dict) -> dict:
    """Export (cached), then LLMPipeline: a warm-up, then ``reps`` greedy runs of prompt + ``peer_tokens``."""
    import openvino_genai as og

    cfg, _ = _config_tok(spec)
    c = spec["counts"]
    group = group_size(cfg.llm.hidden_size)
    out = Path(spec["work"]) / "openvino_genai" / f"int4-g{group}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        cached(out.parent, out.name, lambda: export_ir(spec["optimum_cli"], Path(spec["hf_llm"]), out, group))
    except Exception as e:  # noqa: BLE001 - a peer that fails to build is its row
        return {"error": f"optimum-intel export failed: {type(e).__name__}: {str(e)[:500]}"}
    if spec.get("prepare"):
        return {"prepared": str(out)}
    props = {"INFERENCE_NUM_THREADS": int(spec["threads"])} if spec["threads"] else {}
    pipe = og.LLMPipeline(str(out), "CPU", **props)
    ids = _prompt_ids(cfg, c["prefill"]).tolist()
    _generate(pipe, ids[:16], 2)  # warm-up
    runs = [_generate(pipe, ids, c["peer_tokens"] + 1) for _ in range(c["reps"])]  # + 1: the first is the TTFT's
    llm = {"prefill_s": _median([r["ttft_ms"] / 1000 for r in runs]),
           "decode_tok_s": _median([1000 / r["tpot_ms"] for r in runs]), "tokens": c["peer_tokens"]}
    log(f"  {NAME}: prefill {llm['prefill_s']:.2f} s, decode {llm['decode_tok_s']:.1f} tok/s")
    return {"name": NAME, "llm": llm, "group_size": group, "ratio": 1.0, "ir": str(out),
            "generated": runs[-1]["generated"]}
