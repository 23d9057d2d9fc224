"""Export: bundle layout, INT8 Q/DQ vision graph with int8 initializers, ORT parity with the calibrated
torch model (Dynamic-S2, Lite tiling, video), TensorRT-LLM checkpoint, torch target, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nvila_edge import BackendUnavailable, BundleError, ExportError, NVILAConfig, NVILAModel, NVILAProcessor
from nvila_edge.bundle import Bundle

from conftest import make_model, random_image

pytest.importorskip("modelopt.torch.quantization")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore")  # ModelOpt / ONNX warnings, this module only


def _items(n):
    return [{"conversation": "<image>\nwhat color is the circle?", "images": [random_image(120 + 40 * i, 100, seed=i)]}
            for i in range(n)] + [{"conversation": "how many shapes"}]


def _calibrate(tmp, preset, tokenizer, seed=0, **kw):
    from nvila_edge.calibration import calibrate

    model = make_model(NVILAConfig.from_preset(preset), seed=seed)
    model.tokenizer = tokenizer
    proc = NVILAProcessor(model.config, tokenizer)
    calibrate(model, tmp / f"{preset}-cal", data=_items(4), num_samples=4, num_heldout=1, processor=proc,
              progress=False, **kw)
    return tmp / f"{preset}-cal", proc


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory, tokenizer):
    from nvila_edge.export import export_bundle

    tmp = tmp_path_factory.mktemp("export")
    cal, proc = _calibrate(tmp, "demo", tokenizer)
    export_bundle(cal, tmp / "bundle", "all", progress=False)
    return cal, tmp / "bundle", proc


def _cos(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)))


def test_bundle_manifest(demo_bundle):
    cal, path, _ = demo_bundle
    b = Bundle.open(path)
    assert b.targets == ["cpu", "cuda", "gguf", "tensorrt", "torch"]
    cpu = b.target("cpu")
    assert cpu["precision"]["vision"] == "int8-qdq" and cpu["precision"]["llm"] == "int4"
    assert cpu["limits"] == {"max_tiles": 6, "max_frames": 8, "context_length": 2048}
    assert cpu["io"]["decoder"]["past_key"] == "past_key_values.{i}.key"
    assert b.quantization["vision"]["name"] == "w8a8-smoothquant" and b.quantization["llm"]["block_size"] == 128
    assert b.manifest["producer"]["onnx"] and b.manifest["producer"]["nvidia-modelopt"]
    fidelity = json.loads((cal / "fidelity.json").read_text())  # the calibration's report travels with the bundle
    assert b.manifest["source"]["fidelity"]["greedy_agreement"] == pytest.approx(fidelity["greedy_agreement"])
    assert 0.0 <= fidelity["greedy_agreement"] <= 1.0 and fidelity["num_tokens"] > 0
    assert (b.tokenizer_dir / "tokenizer.json").is_file()
    for role in ("vision", "projector", "decoder", "embeddings"):
        assert b.file(role).is_file()


def test_vision_graph_is_int8_qdq(demo_bundle, tmp_path):
    from nvila_edge.export import qdq_summary
    from nvila_edge.export.vision_onnx import export_vision

    _, path, _ = demo_bundle
    s = qdq_summary(path / "cpu/vision.onnx")
    cfg = NVILAConfig.from_preset("demo").vision
    keep = cfg.num_hidden_layers - 1  # NVILA uses hidden_states[-2]: the last layer never runs
    assert s["int8_weight_matmuls"] == s["qdq_activation_matmuls"] == 6 * keep
    assert s["int8_initializers"] == 6 * keep and s["quantize_linear"] == 6 * keep  # activations only
    import onnx

    g = onnx.load(str(path / "cpu/vision.onnx")).graph
    fp32_layer_weights = [i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT
                          and len(i.dims) == 2 and min(i.dims) >= 128]
    assert fp32_layer_weights == []  # no fp32 copy of any linear weight is left (patch conv is 4-D, kept fp32)
    fp = export_vision(make_model(NVILAConfig.from_preset("demo")), tmp_path)  # unquantized, same shapes
    assert fp["int8_weights"] == 0
    fp_g = onnx.load(str(tmp_path / "vision.onnx")).graph
    conv = sum(4 * int(np.prod(i.dims)) for i in fp_g.initializer if len(i.dims) == 4)  # patch conv: fp32 in both
    assert conv > 0
    assert (path / "cpu/vision.onnx").stat().st_size - conv < 0.5 * ((tmp_path / "vision.onnx").stat().st_size - conv)
    fp_bytes = sum(4 * int(np.prod(i.dims)) for i in fp_g.initializer if len(i.dims) == 2 and min(i.dims) >= 128)
    int8_bytes = sum(int(np.prod(i.dims)) for i in g.initializer if i.data_type == onnx.TensorProto.INT8)
    assert int8_bytes * 4 == fp_bytes  # every linear weight stored as int8: a quarter of the bytes


def test_vision_weights_are_stored_transposed(demo_bundle):
    """No ``INT8 W → DQ → Transpose`` chain is left for ONNX Runtime to fold at load (that folding cost 4 GB of
    RSS on SigLIP-400M): every int8 weight reaches its MatMul through one DequantizeLinear."""
    import onnx

    _, path, _ = demo_bundle
    g = onnx.load(str(path / "cpu/vision.onnx")).graph
    producers = {o: n for n in g.node for o in n.output}
    int8 = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.INT8}
    weight_dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in int8}
    assert weight_dq
    assert not [n for n in g.node if n.op_type == "Transpose" and n.input[0] in weight_dq]
    for mm in (n for n in g.node if n.op_type == "MatMul" and n.input[1] in weight_dq):
        dq = producers[mm.input[1]]
        assert next(a.i for a in dq.attribute if a.name == "axis") == 1  # per output channel of (in, out)
    keep = NVILAConfig.from_preset("demo").vision.num_hidden_layers - 1
    assert sum(n.op_type == "MatMul" and n.input[1] in weight_dq for n in g.node) == 6 * keep


def test_fold_weight_transposes_is_exact(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from nvila_edge.export import fold_weight_transposes

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (5, 3)).astype(np.int8)  # (out, in), per-out-channel scales as ModelOpt writes
    scale = rng.uniform(0.01, 0.1, 5).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], axis=0),
             helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s"),
                               numpy_helper.from_array(np.zeros(5, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 3)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the ops as written (no int8 fusion)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(model)
    assert fold_weight_transposes(model) == 1
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]
    assert numpy_helper.to_array(model.graph.initializer[0]).shape == (3, 5)
    after = run(model)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(after, x @ (w.astype(np.float32) * scale[:, None]).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["dynamic_s2", "video"])
def test_ort_vision_matches_calibrated_torch(demo_bundle, case):
    from nvila_edge.calibration import load_calibrated

    cal, path, proc = demo_bundle
    model = load_calibrated(cal)
    if case == "video":
        frames = [random_image(160, 120, seed=s) for s in range(8)]
        inputs = proc("<vila/video>\nwhat happens?", videos=[frames])
    else:
        inputs = proc("<image>\nwhat?", images=[random_image(400, 150, seed=3)])
    sess = ort.InferenceSession(str(path / "cpu/vision.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": inputs.pixel_values})[0]
    with torch.inference_mode():
        ref = model.encode_tiles(torch.as_tensor(inputs.pixel_values)).numpy()
    assert got.shape == ref.shape and got.shape[0] == inputs.pixel_values.shape[0] > 1
    assert _cos(got, ref) >= 0.99


def test_lite_tiling_parity(tmp_path, tokenizer):
    from nvila_edge.calibration import load_calibrated
    from nvila_edge.export import export_projector, export_vision

    cal, proc = _calibrate(tmp_path, "tiny-lite", tokenizer, seed=2, vision="w8a8-smoothquant-proj", llm="fp16")
    model = load_calibrated(cal)
    export_vision(model, tmp_path / "g")
    p = export_projector(model, tmp_path / "g")
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.mm_projector.modules())
    assert p["int8_weight_matmuls"] == n_linear >= 2  # the -proj recipe quantizes the projector too
    inputs = proc("<image>\nwhat?", images=[random_image(900, 500, seed=4)])
    assert inputs.media[0].num_tiles > 1
    feats = ort.InferenceSession(str(tmp_path / "g/vision.onnx")).run(None, {"pixel_values": inputs.pixel_values})[0]
    proj = ort.InferenceSession(str(tmp_path / "g/projector.onnx")).run(None, {"features": feats})[0]
    with torch.inference_mode():
        ref_f = model.encode_tiles(torch.as_tensor(inputs.pixel_values))
        ref_p = model.mm_projector(ref_f).numpy()
    assert _cos(feats, ref_f.numpy()) >= 0.99 and _cos(proj, ref_p) >= 0.99


def test_trtllm_checkpoint_is_well_formed(demo_bundle):
    from nvila_edge.export import check_trtllm_checkpoint

    _, path, _ = demo_bundle
    info = check_trtllm_checkpoint(path / "tensorrt/trtllm_checkpoint")
    assert info["quant_algo"] == "W4A16_AWQ" and info["group_size"] == 128 and info["tensors"] > 20
    cfg = json.loads((path / "tensorrt/trtllm_checkpoint/config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["quantization"]["pre_quant_scale"] is True
    assert Bundle.open(path).target("tensorrt")["files"]["vision_onnx"] == "cpu/vision.onnx"  # one Q/DQ graph
    assert not (path / "tensorrt/vision.onnx").exists()
    eng = Bundle.open(path).target("tensorrt")["engines"]
    assert eng["built"] is False and "nvila-edge[gpu]" in eng["reason"]


def test_torch_target_carries_the_quantization(demo_bundle):
    from nvila_edge.calibration import load_calibrated

    cal, path, _ = demo_bundle
    plain = NVILAModel.from_pretrained(Bundle.open(path).file("checkpoint", "torch"))
    fake = load_calibrated(cal)
    assert not any("quantizer" in n for n, _ in plain.named_modules())
    x = torch.randn(1, 9, 256)
    with torch.inference_mode():
        a, b = plain.llm(inputs_embeds=x).logits, fake.llm(inputs_embeds=x).logits
    assert torch.allclose(a, b, atol=1e-4)  # weight-only INT4 is exactly representable in plain weights


def test_bad_input(tmp_path, tokenizer, demo_bundle, monkeypatch):
    from nvila_edge.calibration import QuantRecipe, recipes, register

    monkeypatch.setattr(recipes, "RECIPES", dict(recipes.RECIPES))  # the experimental recipe is this test's only
    from nvila_edge.cli import main
    from nvila_edge.export import export_bundle

    model = make_model(NVILAConfig.from_preset("demo"))
    model.save_pretrained(tmp_path / "plain", tokenizer=tokenizer)
    with pytest.raises(ExportError, match="not calibrated.*nvila-edge calibrate"):
        export_bundle(tmp_path / "plain", tmp_path / "out")
    cal, _, _ = demo_bundle
    with pytest.raises(ExportError, match="unknown export target 'fpga'"):
        export_bundle(cal, tmp_path / "out", "fpga")
    register(QuantRecipe("w8a16-experimental", "llm", "no target runs this", weight_bits=8,
                         make_config=lambda: {}))
    odd = tmp_path / "odd-cal"
    import shutil

    shutil.copytree(cal, odd)
    spec = json.loads((odd / "recipe.json").read_text())
    spec["llm"]["name"] = "w8a16-experimental"
    (odd / "recipe.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="cannot run the llm recipe 'w8a16-experimental'"):
        export_bundle(odd, tmp_path / "out", "cpu")
    with pytest.raises(BackendUnavailable, match=r"nvila-edge\[gpu\]"):
        export_bundle(cal, tmp_path / "out", "tensorrt", engines="build", progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert main(["verify", str(demo_bundle[1])]) == 0
    (tmp_path / "tampered").mkdir()
    shutil.copytree(demo_bundle[1], tmp_path / "tampered/b")
    with open(tmp_path / "tampered/b/cpu/decoder.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    assert main(["verify", str(tmp_path / "tampered/b")]) == 2
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(tmp_path / "tampered/b")
