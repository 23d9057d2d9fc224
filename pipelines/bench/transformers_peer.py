"""The transformers peer: the fp32 torch model's eager vision and fp32 / bf16 LLM, and the files the other peers
are built from (fp32 vision ONNX, HF folder for llama.cpp, fp32 decoder for OpenVINO, onnxruntime-genai's build)."""

from __future__ import annotations

import gc
from pathlib import Path

from . import report
from .timing import _prompt_ids, _time_tiles, _torch_llm, _torch_model, cached, log


def phase_torch(spec: dict) -> dict:
    import torch

    from nvila_edge.export.llm_onnx import export_decoder
    from nvila_edge.export.vision_onnx import export_vision

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    work, c = Path(spec["work"]), spec["counts"]
    art: dict = {}
    res: dict = {"artifacts": art}
    model = _torch_model(spec)
    if model is None:
        res["skipped"] = "the bundle has no torch target: no weights for the transformers baselines"
    else:
        size = model.config.vision.image_size
        if not spec.get("prepare"):
            log("  transformers eager fp32 vision")
            with torch.inference_mode():
                res["vision_ms"] = _time_tiles(lambda x: model.encode_tiles(torch.from_numpy(x)), size,
                                               c["torch_vision_tiles"])
        cached(work, "vision_fp32", lambda: export_vision(model, work, name="vision_fp32.onnx", example_tiles=1))
        art["vision_fp32"] = str(work / "vision_fp32.onnx")
        model.vision_tower = None  # the LLM phases below do not need its 1.6 GB
        gc.collect()
    if not spec.get("vision_int8") and (art.get("vision_fp32") or spec.get("vision_fp32")):
        src = art.get("vision_fp32") or spec["vision_fp32"]
        cached(work, "vision_int8", lambda: report.quantize_dynamic(src, work / "vision_int8.onnx"))
        art.update(vision_int8=str(work / "vision_int8.onnx"), vision_int8_kind="dynamic INT8 (quantize_dynamic)")
    if model is None:
        return res
    # the peers' inputs, from the same fp32 weights: an HF folder (llama.cpp's converter, optimum-intel's export),
    # an fp32 decoder ONNX (OpenVINO reads it, then NNCF compresses it)
    if spec.get("llamacpp") or spec.get("openvino_genai"):
        cached(work, "hf_llm", lambda: _save_hf(model.llm, spec, work / "hf_llm"))
        art["hf_llm"] = str(work / "hf_llm")
    if spec.get("openvino"):
        cached(work, "decoder_fp32", lambda: export_decoder(model, work / "decoder_fp32", precision="fp32"))
        art["decoder_fp32"] = str(work / "decoder_fp32" / "decoder.onnx")
    if spec["genai"]:
        try:
            cached(work, "genai", lambda: report.build_genai(model.llm, work / "genai"))
            art["genai_dir"] = str(work / "genai")
        except Exception as e:  # noqa: BLE001 - the peer is reported as skipped, the bench goes on
            res["genai_skipped"] = f"onnxruntime-genai builder failed: {type(e).__name__}: {e}"
    if spec.get("prepare"):
        return res
    ids = _prompt_ids(model.config, c["prefill"])
    for dtype in ("float32", "bfloat16"):
        log(f"  transformers eager {dtype} LLM: prefill {len(ids)}, decode {c['torch_tokens']}")
        model.llm.to(getattr(torch, dtype))
        res[f"llm_{dtype}"] = _torch_llm(model.llm, ids, c["torch_tokens"])
    return res


def _save_hf(llm, spec: dict, out: Path) -> None:
    """The Qwen2 LLM as a plain HF folder (config, safetensors, tokenizer files)."""
    from nvila_edge import NVILATokenizer

    llm.save_pretrained(out)
    NVILATokenizer.from_pretrained(spec["tokenizer"]).save_pretrained(out)
