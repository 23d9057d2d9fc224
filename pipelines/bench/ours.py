"""Ours: the bundle through ``Runtime`` (on onnxruntime or openvino; its LLM on llama.cpp), timed the way a user runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import report
from .report import peak_rss_mb
from .timing import _backend_llm, _config_tok, _prompt_ids, _time_tiles, _ttft, cosine, log


def _runtime_bytes(spec: dict, kv_positions: int) -> dict:
    """What the runtime must hold: the cpu target's files (graphs + external weights + embedding table) and one
    cache's float32 KV for ``kv_positions`` (ONNX Runtime: the capacity it allocates up front; OpenVINO: the
    longest sequence it held, its state grows)."""
    folder = Path(spec["decoder"]).parent
    io = spec["decoder_io"]
    kv = 2 * int(io["num_layers"]) * int(io["num_kv_heads"]) * int(io["head_dim"]) * kv_positions * 4
    files = {Path(spec[k]).resolve() for k in ("vision_int8", "projector", "embeddings")} | \
        {f.resolve() for f in folder.iterdir() if f.name.startswith("decoder")}
    return {"weights": sum(f.stat().st_size for f in files if f.is_file()), "kv": kv, "kv_positions": kv_positions}


def _llm_and_ttft(rt, be, cfg, c: dict) -> dict:
    """What every "ours" row measures on its LLM engine, the same way: prefill + greedy decode through the step
    API, TTFT for one image and an 8-frame video through ``Runtime.generate``, then the process's peak RSS."""
    log(f"  LLM: prefill {c['prefill']}, decode {c['ort_tokens']} x {c['reps']}")
    res = {"llm": _backend_llm(be, _prompt_ids(cfg, c["prefill"]), c["ort_tokens"], c["reps"])}
    log("  TTFT image / 8-frame video")
    res["ttft_image"] = _ttft(rt, c["ttft_reps"], cfg, video=False)
    res["ttft_video"] = _ttft(rt, 1, cfg, video=True)
    res["runtime_peak_rss_mb"] = peak_rss_mb()
    return res


def phase_ort(spec: dict, backend: str = "onnxruntime") -> dict:
    """Ours: the bundle through ``Runtime`` on ``backend`` (vision, prefill, decode, TTFT, peak RSS), then the fp32
    vision graph on ONNX Runtime for the ratio and the feature cosine."""
    from nvila_edge.runtime import Runtime
    from nvila_edge.runtime.backends.onnxruntime import OrtBackend
    from nvila_edge.runtime.backends.onnxruntime import session as ort_session

    cfg, tok = _config_tok(spec)
    c = spec["counts"]
    if backend == "onnxruntime" and spec.get("vision_int8_kind", "").startswith("dynamic"):  # fp32 tower: our INT8 variant
        be = OrtBackend(cfg, spec["vision_int8"], spec["projector"], spec["decoder"], spec["embeddings"],
                        spec["decoder_io"], threads=spec["threads"])
        rt = Runtime(cfg, tok, be, limits=spec.get("limits"))
    else:  # the bundle as a user opens it; the tower on OpenVINO beside the ORT decoder when it is installed
        engine = "openvino" if backend == "onnxruntime" and spec.get("openvino") else None
        rt = Runtime.load(spec["bundle"], backend=backend, threads=spec["threads"], vision_engine=engine)
        be = rt.backend
    size = cfg.vision.image_size
    res = {"describe": be.describe(), "vision_int8_kind": spec.get("vision_int8_kind", "")}
    tower = (res["describe"].get("vision") or {}).get("engine", backend)  # what runs the vision graph
    log(f"  vision INT8 ({tower})")
    res["vision_int8_ms"] = _time_tiles(be.encode_tiles, size, c["vision_tiles"])
    res.update(_llm_and_ttft(rt, be, cfg, c))  # its peak RSS read before the fp32 comparison graph is loaded
    held = max(res["ttft_video"]["prompt_tokens"], c["prefill"] + c["ort_tokens"])
    res["runtime_bytes"] = _runtime_bytes(spec, be.capacity if backend == "onnxruntime" else held)
    if backend == "onnxruntime" and tower == "openvino":  # the same graph on ORT, for the record
        log("  the vision INT8 graph on ONNX Runtime")
        sess = ort_session(spec["vision_int8"], spec["threads"])
        name = sess.get_inputs()[0].name
        res["vision_int8_ort_ms"] = _time_tiles(lambda x: sess.run(None, {name: x}), size, c["vision_tiles"])
        del sess
    if spec.get("vision_fp32"):
        log("  vision fp32 ONNX")
        sess = ort_session(spec["vision_fp32"], spec["threads"])  # the runtime's session options
        name = sess.get_inputs()[0].name
        res["vision_fp32_ms"] = _time_tiles(lambda x: sess.run(None, {name: x}), size, c["vision_tiles"])
        tile = np.load(spec["calib_tiles"])[:1] if spec.get("calib_tiles") else \
            np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        res["vision_cosine_vs_fp32"] = cosine(be.encode_tiles(tile), sess.run(None, {name: tile})[0])
    return res


def phase_ours_llamacpp(spec: dict) -> dict:
    """Ours with the LLM on llama.cpp (``llm_engine="llamacpp"``: the bundle's gguf target) beside the same vision
    tower as the onnxruntime row; timed by the same helpers (``_llm_and_ttft``). The runtime's bytes count the GGUF's
    tensors but its token table (never read: the runtime feeds embeddings; mmapped, so not resident) and the f16 KV
    llama.cpp allocates for its whole context; the decode bound reads the same tensors + the KV of the mean length."""
    from nvila_edge.bundle import Bundle
    from nvila_edge.runtime import Runtime
    from nvila_edge.runtime.backends.llamacpp import LlamaCppBackend

    cfg, tok = _config_tok(spec)
    c = spec["counts"]
    b = Bundle.open(spec["bundle"])
    info, gguf = b.target("gguf")["io"]["llm"], b.file("llm", "gguf")
    engine = "openvino" if spec.get("openvino") else "onnxruntime"  # the tower the onnxruntime row runs
    if spec.get("vision_int8_kind", "").startswith("dynamic"):  # fp32 tower: the same INT8 variant as that row
        be = LlamaCppBackend(cfg, spec["vision_int8"], spec["projector"], gguf, spec["embeddings"], info,
                             threads=spec["threads"])
        rt = Runtime(cfg, tok, be, limits=spec.get("limits"))
    else:
        rt = Runtime.load(spec["bundle"], threads=spec["threads"], vision_engine=engine, llm_engine="llamacpp")
        be = rt.backend
    res = {"describe": be.describe()}
    res.update(_llm_and_ttft(rt, be, cfg, c))
    ctx = c["prefill"] + c["ort_tokens"] // 2  # mean KV length while decoding, as the onnxruntime row's bound
    res["bytes_per_token"] = report.gguf_bytes(gguf, info, ctx)
    kv = report.gguf_bytes(gguf, info, be.llm.n_ctx)["kv"]
    files = {Path(spec[k]).resolve() for k in ("vision_int8", "projector", "embeddings")}
    res["runtime_bytes"] = {"weights": sum(f.stat().st_size for f in files) + res["bytes_per_token"]["weights"],
                            "kv": kv, "kv_positions": be.llm.n_ctx}
    return res
