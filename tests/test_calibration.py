"""Calibration: ModelOpt quantizers really on where the recipes say, save/restore identity, fidelity, errors."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from nvila_edge import CalibrationError, CheckpointError, NVILAConfig, NVILAProcessor

from conftest import make_model, random_image

pytest.importorskip("modelopt.torch.quantization")
pytestmark = pytest.mark.filterwarnings("ignore")  # ModelOpt / ONNX warnings, this module only


@pytest.fixture(scope="module")
def demo_processor(tokenizer):
    return NVILAProcessor(NVILAConfig.from_preset("demo"), tokenizer)


def _items(n: int = 6):
    items = [{"conversation": [{"from": "human", "value": "<image>\nwhat color is the circle?"},
                               {"from": "gpt", "value": "red"}],
              "images": [random_image(120 + 30 * i, 100 + 10 * (i % 3), seed=i)]} for i in range(n)]
    return items + [{"conversation": "how many shapes are there"}]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tokenizer, demo_processor, one_thread):
    from nvila_edge.calibration import calibrate

    model = make_model(NVILAConfig.from_preset("demo"))
    model.tokenizer = tokenizer
    out = tmp_path_factory.mktemp("cal") / "calibrated"
    res = calibrate(model, out, data=_items(), num_samples=6, num_heldout=3, processor=demo_processor, progress=False)
    return res


def test_quantizers_enabled_where_the_recipe_says(calibrated):
    cfg = calibrated.model.config
    q = calibrated.stats["quantizers"]
    keep = cfg.vision.select_layer % (cfg.vision.num_hidden_layers + 1)  # layers NVILA runs
    assert q["vision"]["weight_quantized"] == q["vision"]["input_quantized"] == 6 * keep  # q,k,v,out,fc1,fc2
    assert q["projector"]["weight_quantized"] == 0  # w8a8-smoothquant keeps the projector in float
    assert q["llm"]["weight_quantized"] == 7 * cfg.llm.num_hidden_layers  # q,k,v,o,gate,up,down; not lm_head
    assert q["llm"]["input_quantized"] == 0  # W4A16: activations stay float
    lm = calibrated.model.llm.lm_head
    assert getattr(lm, "weight_quantizer", None) is None or not lm.weight_quantizer.is_enabled
    # AWQ found per-channel scales; SmoothQuant too
    q_proj = calibrated.model.llm.model.layers[0].self_attn.q_proj
    assert q_proj.input_quantizer.pre_quant_scale is not None
    assert tuple(q_proj.weight_quantizer.amax.shape) == (cfg.llm.hidden_size * cfg.llm.hidden_size // 128, 1)
    v_fc1 = calibrated.model.vision_tower.encoder.layers[0].mlp.fc1
    assert v_fc1.weight_quantizer.num_bits == 8 and v_fc1.input_quantizer.amax is not None


def test_fidelity_report(calibrated):
    fid = calibrated.fidelity
    assert fid.num_prompts == 3 and fid.num_tokens == 48
    assert 0.99 <= fid.vision_cosine_mean <= 1.0 + 1e-6
    assert fid.vision_cosine_min <= fid.vision_cosine_mean
    assert fid.logits_kl_mean >= 0 and 0.0 <= fid.greedy_agreement <= 1.0
    saved = json.loads((calibrated.path / "fidelity.json").read_text())
    assert saved["greedy_agreement"] == pytest.approx(fid.greedy_agreement)
    assert "greedy-token agreement" in fid.table()


def test_restore_reproduces_outputs(calibrated, demo_processor):
    from nvila_edge.calibration import load_calibrated, read_recipes

    restored = load_calibrated(calibrated.path)
    assert read_recipes(calibrated.path)["llm"].name == "w4a16-awq"
    inputs = demo_processor("<image>\nwhat color?", images=[random_image(300, 140, seed=9)])
    with torch.inference_mode():
        a = calibrated.model(**inputs).logits
        b = restored(**inputs).logits
    assert torch.equal(a, b)
    assert restored.tokenizer is not None
    # the file holding the ModelOpt state loads without unpickling code
    torch.load(calibrated.path / "modelopt_state.pt", weights_only=True)


def test_projector_recipe_and_rtn(tokenizer, demo_processor, one_thread):
    from nvila_edge.calibration import calibrate

    model = make_model(NVILAConfig.from_preset("demo"), seed=3)
    res = calibrate(model, None, vision="w8a8-smoothquant-proj", llm="w4a16-rtn", data=_items(3), num_samples=3,
                    num_heldout=1, processor=demo_processor, progress=False)
    q = res.stats["quantizers"]
    assert q["projector"]["weight_quantized"] == 2 and q["llm"]["input_quantized"] == 0
    assert q["llm"]["weight_quantized"] == 28 and res.path is None


def test_fp16_recipes_quantize_nothing(tokenizer, demo_processor):
    from nvila_edge.calibration import calibrate

    model = make_model(NVILAConfig.from_preset("demo"), seed=4)
    res = calibrate(model, None, vision="fp16", llm="fp16", data=_items(2), num_samples=2, num_heldout=1,
                    processor=demo_processor, progress=False)
    assert all(v["weight_quantized"] == 0 for v in res.stats["quantizers"].values())
    assert res.fidelity.greedy_agreement == 1.0 and res.fidelity.vision_cosine_mean == pytest.approx(1.0)


def test_errors(tmp_path, tokenizer, demo_processor):
    from nvila_edge.calibration import calibrate, get_recipe, load_calibrated, load_calibration_data

    model = make_model(NVILAConfig.from_preset("demo"), seed=5)
    with pytest.raises(CalibrationError, match="unknown vision recipe 'int3'.*w8a8-smoothquant"):
        calibrate(model, None, vision="int3", data=_items(1), processor=demo_processor)
    with pytest.raises(CalibrationError, match="unknown llm recipe"):
        get_recipe("w8a8-smoothquant", "llm")
    odd = NVILAConfig.from_preset("demo").replace(llm={"hidden_size": 192, "intermediate_size": 320})
    with pytest.raises(CalibrationError, match="hidden_size=192.*multiple of 128"):
        get_recipe("w4a16-awq", "llm").check(odd)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no images or videos"):
        load_calibration_data(tmp_path / "empty", demo_processor)
    with pytest.raises(CalibrationError, match="empty"):
        load_calibration_data([], demo_processor)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration_data(tmp_path / "nope", demo_processor)
    with pytest.raises(CalibrationError, match="no calibration data"):
        calibrate(model, None, processor=demo_processor)
    with pytest.raises(CheckpointError, match="not a calibrated directory"):
        load_calibrated(tmp_path / "empty")


def test_directory_and_jsonl_sources(tmp_path, demo_processor):
    from nvila_edge.calibration import load_calibration_data

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        cv2.imwrite(str(d / f"{i}.png"), random_image(200, 100 + 40 * i, seed=i))
    (d / "broken.jpg").write_bytes(b"not an image")
    (d / "prompts.txt").write_text("what color is it?\n")
    got = load_calibration_data(d, demo_processor, num_samples=10, progress=False)
    assert sum(1 for g in got if g.media) == 3  # the broken file is skipped, the two text prompts kept
    assert all(demo_processor.tokenizer.decode(np.asarray(g.input_ids).reshape(-1).tolist()).count("what color is it?") == 1 for g in got)
    rows = [{"id": str(i), "image": f"imgs/{i}.png",
             "conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]}
            for i in range(3)]
    (tmp_path / "cal.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = load_calibration_data(tmp_path / "cal.jsonl", demo_processor, num_samples=2, progress=False)
    assert len(got) == 2 and all(isinstance(g.pixel_values, np.ndarray) for g in got)


def test_cli_calibrate(tmp_path, tokenizer, capsys):
    from nvila_edge.calibration import is_calibrated
    from nvila_edge.cli import main

    model = make_model(NVILAConfig.from_preset("demo"), seed=6)
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        cv2.imwrite(str(d / f"{i}.png"), random_image(160, 90 + 30 * i, seed=i))
    rc = main(["calibrate", str(tmp_path / "ckpt"), "--data", str(d), "-n", "3", "--num-heldout", "2"])
    assert rc == 0
    assert is_calibrated(tmp_path / "ckpt-calibrated")
    out = capsys.readouterr().out
    # every linear of the layers hidden_states[-2] uses (6 a layer) of the vision linears (6 a layer + head)
    v = NVILAConfig.from_preset("demo").vision.num_hidden_layers
    assert "greedy-token agreement" in out and f"quantized linears: vision {6 * (v - 1)}/{6 * v + 3}" in out
    assert main(["calibrate", str(tmp_path / "ckpt"), "--data", str(d), "--llm", "int2"]) == 2
    assert "unknown llm recipe 'int2'" in capsys.readouterr().err


def test_heldout_split_keeps_media_for_calibration():
    from types import SimpleNamespace

    from nvila_edge.calibration.calibrator import _split_heldout

    s = [SimpleNamespace(media=[1]), SimpleNamespace(media=[]), SimpleNamespace(media=[]), SimpleNamespace(media=[2])]
    for k in (1, 2):
        calib, held = _split_heldout(s, k)
        assert len(held) == k and len(calib) == 4 - k and any(x.media for x in calib)
    calib, held = _split_heldout([SimpleNamespace(media=[1]), SimpleNamespace(media=[])], 1)
    assert calib[0].media and held[0].media == []


def test_tied_embeddings_round_trip(tmp_path, tokenizer):
    """Qwen2.5-1.5B (NVILA-Lite-2B) ties lm_head to the embeddings; safetensors stores the pair once."""
    from nvila_edge.calibration import calibrate, load_calibrated

    cfg = NVILAConfig.from_preset("demo").replace(llm={"tie_word_embeddings": True})
    model = make_model(cfg, seed=7)
    proc = NVILAProcessor(cfg, tokenizer)
    res = calibrate(model, tmp_path / "cal", vision="fp16", llm="w4a16-rtn", data=_items(2), num_samples=2,
                    num_heldout=1, processor=proc, progress=False)
    restored = load_calibrated(res.path)
    assert restored.llm.lm_head.weight is restored.llm.model.embed_tokens.weight
    x = torch.randn(1, 5, cfg.llm.hidden_size)
    with torch.inference_mode():
        assert torch.equal(res.model.llm(inputs_embeds=x).logits, restored.llm(inputs_embeds=x).logits)
