"""Bundle manifest: atomic write, hashes, verification of tampered / truncated / newer bundles."""

from __future__ import annotations

import json

import pytest

from nvila_edge import BundleError, NVILAConfig
from nvila_edge.bundle import FORMAT_VERSION, MANIFEST, Bundle, BundleWriter, verify_bundle


def _write(path, tokenizer, fail: bool = False):
    cfg = NVILAConfig.from_preset("tiny")
    with BundleWriter(path, cfg, tokenizer, quantization={"vision": "fp16"}) as w:
        w.path_for("cpu/vision.onnx").write_bytes(b"vision-bytes")
        w.path_for("cpu/decoder.onnx").write_bytes(b"decoder")
        if fail:
            raise RuntimeError("export crashed")
        w.add_target("cpu", precision="fp32", files={"vision": "cpu/vision.onnx", "decoder": "cpu/decoder.onnx"},
                     io={"logits": "logits"})
    return cfg


def test_round_trip(tmp_path, tokenizer):
    cfg = _write(tmp_path / "b", tokenizer)
    b = Bundle.open(tmp_path / "b")
    assert b.config == cfg
    assert b.file("vision").read_bytes() == b"vision-bytes"
    assert b.has("decoder") and not b.has("projector")
    assert b.target("cpu")["io"] == {"logits": "logits"}
    assert b.manifest["format_version"] == FORMAT_VERSION
    assert b.manifest["files"]["cpu/vision.onnx"]["role"] == "vision"
    assert b.manifest["producer"]["torch"]
    assert (b.tokenizer_dir / "tokenizer.json").is_file()
    with pytest.raises(BundleError, match="no 'tensorrt' target"):
        b.target("tensorrt")


def test_crash_leaves_nothing(tmp_path, tokenizer):
    with pytest.raises(RuntimeError):
        _write(tmp_path / "b", tokenizer, fail=True)
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []
    _write(tmp_path / "b", tokenizer)
    with pytest.raises(RuntimeError):  # a failed re-export keeps the previous bundle
        _write(tmp_path / "b", tokenizer, fail=True)
    Bundle.open(tmp_path / "b")


def test_tampered_truncated_and_newer(tmp_path, tokenizer):
    _write(tmp_path / "b", tokenizer)
    (tmp_path / "b/cpu/vision.onnx").write_bytes(b"vision-bytez")
    assert any("sha256" in p for p in verify_bundle(tmp_path / "b"))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(tmp_path / "b")
    (tmp_path / "b/cpu/vision.onnx").write_bytes(b"vis")
    with pytest.raises(BundleError, match="truncated"):
        Bundle.open(tmp_path / "b")
    (tmp_path / "b/cpu/vision.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.open(tmp_path / "b")
    _write(tmp_path / "b", tokenizer)
    mf = tmp_path / "b" / MANIFEST
    m = json.loads(mf.read_text())
    m["format_version"] = FORMAT_VERSION + 1
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="newer"):
        Bundle.open(tmp_path / "b")
    mf.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(tmp_path / "b")
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.open(tmp_path / "nothing")
