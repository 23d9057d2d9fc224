"""Checkpoint I/O: VILA and -hf round trips, a VILA checkpoint assembled from transformers parts, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from nvila_edge import CheckpointError, NVILAConfig, NVILAModel, NVILAProcessor, vila_format
from nvila_edge.checkpoint import detect_layout, read_config

from conftest import random_image


@pytest.fixture(scope="module")
def inputs(tiny_processor):
    return tiny_processor("what color is the circle?", images=[random_image(640, 360)])


@torch.no_grad()
def _logits(model, inputs):
    return model(**{k: inputs[k] for k in ("input_ids", "pixel_values", "media")}).logits


@pytest.mark.parametrize("layout", ["vila", "hf"])
@torch.no_grad()
def test_round_trip_identical_outputs(tmp_path, tiny_model, tokenizer, inputs, layout):
    path = tmp_path / f"ckpt-{layout}"
    tiny_model.save_pretrained(path, layout=layout, tokenizer=tokenizer)
    assert detect_layout(path) == layout
    loaded = NVILAModel.from_pretrained(path)
    assert loaded.config == tiny_model.config
    assert loaded.tokenizer is not None and loaded.tokenizer.image_token_id == tokenizer.image_token_id
    assert not any(t.device.type == "meta" for t in list(loaded.parameters()) + list(loaded.buffers()))
    torch.testing.assert_close(_logits(loaded, inputs), _logits(tiny_model, inputs), rtol=0, atol=0)
    a = tiny_model.generate(**inputs, tokenizer=tokenizer, max_new_tokens=6)
    b = loaded.generate(**inputs, max_new_tokens=6)
    assert a.token_ids == b.token_ids
    # processor from the same folder
    proc = NVILAProcessor.from_pretrained(path)
    assert proc.config == tiny_model.config
    assert proc("what color is the circle?", images=[random_image(640, 360)]).input_ids.tolist() == inputs.input_ids.tolist()


def test_vila_layout_files_and_reference_keys(tmp_path, tiny_model, tokenizer):
    path = tmp_path / "ckpt"
    tiny_model.save_pretrained(path, tokenizer=tokenizer)
    top = json.loads((path / "config.json").read_text())
    assert top["architectures"] == ["LlavaLlamaModel"] and top["model_type"] == "llava_llama"
    assert top["image_aspect_ratio"] == "dynamic_s2" and top["s2_scales"] == "448,896,1344"
    assert json.loads((path / "mm_projector" / "config.json").read_text())["model_type"] == "v2l_projector"
    proj = load_file(str(path / "mm_projector" / "model.safetensors"))
    assert sorted(proj) == sorted(f"layers.{i}.{p}" for i in (1, 2, 4) for p in ("weight", "bias"))
    vt = load_file(str(path / "vision_tower" / "model.safetensors"))
    assert all(k.startswith("vision_model.") for k in vt)
    llm = load_file(str(path / "llm" / "model.safetensors"))
    assert "model.embed_tokens.weight" in llm and "lm_head.weight" in llm
    assert (path / "llm" / "tokenizer.json").is_file()
    # the sub-folders are plain HF checkpoints
    assert isinstance(SiglipVisionModel.from_pretrained(path / "vision_tower"), SiglipVisionModel)
    assert isinstance(Qwen2ForCausalLM.from_pretrained(path / "llm"), Qwen2ForCausalLM)


@torch.no_grad()
def test_vila_checkpoint_assembled_from_transformers_parts(tmp_path, tiny_config, tokenizer, inputs):
    """A VILA-layout folder written by transformers' own save_pretrained (as the reference does) loads."""
    torch.manual_seed(3)
    path = tmp_path / "assembled"
    llm = Qwen2ForCausalLM(Qwen2Config(**vila_format.llm_hf_config(tiny_config)))
    llm.save_pretrained(path / "llm")
    tokenizer.save_pretrained(path / "llm")
    vt = SiglipVisionModel(SiglipVisionConfig(**vila_format.vision_hf_config(tiny_config)))
    vt.save_pretrained(path / "vision_tower")
    # reference projector: nn.Sequential with keys layers.1/2/4
    from nvila_edge.modeling.projector import MultimodalProjector

    proj = MultimodalProjector(tiny_config)
    (path / "mm_projector").mkdir()
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()}, str(path / "mm_projector" / "model.safetensors"))
    (path / "mm_projector" / "config.json").write_text(json.dumps(vila_format.projector_hf_config(tiny_config)))
    top = vila_format.to_vila_dict(tiny_config)
    top.pop("nvila_edge")
    top.update(image_token_id=tiny_config.image_token_id, video_token_id=tiny_config.video_token_id)
    (path / "config.json").write_text(json.dumps(top))

    model = NVILAModel.from_pretrained(path)
    torch.testing.assert_close(model.llm.lm_head.weight, llm.lm_head.weight)
    torch.testing.assert_close(model.vision_tower.embeddings.patch_embedding.weight, vt.embeddings.patch_embedding.weight)
    torch.testing.assert_close(model.mm_projector.layers[2].weight, proj.layers[2].weight)
    # features of the loaded model equal transformers' own SigLIP hidden_states[-2]
    px = torch.as_tensor(inputs.pixel_values[:2])
    torch.testing.assert_close(model.encode_tiles(px), vt(px, output_hidden_states=True).hidden_states[-2])
    assert model.generate(**inputs, max_new_tokens=3).usage.prompt_tokens == inputs.num_tokens


def test_tied_embeddings_round_trip(tmp_path, tokenizer, inputs):
    cfg = NVILAConfig.from_preset("tiny", llm={"tie_word_embeddings": True})
    torch.manual_seed(0)
    model = NVILAModel(cfg).eval()
    model.save_pretrained(tmp_path / "tied", tokenizer=tokenizer)
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "llm" / "model.safetensors"))
    loaded = NVILAModel.from_pretrained(tmp_path / "tied")
    assert loaded.llm.lm_head.weight.data_ptr() == loaded.llm.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(_logits(loaded, inputs), _logits(model, inputs))


def test_dtype_option(tmp_path, tiny_model, tokenizer):
    tiny_model.save_pretrained(tmp_path / "c", tokenizer=tokenizer)
    m = NVILAModel.from_pretrained(tmp_path / "c", dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16


# ---- errors -----------------------------------------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path, tiny_model, tokenizer):
    path = tmp_path / "ckpt"
    tiny_model.save_pretrained(path, tokenizer=tokenizer)
    return path


def test_unknown_layout(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="neither"):
        NVILAModel.from_pretrained(tmp_path / "x")
    with pytest.raises(CheckpointError, match="not found"):
        NVILAModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "y").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        NVILAModel.from_pretrained(tmp_path / "y")


def test_missing_subfolder_and_weights(saved):
    (saved / "mm_projector" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="mm_projector"):
        NVILAModel.from_pretrained(saved)
    shutil.rmtree(saved / "mm_projector")
    with pytest.raises(CheckpointError, match="mm_projector"):
        NVILAModel.from_pretrained(saved)


def test_missing_key_and_shape_mismatch(saved):
    f = saved / "mm_projector" / "model.safetensors"
    sd = load_file(str(f))
    bad = dict(sd)
    bad.pop("layers.4.weight")
    save_file(bad, str(f))
    with pytest.raises(CheckpointError, match="mm_projector.layers.4.weight"):
        NVILAModel.from_pretrained(saved)
    bad = dict(sd)
    bad["layers.4.weight"] = torch.zeros(3, 3)
    save_file(bad, str(f))
    with pytest.raises(CheckpointError, match=r"layers\.4\.weight.*shape"):
        NVILAModel.from_pretrained(saved)
    bad = dict(sd)
    bad["layers.9.weight"] = torch.zeros(3)
    save_file(bad, str(f))
    with pytest.raises(CheckpointError, match="unexpected key 'layers.9.weight'"):
        NVILAModel.from_pretrained(saved)


def test_pickle_weights_refused(saved):
    (saved / "mm_projector" / "model.safetensors").unlink()
    (saved / "mm_projector" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        NVILAModel.from_pretrained(saved)


def test_corrupt_files(saved):
    (saved / "llm" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        NVILAModel.from_pretrained(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        read_config(saved)


def test_interrupted_save_keeps_previous_checkpoint(saved, tiny_model, monkeypatch):
    import nvila_edge.checkpoint as ck

    before = sorted(p.relative_to(saved) for p in saved.rglob("*"))

    def fail(*a, **k):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        ck.save_model(tiny_model, saved)
    assert sorted(p.relative_to(saved) for p in saved.rglob("*")) == before
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]
