"""Test checkpoints in every published NVILA layout, assembled from transformers parts the way the
published repos store them (plain functions, no fixtures).

- ``write_vila``: VILA directory layout (``llava_llama`` / ``LlavaLlamaModel``), or with ``preview=True``
  the remote-code ``-hf-preview`` layout (``vila`` / ``VILAForCausalLM``): ``llm/`` (transformers
  ``save_pretrained``, sharded when ``shard_size`` is given) + tokenizer, ``vision_tower/``, ``mm_projector/``.
  The top config states no token ids (the reference asks the tokenizer).
- ``write_hf``: the flat ``-hf`` layout (``nvila`` / ``nvila_lite``): ``text_config`` + ``vision_config``,
  ``image_token_id`` / ``video_token_id``, keys ``llm.*`` / ``vision_tower.*`` / ``mm_projector.layers.N.*``
  in ``shards`` safetensors files with ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from nvila_edge import NVILAConfig, NVILAModel, NVILATokenizer, vila_format
from nvila_edge.vila_format import tokenizer_token_ids
from nvila_edge.modeling.projector import MultimodalProjector

# ids of the re-tokenized test tokenizer (the stock tiny one has <image> 502, <vila/video> 503, "\n" 198)
RETOK_IMAGE, RETOK_VIDEO, RETOK_NEWLINE = 486, 487, 300


def retokenized(corpus) -> NVILATokenizer:
    """A tokenizer that is not the stock one: a 480-token base (so ``<image>`` is 486, ``<vila/video>`` 487)
    and "\\n" moved to id 300, as in a fine-tuned / re-tokenized checkpoint."""
    tok = NVILATokenizer.train(corpus, base_vocab_size=480)
    d = json.loads(tok.backend.to_str())
    vocab = d["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    newline, other = by_id[198], by_id[RETOK_NEWLINE]
    vocab[newline], vocab[other] = RETOK_NEWLINE, 198
    out = NVILATokenizer(Tokenizer.from_str(json.dumps(d)), model_max_length=tok.model_max_length)
    assert (out.image_token_id, out.video_token_id, out.newline_ids) == (RETOK_IMAGE, RETOK_VIDEO, (RETOK_NEWLINE,))
    return out


def make_parts(config: NVILAConfig, seed: int = 0) -> dict:
    """Independent transformers modules + the reference projector (``nn.Sequential``, keys ``layers.N``)."""
    torch.manual_seed(seed)
    llm = Qwen2ForCausalLM(Qwen2Config(**vila_format.llm_hf_config(config))).eval()
    with torch.no_grad():
        llm.lm_head.weight.mul_(20.0)  # well separated greedy choices (random init is near uniform)
    vision = SiglipVisionModel(SiglipVisionConfig(**vila_format.vision_hf_config(config))).eval()
    return {"llm": llm, "vision_tower": vision, "mm_projector": MultimodalProjector(config).eval()}


def reference_model(parts: dict, config: NVILAConfig, tokenizer) -> NVILAModel:
    """The same weights with the ids taken from the tokenizer by hand (no checkpoint reader involved)."""
    model = NVILAModel(config.replace(**tokenizer_token_ids(tokenizer))).eval()
    model.llm.load_state_dict(parts["llm"].state_dict())
    model.vision_tower.load_state_dict(parts["vision_tower"].state_dict())
    model.mm_projector.load_state_dict(parts["mm_projector"].state_dict())
    model.tokenizer = tokenizer
    return model


def _top_vila(config: NVILAConfig, preview: bool) -> dict:
    top = vila_format.to_vila_dict(config)
    top.pop("nvila_edge")  # ours: the published configs have no token ids
    for key, folder in (("llm_cfg", "llm"), ("vision_tower_cfg", "vision_tower"), ("mm_projector_cfg", "mm_projector")):
        top[key] = {**top[key], "_name_or_path": f"./{folder}"}
    if preview:
        top.update(model_type="vila", architectures=["VILAForCausalLM"],
                   auto_map={"AutoConfig": "modeling_vila.VILAConfig", "AutoModel": "modeling_vila.VILAForCausalLM",
                             "AutoModelForCausalLM": "modeling_vila.VILAForCausalLM",
                             "AutoProcessor": "auto_processor.VILAProcessor"})
    return top


def write_vila(path: Path, parts: dict, config: NVILAConfig, tokenizer, preview: bool = False,
               shard_size: str | None = None) -> Path:
    path = Path(path)
    kw = {"max_shard_size": shard_size} if shard_size else {}
    parts["llm"].save_pretrained(path / "llm", **kw)
    tokenizer.save_pretrained(path / "llm")
    parts["vision_tower"].save_pretrained(path / "vision_tower")
    (path / "mm_projector").mkdir(parents=True)
    proj = {k: v.contiguous() for k, v in parts["mm_projector"].state_dict().items()}
    save_file(proj, str(path / "mm_projector" / "model.safetensors"), metadata={"format": "pt"})
    (path / "mm_projector" / "config.json").write_text(json.dumps(vila_format.projector_hf_config(config)))
    (path / "config.json").write_text(json.dumps(_top_vila(config, preview), indent=2))
    return path


def write_hf(path: Path, parts: dict, config: NVILAConfig, tokenizer, shards: int = 3,
             image_token_id: int | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True)
    lite = config.projector.downsample == 3
    top = {
        "architectures": ["NVILALiteForConditionalGeneration" if lite else "NVILAForConditionalGeneration"],
        "model_type": "nvila_lite" if lite else "nvila",
        "text_config": parts["llm"].config.to_dict(),
        "vision_config": parts["vision_tower"].config.to_dict(),
        "image_token_id": tokenizer.image_token_id if image_token_id is None else image_token_id,
        "video_token_id": tokenizer.video_token_id,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(top, indent=2))
    tensors = {}
    for prefix, module in parts.items():
        for k, v in module.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.detach().contiguous()
    if parts["llm"].config.tie_word_embeddings:
        tensors.pop("llm.lm_head.weight", None)
    keys = sorted(tensors)
    size = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {k: tensors[k] for k in keys[i * size:(i + 1) * size]}
        save_file(chunk, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokenizer.save_pretrained(path)
    return path


LAYOUTS = ("vila", "hf-preview", "hf")


def write_layout(layout: str, path: Path, parts: dict, config: NVILAConfig, tokenizer) -> Path:
    if layout == "hf":
        return write_hf(path, parts, config, tokenizer)
    return write_vila(path, parts, config, tokenizer, preview=layout == "hf-preview", shard_size="200KB")
