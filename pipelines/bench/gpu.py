"""GPU half of ``nvila-edge bench --backend torch``: fp16 and the ``cuda`` target's W4A16 / W8A8 in one run,
on the same weights.

    nvila-edge bench --preset nvila-lite-2b --backend torch --device cuda     # random weights
    nvila-edge bench BUNDLE --backend torch --device cuda                     # the bundle's cuda target

Measured: decode ms/token and tok/s for fp16 eager (transformers), fp16 CUDA graph (our torch backend) and
W4A16 CUDA graph (the cuda target); vision ms/tile fp16 vs W8A8 and the W8A8 features' cosine to the
fake-quant arithmetic (the same modules run on dequantized weights, ``kernels=False``); prefill 512; TTFT
for one image and an 8-frame video on both paths; peak GPU memory; the bandwidth bound (weight + KV bytes a
token reads / measured device bandwidth) and the fraction of it achieved.

For ``--preset`` the quantized tensors come from ``modeling.quantized.random_quantized_tensors`` (RTN int4
with ModelOpt's formula, W8A8 with activation ranges measured on one random tile): kernel speed does not
depend on how the numbers were chosen. For a bundle the fp16 path is the cuda target's own weights,
dequantized. Runs on CPU too (the CPU kernels, eager decoding): the tests do, with ``--quick``.
"""

from __future__ import annotations


import numpy as np

# the comparison's report pieces live beside the rest of the report (report.py); imported here as before
from .report import QUANT_HEAD as HEAD  # noqa: F401
from .report import QUANT_TARGETS, quant_ratios as ratios, quant_rows as rows  # noqa: F401

def quant_bytes(model, cfg, kv_positions: int, kv_item: int = 2) -> dict:
    """Bytes one decode step of the quantized LLM reads: every LLM tensor but the token table (one row),
    the LM head's table, the KV cache."""
    import torch

    from nvila_edge.modeling.quantized import Int8Head

    seen, weights = set(), 0
    for name, t in list(model.llm.named_parameters()) + list(model.llm.named_buffers()):
        if "embed_tokens" in name or id(t) in seen or t is None:
            continue
        seen.add(id(t))
        weights += t.numel() * t.element_size()
    head = model.llm.lm_head
    if isinstance(head, Int8Head):
        dense = getattr(head, "_dense", None)
        weights += dense.numel() * dense.element_size() if head.mode == "dense" else \
            head.source.weight.numel() + head.source.scales.numel() * 4
    for m in model.llm.modules():  # dense fallbacks read their dense copy instead of the codes
        d = getattr(m, "_dense", None)
        if isinstance(d, torch.Tensor) and not isinstance(m, Int8Head) and getattr(m, "mode", "") == "dense":
            weights += d.numel() * d.element_size()
    k = cfg.llm
    kv = 2 * k.num_hidden_layers * k.num_key_value_heads * (k.hidden_size // k.num_attention_heads) * kv_positions * kv_item
    return {"weights": int(weights), "kv": int(kv), "total": int(weights + kv), "kv_positions": kv_positions}


def _cosine(a, b) -> float:
    import torch

    a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
    return round(float(torch.nn.functional.cosine_similarity(a, b).mean()), 5)


def _models(spec, dev, cuda):
    """(fp16 model, quantized model, fake-quant model) on the same weights."""
    import torch

    from nvila_edge.bundle import Bundle
    from nvila_edge.modeling import quantized as Q

    from .timing import _config_tok, _torch_model

    cfg, _ = _config_tok(spec)
    qdtype = torch.bfloat16 if cuda else torch.float32
    if spec.get("bundle"):
        b = Bundle.open(spec["bundle"])
        path = b.file("weights", "cuda")
        quant = Q.load_quantized(b.config, path, device=dev, dtype=qdtype)
        fake = Q.load_quantized(b.config, path, device=dev, dtype=qdtype, kernels=False)
        fp16 = Q.dequantize(Q.load_quantized(b.config, path, device=dev, kernels=False))
    else:
        fp16 = _torch_model(spec, device="cpu")  # random weights of the seed, float32
        s = cfg.vision.image_size
        px = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 3, s, s)).astype(np.float32))
        tensors = Q.random_quantized_tensors(fp16, px)
        quant = Q.from_tensors(cfg, tensors, device=dev, dtype=qdtype)
        fake = Q.from_tensors(cfg, tensors, device=dev, dtype=qdtype, kernels=False)
        del tensors
    fp16 = fp16.to(dev, torch.float16 if cuda else torch.float32).eval()
    return cfg, fp16, quant, fake


def phase_quantized(spec: dict, quick: bool = False) -> dict:
    """The whole GPU comparison in this process; the result goes to ``result["gpu"]``."""
    import torch

    from nvila_edge.runtime.backends.torch import TorchBackend

    from . import report
    from .timing import GPU, _backend_path, _config_tok, _prompt_ids, _time_tiles, _torch_llm, log

    dev = spec["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.startswith("cuda")
    n = dict(GPU, vision_tiles=2, tokens=8, reps=1, prefill=64) if quick else GPU
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    _, tok = _config_tok(spec)
    cfg, fp16, quant, fake = _models(spec, dev, cuda)
    res = {"counts": n, "prefill_tokens": n["prefill"], "device": dev, "dtype": str(fp16.dtype).replace("torch.", ""), "torch": torch.__version__,
           "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
           "quant_dtype": str(quant.dtype).replace("torch.", ""), "kernels": dict(quant.quant_modes)}
    s = cfg.vision.image_size
    log(f"  vision fp16 vs W8A8 on {dev}")
    with torch.inference_mode():
        enc = lambda m: (lambda x: m.encode_tiles(torch.from_numpy(x)))  # noqa: E731
        res["vision_ms"] = _time_tiles(enc(fp16), s, n["vision_tiles"], sync)
        res["vision_w8a8_ms"] = _time_tiles(enc(quant), s, n["vision_tiles"], sync)
        px = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 3, s, s)).astype(np.float32))
        res["vision_cosine"] = _cosine(quant.encode_tiles(px), fake.encode_tiles(px))
    del fake
    if cuda:
        torch.cuda.empty_cache()
    ids = _prompt_ids(cfg, n["prefill"])
    log("  LLM fp16 transformers eager")
    res["eager"] = _torch_llm(fp16.llm, ids, n["tokens"], n["reps"], sync)

    def run_path(model, key):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        log(f"  {key}:")
        out = _backend_path(TorchBackend(model, device=dev), cfg, tok, ids, n, sync, ttft_reps=1 if quick else 3)
        if cuda:
            out["gpu_peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out

    graph = run_path(fp16, "fp16")
    ours = run_path(quant, "w4a16")
    kv = n["prefill"] + n["tokens"] // 2
    res.update(fp16_graph=graph, w4a16=ours, backend=ours["llm"], describe=ours["describe"],
               ttft_image=ours["ttft_image"], ttft_video=ours["ttft_video"],
               gpu_peak_mem_mb=ours.get("gpu_peak_mem_mb"),
               bytes_per_token=quant_bytes(quant, cfg, kv, 2 if cuda else 4),
               fp16_bytes_per_token=report.torch_llm_bytes(fp16.llm, cfg, kv))
    if cuda:
        res["bandwidth_gbs"] = report.gpu_bandwidth_gbs(dev)
    res["peak_rss_mb"] = report.peak_rss_mb()
    return res


__all__ = ["phase_quantized", "ratios", "rows", "quant_bytes", "QUANT_TARGETS", "HEAD"]


def phase_gpu(spec: dict, quick: bool = False) -> dict:
    """Torch on one device (fp16 on cuda): transformers eager vs our torch backend (CUDA-graph decode)."""
    import torch

    from . import report
    from .timing import GPU, _backend_path, _config_tok, _prompt_ids, _time_tiles, _torch_llm, _torch_model, log

    from nvila_edge.runtime.backends.torch import TorchBackend

    dev = spec["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.startswith("cuda")
    n = dict(GPU, vision_tiles=2, tokens=8, reps=1) if quick else GPU
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg, tok = _config_tok(spec)
    dtype = torch.float16 if cuda else torch.float32
    model = _torch_model(spec, device=dev, dtype=dtype)
    res = {"counts": n, "device": dev, "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
           "gpu_name": torch.cuda.get_device_name(0) if cuda else None}
    log(f"  vision eager on {dev}")
    with torch.inference_mode():
        res["vision_ms"] = _time_tiles(lambda x: model.encode_tiles(torch.from_numpy(x).to(dev, dtype)),
                                       cfg.vision.image_size, n["vision_tiles"], sync)
    ids = _prompt_ids(cfg, n["prefill"])
    log("  LLM transformers eager")
    res["eager"] = _torch_llm(model.llm, ids, n["tokens"], n["reps"], sync)
    path = _backend_path(TorchBackend(model, device=dev), cfg, tok, ids, n, sync, ttft_reps=2)
    res.update(describe=path["describe"], backend=path["llm"], ttft_image=path["ttft_image"],
               ttft_video=path["ttft_video"])
    res["bytes_per_token"] = report.torch_llm_bytes(model.llm, cfg, n["prefill"] + n["tokens"] // 2)
    if cuda:
        res["bandwidth_gbs"] = report.gpu_bandwidth_gbs(dev)
        res["gpu_peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    res["peak_rss_mb"] = report.peak_rss_mb()
    return res
