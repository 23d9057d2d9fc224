"""OpenVINO backend on tiny cpu-target bundles: the same greedy answer as ONNX Runtime (fp32), vision and
projector parity, per-sequence caches (two alive at once, truncate), int4 decoder agreement, a missing
openvino named by its extra, and no openvino import unless the backend is chosen."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import random_image, write_bundle
from nvila_edge.errors import BackendUnavailable
from nvila_edge.runtime import Runtime

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model, tokenizer):
    return write_bundle(tmp_path_factory.mktemp("ov") / "bundle", tiny_model, tokenizer)


@pytest.fixture(scope="module")
def runtimes(bundle):
    pytest.importorskip("openvino")
    return (Runtime.load(bundle, backend="onnxruntime", threads=1), Runtime.load(bundle, backend="openvino", threads=1))


def test_same_greedy_answer_as_onnxruntime(runtimes):
    ort_rt, ov_rt = runtimes
    img = random_image(90, 70)
    a = ort_rt.generate("What is in the image?", images=[img], max_new_tokens=12)
    b = ov_rt.generate("What is in the image?", images=[img], max_new_tokens=12)
    assert b.token_ids == a.token_ids and len(a.token_ids) > 0
    assert ov_rt.describe()["backend"] == "openvino" and ov_rt.backend.describe()["precision"] == "f32"


def test_vision_projector_and_decoder_parity(runtimes, tiny_config):
    o, v = (rt.backend for rt in runtimes)
    s = tiny_config.vision.image_size
    px = np.random.default_rng(0).standard_normal((3, 3, s, s)).astype(np.float32)
    fo, fv = o.encode_tiles(px), v.encode_tiles(px)
    assert fv.shape == fo.shape and np.abs(fv - fo).max() < 1e-3 * max(1.0, np.abs(fo).max())
    x = np.concatenate([fo] * (o.projector.get_inputs()[0].shape[-1] // fo.shape[-1]), -1)
    assert np.allclose(v.project(x), o.project(x), atol=1e-4)
    e = o.embed_tokens(np.arange(10, 40))[None]
    co, cv = o.new_cache(), v.new_cache()
    assert np.allclose(v.prefill(e, cv), o.prefill(e, co), atol=1e-3)
    for t in (5, 7, 9):
        assert np.allclose(v.decode_step(t, cv), o.decode_step(t, co), atol=1e-3)


def test_caches_are_per_sequence_and_truncate(runtimes):
    _, ov_rt = runtimes
    v = ov_rt.backend
    e = v.embed_tokens(np.arange(10, 30))[None]
    a, b = v.new_cache(), v.new_cache()
    first = v.prefill(e, a)
    v.prefill(e[:, :5], b)  # another sequence in between does not touch a
    after_a = v.decode_step(3, a)
    a.truncate(20)
    assert a.length == 20 and np.allclose(v.decode_step(3, a), after_a, atol=1e-5)
    a.clear()
    assert np.allclose(v.prefill(e, a), first, atol=1e-5) and b.length == 5


def test_int4_decoder_agrees(tmp_path, tiny_model, tokenizer):
    pytest.importorskip("openvino")
    b = write_bundle(tmp_path / "b4", tiny_model, tokenizer, precision="int4")
    o = Runtime.load(b, backend="onnxruntime", threads=1).backend
    v = Runtime.load(b, backend="openvino", threads=1).backend
    e = o.embed_tokens(np.arange(10, 40))[None]
    lo, lv = o.prefill(e, o.new_cache()), v.prefill(e, v.new_cache())
    cos = float(lo @ lv / np.linalg.norm(lo) / np.linalg.norm(lv))
    assert cos > 0.999, cos  # both quantize activations to int8 inside the int4 matmul, each its own way


def test_missing_openvino_names_its_extra(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendUnavailable, match="openvino"):
        Runtime.load(bundle, backend="openvino")


def test_not_imported_unless_chosen(bundle):
    code = ("import sys; from nvila_edge.runtime import Runtime; "
            f"Runtime.load({str(bundle)!r}, backend='onnxruntime', threads=1); "
            "assert 'openvino' not in sys.modules and 'nvila_edge.runtime.backends.openvino' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- vision_engine="openvino": the tower on OpenVINO, the decoder on ONNX Runtime ---------------------------
def test_vision_engine_openvino_beside_the_ort_decoder(bundle, runtimes, tiny_config):
    ort_rt, _ = runtimes
    mixed = Runtime.load(bundle, backend="onnxruntime", threads=1, vision_engine="openvino")
    d = mixed.backend.describe()
    assert d["backend"] == "onnxruntime" and d["vision"]["engine"] == "openvino"
    assert d["vision"]["precision"] in ("f32", "bf16")  # the plugin's own choice for this CPU
    assert ort_rt.backend.describe()["vision"] == {"engine": "onnxruntime"}
    s = tiny_config.vision.image_size
    px = np.random.default_rng(1).standard_normal((2, 3, s, s)).astype(np.float32)
    fo, fv = ort_rt.backend.encode_tiles(px), mixed.backend.encode_tiles(px)
    assert fv.shape == fo.shape and fv.dtype == np.float32
    cos = (fo * fv).sum(-1) / (np.linalg.norm(fo, axis=-1) * np.linalg.norm(fv, axis=-1))
    assert cos.min() > 0.999, cos.min()  # bf16 outside the matmuls where the CPU has it: close, not equal
    res = mixed.generate("What is in the image?", images=[random_image(90, 70)], max_new_tokens=6)
    assert res.usage.visual_tokens > 0 and len(res.token_ids) > 0


def test_vision_engine_openvino_missing_names_its_extra(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendUnavailable, match="openvino"):
        Runtime.load(bundle, backend="onnxruntime", vision_engine="openvino")


def test_vision_engine_unknown_or_for_another_backend(bundle):
    from nvila_edge.errors import BundleError

    with pytest.raises(BundleError, match="unknown vision engine 'tvm'"):
        Runtime.load(bundle, backend="onnxruntime", vision_engine="tvm")
    with pytest.raises(BundleError, match="applies to the onnxruntime backend"):
        Runtime.load(bundle, backend="torch", vision_engine="openvino")
