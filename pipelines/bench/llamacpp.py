"""The llama.cpp peer of ``nvila-edge bench``: the same Qwen2 weights (the HF folder the torch phase writes from
the random-weight LLM) converted by llama.cpp's own ``convert_hf_to_gguf.py`` to an f16 GGUF, quantized by
``llama-quantize`` to Q4_0 and Q4_K_M, and timed by ``llama-bench`` (prompt 512, decode) — what a CPU user of
llama.cpp runs. Each quantization runs in its own process; its peak RSS is the child's ``ru_maxrss``.

Where the tools come from: ``--llama-cpp PATH`` (the ``llama-bench`` binary, its build folder or the source
tree), else ``llama-bench`` on PATH. ``llama-quantize`` is looked up beside ``llama-bench`` and the converter in
the source tree above it (llama-cpp-python's sdist ships it under ``vendor/llama.cpp``). Without the binaries
but with ``llama-cpp-python`` installed, the same library quantizes (``llama_model_quantize``) and a child
interpreter times it (``Llama.eval``: the prompt in one batch, then one token at a time); ``--llama-cpp`` then
names the source tree for the converter. Without them the peer is a row saying what is missing, never an error
of the bench.

The converter is run unchanged except for one patch: it refuses a BPE tokenizer whose pre-tokenizer hash it
does not know, and the bench's random-weight model has a small trained BPE (same Qwen2 split regex, padded to
the real vocabulary size), so it is told the pre-tokenizer is ``qwen2`` — which it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from .timing import cached, module_missing

QUANTS = ("Q4_0", "Q4_K_M")
_CONVERT = "convert_hf_to_gguf.py"
# run the converter with the vendored gguf-py and the qwen2 pre-tokenizer (see the module docstring)
_WRAPPER = """
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src + "/gguf-py", src]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _find_convert(dirs) -> Path | None:
    return next((d / _CONVERT for d in dirs if (d / _CONVERT).is_file()), None)


def _python_tools(hint: str | None) -> dict:
    """llama-cpp-python as the runner; the converter from the source tree ``hint`` names."""
    if module_missing("llama_cpp"):
        return {}
    p = Path(hint).expanduser() if hint else None
    convert = _find_convert([p, p / "vendor" / "llama.cpp", *p.parents][:6]) if p else None
    if convert is None:
        return {"missing": f"llama-cpp-python is installed but not llama.cpp's {_CONVERT}: pass --llama-cpp SRC, a "
                           "llama.cpp source tree (e.g. vendor/llama.cpp of the llama-cpp-python sdist)"}
    return {"runner": "llama-cpp-python", "convert": str(convert)}


def find_tools(hint: str | None) -> dict:
    """{"bench", "quantize", "convert"} paths (or the llama-cpp-python runner), or {"missing": why}."""
    cands: list[Path] = []
    if hint:
        p = Path(hint).expanduser()
        if p.is_file():
            cands.append(p.parent)
        cands += [p, p / "bin", p / "build" / "bin", p / "vendor" / "llama.cpp" / "build" / "bin"]
    on_path = shutil.which("llama-bench")
    if on_path:
        cands.append(Path(on_path).parent)
    bin_dir = next((d for d in cands if (d / "llama-bench").is_file() and os.access(d / "llama-bench", os.X_OK)), None)
    if bin_dir is None:
        py = _python_tools(hint)
        if py:
            return py
        where = f" at {hint}" if hint else " (pass --llama-cpp PATH to a llama-bench binary or llama.cpp build)"
        return {"missing": f"llama.cpp's llama-bench not found{where}, nor llama-cpp-python"}
    if not (bin_dir / "llama-quantize").is_file():
        return {"missing": f"llama-quantize not found beside {bin_dir / 'llama-bench'} (build it: "
                           "cmake --build build --target llama-quantize llama-bench)"}
    convert = _find_convert([bin_dir, *bin_dir.parents][:5])
    if convert is None:
        return {"missing": f"llama.cpp's {_CONVERT} not found in the source tree above {bin_dir}"}
    return {"bench": str(bin_dir / "llama-bench"), "quantize": str(bin_dir / "llama-quantize"), "convert": str(convert)}


def _run(cmd: list[str], log_path: Path) -> None:
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        lines = [x for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
        what = Path(cmd[0]).name if cmd[0] != sys.executable else \
            ("convert_hf_to_gguf.py" if cmd[1] == "-c" else "llama_model_quantize")
        raise RuntimeError(f"{what} failed (exit {rc}): {(lines or ['no output'])[-1][:300]} (log: {log_path})")


def build_ggufs(tools: dict, hf_dir: Path, out: Path) -> dict[str, Path]:
    """f16 GGUF (llama.cpp's converter) → each of QUANTS (llama-quantize); cached by marker files."""
    out.mkdir(parents=True, exist_ok=True)
    f16 = out / "model-f16.gguf"
    src = str(Path(tools["convert"]).parent)
    cached(out, "gguf-f16", lambda: _run([sys.executable, "-c", _WRAPPER, src, str(hf_dir), "--outtype", "f16",
                                           "--outfile", str(f16)], out / "convert.log"))
    files = {}
    for q in QUANTS:
        dst = out / f"model-{q}.gguf"
        cmd = [tools["quantize"], str(f16), str(dst), q] if "quantize" in tools else \
            [sys.executable, "-m", __name__, "quantize", str(f16), str(dst), q]
        cached(out, f"gguf-{q}", lambda cmd=cmd: _run(cmd, out / f"quantize-{q}.log"))
        files[q] = dst
    return files


def _maxrss_child(cmd: list[str]):
    """Run ``cmd``; (returncode, stdout, stderr, peak RSS MB of that child alone)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = [], []
    # communicate() would reap the child itself and lose its rusage: read the pipes, then wait4
    t_err = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    t_err.start()
    out.append(proc.stdout.read())
    t_err.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out[0], err[0], round(usage.ru_maxrss / 1024, 1)


def bench_quant(tools: dict, gguf: Path, threads: int, prompt: int, tokens: int, reps: int) -> dict:
    if "bench" in tools:
        cmd = [tools["bench"], "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(tokens),
               "-r", str(reps), "-o", "json"]
    else:
        cmd = [sys.executable, "-m", __name__, "time", str(gguf), str(threads), str(prompt), str(tokens), str(reps)]
    rc, out, err, rss = _maxrss_child(cmd)
    if rc != 0:
        what = "llama-bench" if "bench" in tools else "llama-cpp-python"
        raise RuntimeError(f"{what} exited {rc}: {(err.strip().splitlines() or ['no output'])[-1][-400:]}")
    rows = json.loads(out)
    pp = next(r for r in rows if r.get("n_prompt") and not r.get("n_gen"))
    tg = next(r for r in rows if r.get("n_gen") and not r.get("n_prompt"))
    return {"prefill_s": round(prompt / pp["avg_ts"], 3), "prompt_tok_s": round(pp["avg_ts"], 1),
            "decode_tok_s": round(tg["avg_ts"], 2), "tokens": tokens, "peak_rss_mb": rss,
            "file_mb": round(gguf.stat().st_size / 2**20, 1), "build": pp.get("build_commit")}


def phase_llamacpp(spec: dict) -> dict:
    """Convert + quantize (cached), then one llama-bench process per quantization. Each failure is its row."""
    tools = find_tools(spec.get("llama_cpp"))
    if "missing" in tools:
        return {"skipped": tools["missing"]}
    c = spec["counts"]
    threads = int(spec["threads"] or os.cpu_count() or 2)
    try:
        files = build_ggufs(tools, Path(spec["hf_llm"]), Path(spec["work"]) / "gguf")
    except Exception as e:  # noqa: BLE001 - a peer that fails to build is reported, the bench goes on
        return {"error": f"GGUF conversion failed: {type(e).__name__}: {str(e)[:500]}"}
    if spec.get("prepare"):
        return {"prepared": {q: str(p) for q, p in files.items()}}
    res: dict = {"tools": tools, "quants": {}}
    for q, path in files.items():
        try:
            res["quants"][q] = bench_quant(tools, path, threads, c["prefill"], c["peer_tokens"], c["reps"])
        except Exception as e:  # noqa: BLE001
            res["quants"][q] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    return res


# ---- the llama-cpp-python runner (child interpreters: python -m nvila_edge.pipelines.bench.llamacpp ...) -
def _quantize_main(src: str, dst: str, quant: str) -> int:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    return 0 if rc == 0 else 1


def _time_main(gguf: str, threads: str, prompt: str, tokens: str, reps: str) -> int:
    """Prompt (one batch) and decode (one token a step) tok/s, printed as llama-bench's JSON rows."""
    import time

    import numpy as np
    from llama_cpp import Llama

    t, p, n, r = int(threads), int(prompt), int(tokens), int(reps)
    llm = Llama(model_path=gguf, n_ctx=p + n + 16, n_batch=p, n_ubatch=p, n_threads=t, n_threads_batch=t, verbose=False)
    ids = np.random.default_rng(1).integers(10, min(llm.n_vocab(), 400), p).tolist()
    llm.eval(ids[:16])  # warm-up
    pp, tg = [], []
    for _ in range(r):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        pp.append(p / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([ids[0]])
        tg.append(n / (time.perf_counter() - t0))
    import llama_cpp

    print(json.dumps([{"n_prompt": p, "n_gen": 0, "avg_ts": sum(pp) / r, "build_commit": f"llama-cpp-python {llama_cpp.__version__}"},
                      {"n_prompt": 0, "n_gen": n, "avg_ts": sum(tg) / r}]))
    return 0


if __name__ == "__main__":
    sys.exit({"quantize": _quantize_main, "time": _time_main}[sys.argv[1]](*sys.argv[2:]))
