"""The OpenVINO peer of ``nvila-edge bench``, on the same weights:

- vision: the fp32 SigLIP ONNX read by OpenVINO and quantized to INT8 by NNCF post-training quantization
  (``model_type=TRANSFORMER``) on the calibration tiles our ModelOpt recipe saw; ms / tile and the feature
  cosine vs the fp32 graph.
- LLM: the fp32 Qwen2 decoder ONNX (our exporter's; OpenVINO reads its com.microsoft ops) compressed by NNCF
  to INT4 (asymmetric, group 128, every layer, NNCF's default int8 backup for the embedding / LM head),
  made *stateful* (the KV cache lives inside the plugin, as optimum-intel's models do), and timed by a
  greedy loop: prefill, then one token at a time.

Three phases, each its own interpreter: ``openvino_build`` (vision: convert + NNCF, cached IR),
``openvino_vision`` (timing) and ``openvino_llm`` (convert + NNCF + timing: OpenVINO cannot serialize the
GroupQueryAttention op its ONNX reader makes, so the INT4 model is built in the process that runs it; its peak
RSS is read after the build, from a reset high-water mark).
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import numpy as np

from .timing import _config_tok, _median, _prompt_ids, _time_tiles, cached, cosine, log

GROUP = 128


def available() -> str | None:
    """None when openvino + nncf import, else why not."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as e:  # also what a test's sys.modules[...] = None gives
        return f"openvino / nncf not installed ({e}); pip install 'nvila-edge[bench]'"
    return None


def _config(threads) -> dict:
    cfg = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = str(int(threads))
    return cfg


def _vision_ir(spec) -> Path:
    return Path(spec["work"]) / "openvino" / "vision_int8.xml"


def typed_empty_inputs(model):
    """GroupQueryAttention's absent optional inputs come out of the ONNX reader as empty constants of *dynamic*
    element type, which NNCF refuses ("not yet supported OpenVINO data type: dynamic"): give them f32."""
    import openvino as ov
    import openvino.opset13 as ops

    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.dynamic:
            empty = ops.constant(np.zeros((0,), np.float32)).output(0)
            for user in list(op.output(0).get_target_inputs()):
                user.replace_source_output(empty)
    model.validate_nodes_and_infer_types()
    return model


def phase_openvino_build(spec: dict) -> dict:
    import nncf
    import openvino as ov

    vis = _vision_ir(spec)
    vis.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {"ov-llm": "ok" if spec.get("decoder_fp32") else "skipped: no fp32 decoder ONNX to compress"}

    def vision():
        tiles = np.load(spec["calib_tiles"])
        model = ov.convert_model(spec["vision_fp32"])
        data = nncf.Dataset([t[None] for t in tiles])
        q = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(tiles))
        ov.save_model(q, str(vis), compress_to_fp16=False)

    for name, build, need in (("ov-vision", vision, ("vision_fp32", "calib_tiles")),):
        if not all(spec.get(k) for k in need):
            res[name] = f"skipped: no {' / '.join(need)} to build it from"
            continue
        try:
            cached(vis.parent, name, build)
            res[name] = "ok"
        except Exception as e:  # noqa: BLE001 - reported as the peer's row
            res[name] = f"failed: {type(e).__name__}: {str(e)[:400]}"
    return res



def phase_openvino_vision(spec: dict) -> dict:
    import onnxruntime as ort
    import openvino as ov

    vis = _vision_ir(spec)
    cfg, _ = _config_tok(spec)
    compiled = ov.Core().compile_model(str(vis), "CPU", _config(spec["threads"]))
    req = compiled.create_infer_request()

    def run(x):
        req.infer({0: x})
        return req.get_output_tensor(0).data

    ms = _time_tiles(run, cfg.vision.image_size, spec["counts"]["vision_tiles"])
    tile = np.load(spec["calib_tiles"])[:1]
    fp32 = ort.InferenceSession(spec["vision_fp32"], providers=["CPUExecutionProvider"])
    ref = fp32.run(None, {fp32.get_inputs()[0].name: tile})[0]
    return {"vision_int8_ms": ms, "cosine_vs_fp32": cosine(run(tile).copy(), ref),
            "precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string()}


def stateful_decoder(onnx_path, io: dict, hidden: int, threads):
    """The fp32 decoder ONNX → NNCF INT4 → past / present pairs turned into plugin state (batch 1) → compiled.
    Built here, not cached as IR: OpenVINO cannot serialize the GroupQueryAttention op its ONNX reader makes."""
    import nncf
    import openvino as ov
    from openvino._offline_transformations import apply_make_stateful_transformation

    core = ov.Core()
    model = typed_empty_inputs(ov.convert_model(str(onnx_path)))
    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=GROUP, ratio=1.0)
    n, kv, hd = int(io["num_layers"]), int(io["num_kv_heads"]), int(io["head_dim"])
    pairs = {io[f"past_{k}"].format(i=i): io[f"present_{k}"].format(i=i) for i in range(n) for k in ("key", "value")}
    shapes = {io["inputs_embeds"]: [1, -1, hidden], io["attention_mask"]: [1, -1]}
    shapes.update({p: [1, kv, -1, hd] for p in pairs})
    model.reshape(shapes)  # a static batch: the state's initial value needs it
    apply_make_stateful_transformation(model, pairs)
    return core.compile_model(model, "CPU", _config(threads))


def phase_openvino_llm(spec: dict) -> dict:
    from nvila_edge.embeddings import load_embeddings

    cfg, _ = _config_tok(spec)
    c, io = spec["counts"], spec["decoder_io"]
    table = load_embeddings(spec["embeddings"])
    t = time.perf_counter()
    compiled = stateful_decoder(spec["decoder_fp32"], io, cfg.llm.hidden_size, spec["threads"])
    build_s = time.perf_counter() - t
    gc.collect()
    _reset_peak()  # the engine's own peak from here on, not the fp32 graph NNCF compressed
    req = compiled.create_infer_request()
    ids = _prompt_ids(cfg, c["prefill"])
    embeds = table(ids)[None].astype(np.float32)
    mask = np.ones((1, len(ids) + c["peer_tokens"] + 1), np.int64)
    names = (io["inputs_embeds"], io["attention_mask"])

    def step(x, total):
        req.infer({names[0]: x, names[1]: mask[:, :total]})
        return req.get_output_tensor(0).data[0, -1]

    req.reset_state()
    step(embeds[:, :16], 16)  # warm-up
    prefill, decode = [], []
    for _ in range(c["reps"]):
        req.reset_state()
        t = time.perf_counter()
        logits = step(embeds, len(ids))
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        for k in range(c["peer_tokens"]):
            x = table(np.asarray([int(np.argmax(logits))]))[None].astype(np.float32)
            logits = step(x, len(ids) + k + 1)
        decode.append(c["peer_tokens"] / (time.perf_counter() - t))
    log(f"  OpenVINO INT4: prefill {_median(prefill):.2f} s, decode {_median(decode):.1f} tok/s")
    return {"llm": {"prefill_s": _median(prefill), "decode_tok_s": _median(decode), "tokens": c["peer_tokens"]},
            "build_s": round(build_s, 1), "engine_peak_rss_mb": _hwm_mb(), "threads": spec["threads"] or os.cpu_count()}


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux; a no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _hwm_mb() -> float | None:
    try:
        kb = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        return round(int(kb.split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        return None
