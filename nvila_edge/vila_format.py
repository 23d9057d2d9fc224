"""The VILA / ``-hf`` ``config.json`` mapping: an ``NVILAConfig`` to the published dicts and back, and the
reference's rule for the media / end token ids (the checkpoint's tokenizer gives them).

Functions on plain dicts and sub-configs, so ``config.py`` holds the model description only."""

from __future__ import annotations

import json
from typing import Any

from .errors import ConfigError
from .subconfigs import (ASPECT_MODES, QWEN2_NEWLINE_ID, LLMConfig, PreprocessingConfig, ProjectorConfig, VideoConfig,
                         VisionConfig)


def to_vila_dict(config) -> dict:
    """Top-level VILA ``config.json`` (``LlavaLlamaModel``) with the sub-configs inline."""
    p, v = config.preprocessing, config.video
    video_encoder = {"_target_": "llava.model.encoders.BasicVideoEncoder"}
    if v.pool_sizes:
        video_encoder = {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [list(s) for s in v.pool_sizes]}
    return {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": llm_hf_config(config),
        "vision_tower_cfg": vision_hf_config(config),
        "mm_projector_cfg": projector_hf_config(config),
        "hidden_size": config.llm.hidden_size,
        "mm_hidden_size": config.mm_hidden_size,
        "mm_projector_type": config.projector.type,
        "mm_vision_select_layer": config.vision.select_layer,
        "mm_vision_select_feature": "cls_patch",
        "image_aspect_ratio": p.image_aspect_ratio,
        "dynamic_s2": p.image_aspect_ratio == "dynamic_s2",
        "s2": False,
        "s2_scales": ",".join(str(s) for s in p.s2_scales),
        "s2_max_split_size": p.s2_max_split_size,
        "s2_resize_output_to_scale_idx": p.s2_resize_output_to_scale_idx,
        "max_tiles": p.max_tiles,
        "min_tiles": p.min_tiles,
        "num_video_frames": v.num_frames,
        "fps": v.fps,
        "num_time_tokens": v.num_time_tokens,
        "time_token_format": v.time_token_format,
        "image_encoder": json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder"}),
        "video_encoder": json.dumps(video_encoder),
        "model_max_length": config.llm.context_length,
        "model_dtype": f"torch.{config.model_dtype}",
        "nvila_edge": {
            "name": config.name,
            "image_token_id": config.image_token_id,
            "video_token_id": config.video_token_id,
            "end_token_ids": list(config.end_token_ids),
        },
    }

def llm_hf_config(config) -> dict:
    d = config.llm.to_hf_dict()
    d["architectures"] = ["Qwen2ForCausalLM"]
    d["model_max_length"] = config.llm.context_length
    return d

def vision_hf_config(config) -> dict:
    d = config.vision.to_hf_dict()
    d["architectures"] = ["SiglipVisionModel"]
    return d

def projector_hf_config(config) -> dict:
    return {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector", "mm_projector_type": config.projector.type}

def vila_fields(
    top: dict,
    llm: dict | None = None,
    vision: dict | None = None,
    projector: dict | None = None,
    tokenizer: Any = None,
) -> dict:
    """``NVILAConfig`` fields from a VILA / ``-hf`` top config plus (optionally) the sub-folder configs.

    Sub-configs are looked up in the arguments first, then inline in ``top`` under the VILA
    (``llm_cfg``, ``vision_tower_cfg``, ``mm_projector_cfg``) or the ``-hf`` (``text_config``,
    ``vision_config``) names. ``tokenizer`` (the checkpoint's): media / end token ids come from it
    unless ``top`` states them (see ``media_token_ids``).
    """
    llm = llm or _sub(top, "llm_cfg", "text_config")
    vision = vision or _sub(top, "vision_tower_cfg", "vision_config")
    projector = projector or _sub(top, "mm_projector_cfg") or {}
    if not llm or not vision:
        raise ConfigError("config.json has no LLM or vision-tower sub-config (llm_cfg / vision_tower_cfg)")
    ptype = projector.get("mm_projector_type") or top.get("mm_projector_type")
    if ptype is None:
        ptype = "mlp_downsample_3x3_fix" if top.get("model_type") == "nvila_lite" else "mlp_downsample_2x2_fix"
    aspect = top.get("image_aspect_ratio")
    if aspect is None:  # the -hf configs state none: NVILA is Dynamic-S2, NVILA-Lite tiles (as SGLang reads them)
        aspect = {"nvila": "dynamic_s2", "nvila_lite": "dynamic"}.get(top.get("model_type"))
        aspect = aspect or ("dynamic_s2" if top.get("dynamic_s2") else "resize")
    if aspect not in ASPECT_MODES:
        raise ConfigError(f"image_aspect_ratio {aspect!r} is not supported; supported: {ASPECT_MODES}")
    scales = top.get("s2_scales", "448,896,1344")
    if isinstance(scales, str):
        scales = [int(s) for s in scales.split(",") if s.strip()]
    vcfg = VisionConfig.from_hf_dict(vision)
    vcfg.select_layer = int(top.get("mm_vision_select_layer", -2))
    pre = PreprocessingConfig(
        image_aspect_ratio=aspect,
        s2_scales=tuple(sorted(scales)) if aspect == "dynamic_s2" else (vcfg.image_size,),
        s2_max_split_size=int(top.get("s2_max_split_size", vcfg.image_size)),
        s2_resize_output_to_scale_idx=int(top.get("s2_resize_output_to_scale_idx", -1)),
        max_tiles=int(top.get("max_tiles", 12)),
        min_tiles=int(top.get("min_tiles", 1)),
    )
    video_encoder = top.get("video_encoder") or {}
    if isinstance(video_encoder, str):
        video_encoder = json.loads(video_encoder)
    pools = tuple(tuple(int(x) for x in s) for s in video_encoder.get("pool_sizes", ()))
    vid = VideoConfig(
        num_frames=int(top.get("num_video_frames", 8)),
        fps=float(top.get("fps", 0.0) or 0.0),
        pool_sizes=pools,
        num_time_tokens=int(top.get("num_time_tokens", 0) or 0),
        time_token_format=top.get("time_token_format") or "<t{t}>",
    )
    ours = top.get("nvila_edge", {})
    dtype = str(top.get("model_dtype") or llm.get("dtype") or llm.get("torch_dtype") or "bfloat16")
    return dict(
        name=ours.get("name", top.get("_name_or_path") or top.get("model_type", "custom")),
        vision=vcfg,
        projector=ProjectorConfig(type=ptype),
        llm=LLMConfig.from_hf_dict(llm, context_length=top.get("model_max_length")),
        preprocessing=pre,
        video=vid,
        model_dtype=dtype.replace("torch.", ""),
        **media_token_ids(top, tokenizer),
    )


# Stock Qwen2 NVILA ids: used only when neither the config nor a tokenizer gives them (weights-only folders).
_STOCK_TOKEN_IDS = {"image_token_id": 151649, "video_token_id": 151650, "end_token_ids": (QWEN2_NEWLINE_ID,)}


def tokenizer_token_ids(tokenizer: Any) -> dict:
    """The reference's ids from a tokenizer: ``<image>``, ``<vila/video>`` and the tokenization of "\n"
    (an ``NVILATokenizer`` or a transformers tokenizer)."""
    if hasattr(tokenizer, "newline_ids"):
        return {"image_token_id": tokenizer.image_token_id, "video_token_id": tokenizer.video_token_id,
                "end_token_ids": tuple(tokenizer.newline_ids)}
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<image>"), ("video_token_id", "<vila/video>"))}
    ids["end_token_ids"] = tuple(tokenizer.encode("\n", add_special_tokens=False))
    return ids


def media_token_ids(top: dict, tokenizer: Any = None) -> dict:
    """The one rule for ``image_token_id`` / ``video_token_id`` / ``end_token_ids`` (the reference's):
    the tokenizer gives them; a config that states one (the ``-hf`` layouts, our ``nvila_edge`` block)
    must agree with it, else ``ConfigError``. Without a tokenizer: the stated ids, else the stock ones."""
    ours = top.get("nvila_edge") or {}
    stated = {}
    for key in _STOCK_TOKEN_IDS:
        value = ours.get(key, top.get(key))
        if value is not None and value != -1:  # SGLang writes -1 for "not given"
            stated[key] = tuple(int(v) for v in value) if key == "end_token_ids" else int(value)
    if tokenizer is None:
        return {**_STOCK_TOKEN_IDS, **stated}
    found = tokenizer_token_ids(tokenizer)
    for key, value in stated.items():
        if value != found[key]:
            raise ConfigError(
                f"config.json states {key} = {value} but the checkpoint's tokenizer gives {found[key]}; the config and "
                f"tokenizer come from different models: remove {key} from config.json (the tokenizer's id is used, "
                "as in the reference) or put back the tokenizer the model was trained with"
            )
    return found


def _sub(top: dict, *names: str) -> dict | None:
    for n in names:
        v = top.get(n)
        if isinstance(v, dict):
            return v
    return None
