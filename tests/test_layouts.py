"""Every published NVILA layout opens as the reference opens it, with a re-tokenized tokenizer (media and
"\\n" ids that are not the stock ones): same greedy tokens as the same weights with the ids set by hand,
token counts equal to ``plan_image``; HF-style call conventions; bad checkpoints fail before any weight."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nvila_edge import CheckpointError, ConfigError, NVILAConfig, NVILAModel, NVILAProcessor
from nvila_edge.checkpoint import detect_layout, read_config

from conftest import _corpus, random_image

try:
    import _checkpoint_helpers as C
except ImportError:  # tests/ is a package
    from tests import _checkpoint_helpers as C

SIZES = [(640, 360), (300, 700), (448, 448), (1000, 200)]
QUESTION = "what color is the circle?"


@pytest.fixture(scope="module")
def retok():
    return C.retokenized(_corpus())


@pytest.fixture(scope="module", params=["tiny", "tiny-lite"])
def family(request, tmp_path_factory, retok, one_thread):
    """One set of weights (2x2 projector + Dynamic-S2, or 3x3 projector + Lite tiling) in every layout."""
    config = NVILAConfig.from_preset(request.param)
    parts = C.make_parts(config, seed=7)
    root = tmp_path_factory.mktemp(request.param)
    paths = {layout: C.write_layout(layout, root / layout, parts, config, retok) for layout in C.LAYOUTS}
    ref = C.reference_model(parts, config, retok)
    ref_proc = NVILAProcessor(ref.config, retok)
    inputs = ref_proc(QUESTION, images=[random_image(640, 360, seed=3)])
    expected = ref.generate(**inputs, max_new_tokens=6).token_ids
    return {"config": config, "paths": paths, "ref": ref, "expected": expected, "inputs": inputs}


@pytest.fixture(scope="module")
def loaded(family):
    return {layout: (NVILAModel.from_pretrained(p), NVILAProcessor.from_pretrained(p))
            for layout, p in family["paths"].items()}


@pytest.mark.parametrize("layout", C.LAYOUTS)
def test_layout_ids_come_from_the_tokenizer(family, loaded, layout):
    path = family["paths"][layout]
    assert detect_layout(path) == ("hf" if layout == "hf" else "vila")
    model, proc = loaded[layout]
    for cfg in (model.config, proc.config, read_config(path)[0]):
        assert (cfg.image_token_id, cfg.video_token_id, cfg.end_token_ids) == \
            (C.RETOK_IMAGE, C.RETOK_VIDEO, (C.RETOK_NEWLINE,))
    assert model.config.projector.type == family["config"].projector.type
    assert model.config.preprocessing.image_aspect_ratio == family["config"].preprocessing.image_aspect_ratio
    for part in ("llm", "vision"):
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            assert getattr(getattr(model.config, part), field) == getattr(getattr(family["config"], part), field)
    assert model.config.llm.vocab_size == family["config"].llm.vocab_size


@pytest.mark.parametrize("layout", C.LAYOUTS)
def test_layout_decodes_like_the_reference(family, loaded, layout):
    model, proc = loaded[layout]
    inputs = proc(QUESTION, images=[random_image(640, 360, seed=3)])
    assert inputs.input_ids.tolist() == family["inputs"].input_ids.tolist()
    assert C.RETOK_IMAGE in inputs.input_ids[0] and 502 not in inputs.input_ids[0]
    with torch.no_grad():
        got = model.build_inputs_embeds(inputs)
        want = family["ref"].build_inputs_embeds(family["inputs"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the "\n" end embedding is id 300's
    out = model.generate(**inputs, max_new_tokens=6)
    assert out.token_ids == family["expected"] and len(out.token_ids) > 0


@pytest.mark.parametrize("layout", C.LAYOUTS)
def test_layout_token_counts_match_plan_image(family, loaded, layout):
    model, proc = loaded[layout]
    text_only = proc(QUESTION)
    for w, h in SIZES:
        inputs = proc(QUESTION, images=[random_image(w, h, seed=w)])
        plan = proc.plan_image((w, h))
        assert inputs.media[0].plan == plan
        placeholders = inputs.input_ids[0].tolist().count(C.RETOK_IMAGE)
        assert placeholders == plan.num_placeholders
        text = inputs.num_text_tokens - placeholders
        extra = text - text_only.num_text_tokens  # Lite: the "\n" text token after each tile placeholder
        assert inputs.num_tokens == text + plan.num_tokens
        assert extra == (plan.num_placeholders if plan.num_placeholders > 1 else 0)
        with torch.no_grad():
            assert model.build_inputs_embeds(inputs).shape[1] == inputs.num_tokens


def test_layouts_write_what_the_published_repos_have(family):
    paths = family["paths"]
    for layout in ("vila", "hf-preview"):
        top = json.loads((paths[layout] / "config.json").read_text())
        assert "image_token_id" not in top and "nvila_edge" not in top
        assert (paths[layout] / "llm" / "model.safetensors.index.json").is_file()  # sharded llm/
    assert json.loads((paths["hf-preview"] / "config.json").read_text())["architectures"] == ["VILAForCausalLM"]
    hf = json.loads((paths["hf"] / "config.json").read_text())
    assert hf["model_type"] == ("nvila_lite" if family["config"].projector.downsample == 3 else "nvila")
    assert "image_aspect_ratio" not in hf and "text_config" in hf
    assert len(set(json.loads((paths["hf"] / "model.safetensors.index.json").read_text())["weight_map"].values())) == 3


@pytest.mark.parametrize("layout", ["vila", "hf"])
def test_our_saves_round_trip_the_resolved_ids(family, loaded, layout, tmp_path):
    model, proc = loaded["hf"]
    model.save_pretrained(tmp_path / "again", layout=layout)
    back = NVILAModel.from_pretrained(tmp_path / "again")
    assert back.config.image_token_id == C.RETOK_IMAGE and back.config.end_token_ids == (C.RETOK_NEWLINE,)
    top = json.loads((tmp_path / "again" / "config.json").read_text())
    if layout == "hf":
        assert top["image_token_id"] == C.RETOK_IMAGE and "text_config" in top
        assert top["architectures"][0] in ("NVILAForConditionalGeneration", "NVILALiteForConditionalGeneration")


# ---- stated ids that disagree, bad checkpoints --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_parts():
    cfg = NVILAConfig.from_preset("tiny")
    return cfg, C.make_parts(cfg, seed=1)


@pytest.fixture()
def no_weight_reads(monkeypatch):
    """Any weight read fails the test: errors must come from headers / JSON alone."""
    def refuse(*a, **k):
        raise AssertionError("weights were read before the checkpoint was validated")

    monkeypatch.setattr("nvila_edge.checkpoint.read_weights", refuse)


def test_stated_id_that_disagrees_with_the_tokenizer_is_a_checkpoint_error(tmp_path, tiny_parts, retok, no_weight_reads):
    cfg, parts = tiny_parts
    path = C.write_hf(tmp_path / "hf", parts, cfg, retok, image_token_id=151649)
    for load in (NVILAModel.from_pretrained, NVILAProcessor.from_pretrained, read_config):
        with pytest.raises(CheckpointError, match=r"image_token_id = 151649.*tokenizer gives 486"):
            load(path)


@pytest.mark.parametrize("token", ["<image>", "<vila/video>"])
def test_tokenizer_without_media_token(tmp_path, tiny_parts, retok, token, no_weight_reads):
    cfg, parts = tiny_parts
    path = C.write_vila(tmp_path / "v", parts, cfg, retok)
    f = path / "llm" / "tokenizer.json"
    d = json.loads(f.read_text())
    d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] != token]
    f.write_text(json.dumps(d))
    for load in (NVILAModel.from_pretrained, NVILAProcessor.from_pretrained, read_config):
        with pytest.raises(CheckpointError, match=rf"tokenizer\.json.*{token}") as e:
            load(path)
        assert str(f) in str(e.value)


def test_missing_shard_names_file_and_key(tmp_path, tiny_parts, retok, no_weight_reads):
    cfg, parts = tiny_parts
    path = C.write_hf(tmp_path / "hf", parts, cfg, retok)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(set(index.values()))[1]
    key = next(k for k, s in index.items() if s == shard)
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"{key}.*{shard}.*missing"):
        NVILAModel.from_pretrained(path)


def test_wrong_shape_in_a_shard_names_file_and_key(tmp_path, tiny_parts, retok, no_weight_reads):
    cfg, parts = tiny_parts
    path = C.write_hf(tmp_path / "hf", parts, cfg, retok)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    sd = load_file(str(shard))
    key = sorted(sd)[0]
    sd[key] = torch.zeros(3, 5)
    save_file(sd, str(shard))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: key '{key}' has shape \(3, 5\)"):
        NVILAModel.from_pretrained(path)


def test_index_naming_a_key_the_shard_lacks(tmp_path, tiny_parts, retok, no_weight_reads):
    cfg, parts = tiny_parts
    path = C.write_hf(tmp_path / "hf", parts, cfg, retok)
    f = path / "model.safetensors.index.json"
    d = json.loads(f.read_text())
    d["weight_map"]["llm.model.extra.weight"] = sorted(set(d["weight_map"].values()))[0]
    f.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="llm.model.extra.weight.*lacks it"):
        NVILAModel.from_pretrained(path)


# ---- HF-style calls ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vila_path(tmp_path_factory, tiny_parts, retok):
    cfg, parts = tiny_parts
    return C.write_vila(tmp_path_factory.mktemp("hfcalls") / "v", parts, cfg, retok)


def test_model_accepts_transformers_arguments(vila_path):
    m = NVILAModel.from_pretrained(vila_path, torch_dtype=torch.bfloat16, device_map="cpu", trust_remote_code=True)
    assert m.dtype == torch.bfloat16 and m.device.type == "cpu"
    m = NVILAModel.from_pretrained(vila_path, torch_dtype="auto", device_map={"": "cpu"}, low_cpu_mem_usage=True)
    assert m.dtype == getattr(torch, m.config.model_dtype)
    m = NVILAModel.from_pretrained(vila_path, dtype="float16", device_map="auto" if not torch.cuda.is_available() else "cpu")
    assert m.dtype == torch.float16 and m.device.type == "cpu"
    with pytest.raises(ConfigError, match="splits the model"):
        NVILAModel.from_pretrained(vila_path, device_map={"llm": "cpu", "vision_tower": "cuda:0"})
    with pytest.raises(ConfigError, match="unknown from_pretrained argument"):
        NVILAModel.from_pretrained(vila_path, quantization_config={})
    with pytest.raises(ConfigError, match="unknown dtype"):
        NVILAModel.from_pretrained(vila_path, torch_dtype="float17")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            NVILAModel.from_pretrained(vila_path, device_map="cuda")


def test_processor_hf_conventions(vila_path):
    proc = NVILAProcessor.from_pretrained(vila_path, torch_dtype=torch.float16, device_map="cpu", trust_remote_code=True)
    image = random_image(500, 300, seed=5)
    ours = proc([{"role": "user", "content": QUESTION}], images=[image])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.count("<image>") == 1 and prompt.endswith("<|im_start|>assistant\n")
    assert proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True) == proc.tokenizer.encode(prompt)
    for hf in (proc(text=prompt, images=image), proc(text=[prompt], images=[image]), proc(text=QUESTION, images=[image])):
        assert hf.input_ids.tolist() == ours.input_ids.tolist() and hf.num_tokens == ours.num_tokens
        np.testing.assert_array_equal(hf.pixel_values, ours.pixel_values)
    pt = proc(text=prompt, images=[image], return_tensors="pt")
    assert isinstance(pt.input_ids, torch.Tensor) and isinstance(pt.pixel_values, torch.Tensor)
    model = NVILAModel.from_pretrained(vila_path)
    assert model.generate(**pt.to(model.device), max_new_tokens=3).token_ids == \
        model.generate(**ours, max_new_tokens=3).token_ids
    from nvila_edge.errors import GenerationError

    with pytest.raises(GenerationError, match="once"):
        proc(QUESTION, text=QUESTION)
    with pytest.raises(GenerationError, match="one prompt per call"):
        proc(text=[QUESTION, QUESTION])
    with pytest.raises(GenerationError, match="return_tensors"):
        proc(text=QUESTION, return_tensors="tf")
    with pytest.raises(ConfigError, match="unknown"):
        NVILAProcessor.from_pretrained(vila_path, image_size=3)


@pytest.mark.gpu
def test_device_map_cuda(vila_path):
    cpu = NVILAModel.from_pretrained(vila_path)
    gpu = NVILAModel.from_pretrained(vila_path, torch_dtype=torch.float32, device_map="cuda")
    assert gpu.device.type == "cuda" and not any(t.device.type != "cuda" for t in gpu.parameters())
    proc = NVILAProcessor.from_pretrained(vila_path, device_map="cuda")
    inputs = proc(QUESTION, images=[random_image(500, 300, seed=5)])
    assert gpu.generate(**inputs, max_new_tokens=4).token_ids == cpu.generate(**inputs, max_new_tokens=4).token_ids
