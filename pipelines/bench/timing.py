"""The measuring helpers of ``nvila-edge bench`` (timed tiles, transformers-eager and backend decode loops,
TTFT through the Runtime, the phases' model and tokenizer), shared by the CPU phases (``bench.py``) and the
GPU comparison (``gpu.py``)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

GPU = {"vision_tiles": 10, "prefill": 512, "tokens": 128, "reps": 3}  # a GPU step is ms: more of them


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def module_missing(name: str) -> bool:
    """Whether ``name`` cannot be imported, asked without importing it (an import here would raise the peak RSS
    every child inherits)."""
    if name in sys.modules:
        return sys.modules[name] is None  # a test's sys.modules[...] = None: as if not installed
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def cached(work: Path, name: str, build) -> None:
    """Run ``build`` unless a previous run finished it (a marker file is written after success)."""
    mark = work / f"{name}.done"
    if not mark.exists():
        t = time.perf_counter()
        build()
        mark.write_text(f"{time.perf_counter() - t:.1f} s\n")
        log(f"  built {name} in {time.perf_counter() - t:.0f} s")


# ---- measuring helpers -------------------------------------------------------------------------------------
def _median(xs) -> float:
    return round(float(statistics.median(xs)), 3)


def _time_tiles(fn, size: int, n: int, sync=lambda: None) -> float:
    """Median ms of one tile (batch 1) over ``n`` runs after a warm-up run."""
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    fn(x)
    sync()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn(x)
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return _median(times)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-token cosine of two feature arrays (..., C), as the GPU comparison and the calibration report."""
    a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, np.float64).reshape(-1, np.shape(b)[-1])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return round(float(cos.mean()), 5)


def _prompt_ids(cfg, n: int) -> np.ndarray:
    return np.random.default_rng(1).integers(10, min(cfg.llm.vocab_size, 400), n).astype(np.int64)


def _torch_llm(llm, ids: np.ndarray, n_tokens: int, reps: int = 1, sync=lambda: None) -> dict:
    """transformers eager: prefill ``ids`` then ``n_tokens`` greedy steps through the HF model's own cache."""
    import torch

    x = torch.as_tensor(ids, device=llm.device)[None]
    prefill, decode = [], []
    with torch.inference_mode():
        llm(input_ids=x[:, :16], use_cache=True, logits_to_keep=1)  # warm-up: allocator, kernels
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            out = llm(input_ids=x, use_cache=True, logits_to_keep=1)
            tok = out.logits[0, -1].argmax()
            sync()
            prefill.append(time.perf_counter() - t)
            cache, t = out.cache, time.perf_counter()
            for _ in range(n_tokens):
                out = llm(input_ids=tok.view(1, 1), cache=cache, use_cache=True)
                cache, tok = out.cache, out.logits[0, -1].argmax()
            sync()
            decode.append(n_tokens / (time.perf_counter() - t))
    return {"prefill_s": _median(prefill), "decode_tok_s": _median(decode), "tokens": n_tokens}


def _backend_llm(be, ids: np.ndarray, n_tokens: int, reps: int, sync=lambda: None) -> dict:
    """Our backend through the step API the Runtime drives: prefill the prompt's embeddings on a cache of its
    own, then greedy ``decode_step``s with the backend's own sampler (IOBinding on ORT; on CUDA the graph replay
    and the on-device pick, one id to the host per token)."""
    from nvila_edge.sampling import SamplingParams

    embeds = be.embed_tokens(ids)[None]
    pick = be.sampler(SamplingParams(max_new_tokens=n_tokens))  # greedy
    cache = be.new_cache(len(ids) + n_tokens)
    be.prefill(embeds[:, :16], cache)  # warm-up
    prefill, decode = [], []
    for _ in range(reps):
        cache.clear()
        sync()
        t = time.perf_counter()
        logits = be.prefill(embeds, cache)
        tok = pick(logits)
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n_tokens):
            tok = pick(be.decode_step(tok, cache))
        sync()
        decode.append(n_tokens / (time.perf_counter() - t))
    return {"prefill_s": _median(prefill), "decode_tok_s": _median(decode), "tokens": n_tokens}


def _device_llm(be, ids: np.ndarray, n_tokens: int, reps: int, sync=lambda: None) -> dict:
    """The torch backend's serving path, as ``Runtime.generate`` runs it: device embeddings, a cache of its own
    (static, with its captured decode graph, on CUDA), device logits read by the backend's sampler — one small
    copy a token, not all logits to the host. The first step (which captures the graph) is not timed."""
    from nvila_edge.sampling import SamplingParams

    prefill = be.prefill  # device logits
    decode = be.decode_step
    embeds = be.prompt_embeds(ids, [], [])
    cap = len(ids) + n_tokens + 2
    warm = be.new_cache(cap)  # warm-up: allocator, kernels
    prefill(embeds[:, :16], warm)
    decode(0, warm)
    pre, dec = [], []
    for _ in range(reps):
        cache, sample, seen = be.new_cache(cap), be.sampler(SamplingParams(max_new_tokens=n_tokens + 1)), []
        sync()
        t = time.perf_counter()
        logits = prefill(embeds, cache)
        seen.append(sample(logits, seen))
        pre.append(time.perf_counter() - t)
        logits = decode(seen[-1], cache)  # captures this cache's graph on CUDA
        sync()
        t = time.perf_counter()
        for _ in range(n_tokens):
            seen.append(sample(logits, seen))
            logits = decode(seen[-1], cache)
        sync()
        dec.append(n_tokens / (time.perf_counter() - t))
    return {"prefill_s": _median(pre), "decode_tok_s": _median(dec), "tokens": n_tokens, "path": "device"}


def _ttft(rt, reps: int, cfg, video: bool) -> dict:
    """Time to first token through ``Runtime.generate`` (preprocess + vision + prefill) on synthetic media."""
    rng = np.random.default_rng(2)
    s = cfg.vision.image_size
    media = [rng.integers(0, 256, (s, s, 3), np.uint8) for _ in range(8 if video else 1)]
    times, res = [], None
    for _ in range(reps):
        kw = {"video": media, "num_frames": 8} if video else {"images": media}
        res = rt.generate("What happens here?" if video else "Describe the image.", max_new_tokens=1, **kw)
        times.append(res.timings.ttft_ms)
    return {"ttft_ms": _median(times), "vision_ms": round(res.timings.vision_ms, 1),
            "prompt_tokens": res.usage.prompt_tokens, "visual_tokens": res.usage.visual_tokens,
            "tiles": sum(int(m.get("num_tiles") or m.get("num_frames") or 0) for m in res.plan.media)}


def _config_tok(spec):
    from nvila_edge import NVILAConfig, NVILATokenizer

    return (NVILAConfig.from_dict(json.loads(Path(spec["config"]).read_text())),
            NVILATokenizer.from_pretrained(spec["tokenizer"]))


def _torch_model(spec, device="cpu", dtype=None):
    import torch

    from nvila_edge import NVILAModel

    if spec["preset"]:
        cfg, _ = _config_tok(spec)
        torch.manual_seed(spec["seed"])  # the same seed gives the same weights in every phase and run
        with torch.device(device), torch.no_grad():
            model = NVILAModel(cfg).eval()
        return model.to(dtype) if dtype is not None else model
    if spec.get("checkpoint"):
        return NVILAModel.from_pretrained(spec["checkpoint"], dtype=dtype or torch.float32, device=device).eval()
    return None


def _backend_path(be, cfg, tok, ids: np.ndarray, n: dict, sync, ttft_reps: int) -> dict:
    """One torch-backend path of the GPU comparisons: its description, greedy prefill + decode, and TTFT for
    one image and an 8-frame video through a ``Runtime`` on it."""
    from nvila_edge.runtime import Runtime

    log(f"  LLM torch backend ({be.describe()['decode']})")
    out = {"describe": be.describe(), "llm": _device_llm(be, ids, n["tokens"], n["reps"], sync)}
    rt = Runtime(cfg, tok, be)
    out["ttft_image"] = _ttft(rt, ttft_reps, cfg, video=False)
    out["ttft_video"] = _ttft(rt, 1, cfg, video=True)
    return out
