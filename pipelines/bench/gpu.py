"""GPU half of ``nvila-edge bench --backend torch``: fp16 and the ``cuda`` target's W4A16 / W8A8 in one run,
on the same weights.

    nvila-edge bench --preset nvila-lite-2b --backend torch --device cuda     # random weights
    nvila-edge bench BUNDLE --backend torch --device cuda                     # the bundle's cuda target

Measured: decode ms/token and tok/s for fp16 eager (transformers), fp16 CUDA graph (our torch backend) and
W4A16 CUDA graph (the cuda target); vision ms/tile fp16 vs W8A8 and the W8A8 features' cosine to the
fake-quant arithmetic (the same modules run on dequantized weights, ``kernels=False``); prefill 512; TTFT
for one image and an 8-frame video on both paths; peak GPU memory; the bandwidth bound (weight + KV bytes a
token reads / measured device bandwidth) and the fraction of it achieved.

For ``--preset`` the quantized tensors come from ``random_quantized_tensors`` below (RTN int4
with ModelOpt's formula, W8A8 with activation ranges measured on one random tile): kernel speed does not
depend on how the numbers were chosen. For a bundle the fp16 path is the cuda target's own weights,
dequantized. Runs on CPU too (the CPU kernels, eager decoding): the tests do, with ``--quick``.
"""

from __future__ import annotations

import numpy as np


def random_quantized_tensors(model, calibration_pixels=None, group_size: int = 128) -> dict:
    """A float model → the cuda target's layout without ModelOpt (benchmarks on random weights), on
    ``nvila_edge.quant_format``'s rules: the LLM's decoder linears int4 round-to-nearest (scale = amax / 7 per
    group), the vision tower's used linears W8A8 with per-channel weights and activation amax measured on
    ``calibration_pixels`` (no smoothing), the token table (and an untied LM head) int8 per row, the rest fp16.
    Not a calibration: use ``nvila-edge calibrate`` for real models."""
    import torch
    from torch import nn

    from nvila_edge import quant_format as qf

    out: dict[str, torch.Tensor] = {}
    amax: dict[str, float] = {}
    hooks = []
    vis = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("vision_tower.")]
    if calibration_pixels is not None:
        for n in vis:
            def hook(mod, args, name=n):
                amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))
            hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
        with torch.inference_mode():
            model.encode_tiles(calibration_pixels)
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            w = m.weight.detach().float().cpu()
            if name.startswith("llm.model.layers.") and w.shape[1] % group_size == 0:
                codes, scales = qf.quantize_int4_groups(w, group_size)
                out[f"{name}.qweight"], out[f"{name}.scales"] = qf.pack_int4(codes), scales
            elif name in amax:
                out[f"{name}.weight"], out[f"{name}.weight_scale"] = qf.quantize_int8_channels(w)
                out[f"{name}.input_amax"] = torch.tensor(amax[name])
            else:
                continue
            if m.bias is not None:
                out[f"{name}.bias"] = m.bias.detach().float().cpu()
        q, sc = qf.quantize_int8_rows(model.llm.get_input_embeddings().weight)
        out["llm.model.embed_tokens.weight"], out["llm.model.embed_tokens.scales"] = q, sc
        done = {k.rsplit(".", 1)[0] for k in out}
        for k, v in model.state_dict().items():
            mod = k.rsplit(".", 1)[0]
            if mod in done or k == "llm.lm_head.weight" and model.config.llm.tie_word_embeddings:
                continue
            if k == "llm.lm_head.weight":
                out[k], out["llm.lm_head.scales"] = qf.quantize_int8_rows(v)
                continue
            out[k] = v.detach().to(torch.float16).cpu() if v.is_floating_point() else v.detach().cpu()
    return {k: v.contiguous() for k, v in out.items()}


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
    """(config, make_fp16, make_quant): builders of the fp16 model and the quantized one (``kernels=False``: the
    fake-quant model) on the same weights, so each path holds only its own model on the device."""
    import torch

    from nvila_edge.bundle import Bundle
    from nvila_edge.modeling import quantized as Q

    from .timing import _config_tok, _torch_model

    cfg, _ = _config_tok(spec)
    qdtype = torch.bfloat16 if cuda else torch.float32
    fdtype = torch.float16 if cuda else torch.float32
    if spec.get("bundle"):
        b = Bundle.open(spec["bundle"])
        path = b.file("weights", "cuda")
        cfg = b.config

        def make_quant(kernels=True):
            return Q.load_quantized(cfg, path, device=dev, dtype=qdtype, kernels=kernels)

        def make_fp16():
            return Q.dequantize(Q.load_quantized(cfg, path, device=dev, kernels=False)).to(dev, fdtype).eval()
    else:
        cpu_fp32 = _torch_model(spec, device="cpu")  # random weights of the seed, float32, kept on the host
        s = cfg.vision.image_size
        px = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 3, s, s)).astype(np.float32))
        tensors = random_quantized_tensors(cpu_fp32, px)

        def make_quant(kernels=True):
            return Q.from_tensors(cfg, tensors, device=dev, dtype=qdtype, kernels=kernels)

        def make_fp16():
            import copy

            return copy.deepcopy(cpu_fp32).to(dev, fdtype).eval() if cuda else cpu_fp32.eval()
    return cfg, make_fp16, make_quant


def _release(cuda: bool) -> None:
    import gc

    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


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
    cfg, make_fp16, make_quant = _models(spec, dev, cuda)
    quant = make_quant()
    res = {"counts": n, "prefill_tokens": n["prefill"], "device": dev,
           "dtype": "float16" if cuda else "float32", "torch": torch.__version__,
           "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
           "quant_dtype": str(quant.dtype).replace("torch.", ""), "kernels": dict(quant.quant_modes)}
    s = cfg.vision.image_size
    log(f"  vision fp16 vs W8A8 on {dev}")
    enc = lambda m: (lambda x: m.encode_tiles(torch.from_numpy(x)))  # noqa: E731
    px = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 3, s, s)).astype(np.float32))
    with torch.inference_mode():
        res["vision_w8a8_ms"] = _time_tiles(enc(quant), s, n["vision_tiles"], sync)
        feats = quant.encode_tiles(px).float().cpu()
    if cuda:  # a step reads the whole static cache: the bucket _device_llm's request gets (cache_bucket)
        from nvila_edge.runtime.backends.cuda_graph import cache_bucket

        kv = cache_bucket(n["prefill"] + n["tokens"] + 2, cfg.llm.context_length)
    else:  # the dynamic cache reads what it holds, on average half-way through the decode
        kv = n["prefill"] + n["tokens"] // 2
    q_bytes = quant_bytes(quant, cfg, kv, 2 if cuda else 4)
    del quant
    _release(cuda)
    with torch.inference_mode():
        fake = make_quant(kernels=False)
        res["vision_cosine"] = _cosine(feats, fake.encode_tiles(px).float().cpu())
    del fake
    _release(cuda)
    fp16 = make_fp16()
    with torch.inference_mode():
        res["vision_ms"] = _time_tiles(enc(fp16), s, n["vision_tiles"], sync)
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
    fp16_bytes = report.torch_llm_bytes(fp16.llm, cfg, kv)
    del fp16  # one model resident at a time: each path's peak memory is its own
    _release(cuda)
    ours = run_path(make_quant(), "w4a16")
    res.update(fp16_graph=graph, w4a16=ours, backend=ours["llm"], describe=ours["describe"],
               ttft_image=ours["ttft_image"], ttft_video=ours["ttft_video"],
               gpu_peak_mem_mb=ours.get("gpu_peak_mem_mb"),
               bytes_per_token=q_bytes, fp16_bytes_per_token=fp16_bytes)
    if cuda:
        res["bandwidth_gbs"] = report.gpu_bandwidth_gbs(dev)
    res["peak_rss_mb"] = report.peak_rss_mb()
    return res


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


__all__ = ["phase_quantized", "phase_gpu", "quant_bytes", "random_quantized_tensors"]
