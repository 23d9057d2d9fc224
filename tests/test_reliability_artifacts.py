"""Reliability of the artifacts: safetensors only (a pickle-only checkpoint is refused with advice, a pickle
payload never runs), tampered / truncated / mismatched-version bundles refused by ``nvila-edge verify`` and by
``Runtime.load``, damaged checkpoints refused by ``from_pretrained``, and a kill -9 in the middle of
``save_pretrained``, ``calibrate`` (its save step) and ``export_bundle`` leaves the previous artifact intact
(subprocesses SIGKILLed mid-write), with the leftovers hidden and never taken for an artifact."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _reliability_helpers import make_corpus, report, table

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from nvila_edge import NVILAModel  # noqa: E402
from nvila_edge.bundle import Bundle  # noqa: E402
from nvila_edge.cli import main as cli  # noqa: E402
from nvila_edge.errors import BundleError, CheckpointError  # noqa: E402
from nvila_edge.runtime import Runtime  # noqa: E402

CHILD = Path(__file__).parent / "_crash_child.py"


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Each test adds the row of what it checked; the table is written when the module's tests are done."""
    collected: list[list[str]] = []
    yield collected
    if collected:
        report("artifact_table.md", f"artifact checks: {len(collected)} cases\n"
               + table(collected, ["case", "checked by", "outcome", "detail"]), None, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_model, tokenizer):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    tiny_model.save_pretrained(path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model, tokenizer):
    from _reliability_helpers import write_bundle

    return write_bundle(tmp_path_factory.mktemp("rel-art") / "bundle", tiny_model, tokenizer)


def _refused(fn, cls, pattern: str) -> str:
    with pytest.raises(cls) as e:
        fn()
    assert re.search(pattern, str(e.value), re.I), str(e.value)
    return re.sub(r"/\S*/", ".../", str(e.value))


# ---- safetensors only -------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_only_checkpoint_is_refused_with_advice(rows, ckpt, tmp_path, suffix):
    bad = tmp_path / "pickled"
    shutil.copytree(ckpt, bad)
    marker = tmp_path / "pwned"
    for f in bad.rglob("*.safetensors"):  # the same weights, as torch pickles (one with a code payload)
        torch.save({"x": torch.zeros(1)}, f.with_name("pytorch_model" + suffix))
        f.unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    (bad / "llm" / ("evil" + suffix)).write_bytes(pickle.dumps(Payload()))
    msg = _refused(lambda: NVILAModel.from_pretrained(bad), CheckpointError, r"safetensors only.*pickle")
    assert not marker.exists()
    rows.append([f"checkpoint with only {suffix} weights", "from_pretrained", "CheckpointError", msg[:90]])


def test_bundles_and_checkpoints_hold_no_pickle(bundle, ckpt):
    pickles = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
    assert not [p for p in list(bundle.rglob("*")) + list(ckpt.rglob("*")) if p.suffix in pickles]


# ---- damaged bundles ------------------------------------------------------------------------------------
BUNDLE_DAMAGE = {name: (fn, pattern, what) for name, what, fn, pattern in make_corpus.bundle_cases()}
_flip_byte, _truncate = make_corpus._flip_byte, make_corpus._truncate


@pytest.mark.parametrize("damage", list(BUNDLE_DAMAGE))
def test_damaged_bundle_is_refused_by_verify_and_load(rows, bundle, tmp_path, damage, capsys):
    bad = tmp_path / "bundle"
    shutil.copytree(bundle, bad)
    fn, pattern, what = BUNDLE_DAMAGE[damage]
    fn(bad)
    assert cli(["verify", str(bad)]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err, re.I), err
    msg = _refused(lambda: Runtime.load(bad, backend="onnxruntime"), BundleError, pattern)
    rows.append([f"bundle: {what}", "verify + Runtime.load", "BundleError (exit 2)", msg[:90]])


def test_intact_bundle_still_verifies(bundle, capsys):
    assert cli(["verify", str(bundle)]) == 0 and "OK" in capsys.readouterr().out


# ---- damaged checkpoints --------------------------------------------------------------------------------
CKPT_DAMAGE = {
    "llm weights truncated": (lambda r: _truncate(r / "llm" / "model.safetensors"), r"safetensors"),
    "safetensors header garbage": (lambda r: (r / "vision_tower" / "model.safetensors").write_bytes(
        b"\xff" * 8 + (r / "vision_tower" / "model.safetensors").read_bytes()[8:]), r"safetensors"),
    "config does not fit the weights": (lambda r: _edit_json(r / "llm" / "config.json", hidden_size=64),
                                        r"shape|config"),
    "config.json not JSON": (lambda r: (r / "config.json").write_text("{"), r"JSON|config"),
    "projector folder missing": (lambda r: shutil.rmtree(r / "mm_projector"), r"mm_projector|layout|missing"),
}


def _edit_json(p: Path, **kw) -> None:
    d = json.loads(p.read_text())
    d.update(kw)
    p.write_text(json.dumps(d))


@pytest.mark.parametrize("damage", list(CKPT_DAMAGE))
def test_damaged_checkpoint_is_refused(rows, ckpt, tmp_path, damage):
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    fn, pattern = CKPT_DAMAGE[damage]
    fn(bad)
    msg = _refused(lambda: NVILAModel.from_pretrained(bad), CheckpointError, pattern)
    rows.append([f"checkpoint: {damage}", "from_pretrained", "CheckpointError", msg[:90]])


# ---- kill -9 mid-write ------------------------------------------------------------------------------------
def _kill_mid_write(kind: str, target: Path, source: Path | None = None, label: str = "WRITING") -> float:
    """Start the child, wait until it reports being inside the write, SIGKILL it; returns seconds waited."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(CHILD), kind, str(target)] + ([str(source)] if source else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    t0 = time.monotonic()
    watchdog = threading.Timer(300, proc.kill)  # a child that never reaches its write phase fails, not hangs
    watchdog.start()
    try:
        for line in proc.stdout:  # the child sleeps right after printing the label
            if line.strip() == label:
                break
            assert line.strip() != "FINISHED"
        else:
            pytest.fail(f"the {kind} child exited ({proc.wait()}) before reaching its write phase")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return time.monotonic() - t0


def _leftovers(target: Path) -> list[str]:
    """Everything beside the artifact: must be hidden temp folders (never a second artifact name)."""
    others = sorted(p.name for p in target.parent.iterdir() if p.name != target.name)
    assert all(re.fullmatch(rf"\.{re.escape(target.name)}\.[\w-]+\.tmp", n) for n in others), others
    return others


def _same_weights(a: NVILAModel, b: NVILAModel) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_kill9_mid_save_pretrained_keeps_the_previous_checkpoint(rows, tmp_path, tiny_model, tokenizer):
    target = tmp_path / "ckpt"
    tiny_model.save_pretrained(target, tokenizer=tokenizer)
    waited = _kill_mid_write("save_pretrained", target)
    junk = _leftovers(target)
    assert junk, "the killed save left no temp folder: it was not killed mid-write"
    assert _same_weights(NVILAModel.from_pretrained(target), tiny_model)
    with pytest.raises(CheckpointError):
        NVILAModel.from_pretrained(tmp_path / junk[0])  # the half-written folder is not a checkpoint
    rows.append(["kill -9 inside save_pretrained", "from_pretrained", "previous checkpoint loads, same weights",
                 f"child killed after {waited:.1f} s; leftover {len(junk)} hidden temp folder"])


def test_kill9_right_after_the_swap_leaves_the_new_complete_checkpoint(rows, tmp_path, tiny_model, tokenizer):
    target = tmp_path / "ckpt"
    tiny_model.save_pretrained(target, tokenizer=tokenizer)
    _kill_mid_write("swap", target, label="SWAPPED")
    _leftovers(target)
    new = NVILAModel.from_pretrained(target)  # the seed-1 model, complete (one atomic exchange)
    assert not _same_weights(new, tiny_model)
    rows.append(["kill -9 between the swap and the cleanup", "from_pretrained", "new checkpoint complete",
                 "renameat2(RENAME_EXCHANGE): no moment without a checkpoint"])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_model, tokenizer):
    from _crash_child import calibrate_tiny

    pytest.importorskip("modelopt.torch.quantization")
    out = tmp_path_factory.mktemp("cal") / "calibrated"
    calibrate_tiny(tiny_model, tokenizer, out)
    return out


@pytest.mark.parametrize("damage", ["pickle with a code payload", "truncated"])
def test_tampered_modelopt_state_is_refused_without_running_code(rows, calibrated, tmp_path, damage):
    """The calibrated folder's ModelOpt state is read with torch.load(weights_only=True): never code."""
    import pickle

    from nvila_edge.calibration import load_calibrated

    bad = tmp_path / "calibrated"
    shutil.copytree(calibrated, bad)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = bad / "modelopt_state.pt"
    state.write_bytes(pickle.dumps(Payload()) if damage.startswith("pickle") else state.read_bytes()[:100])
    msg = _refused(lambda: load_calibrated(bad), CheckpointError, r"not a plain ModelOpt state.*calibrate")
    assert not marker.exists() and "weights_only=False)" in msg
    rows.append([f"calibrated: modelopt_state.pt {damage}", "load_calibrated", "CheckpointError", msg[:90]])


def test_kill9_mid_calibrate_save_keeps_the_previous_calibration(rows, calibrated, tmp_path):
    from nvila_edge.calibration import load_calibrated

    target = tmp_path / "calibrated"
    shutil.copytree(calibrated, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    waited = _kill_mid_write("calibrate", target)
    junk = _leftovers(target)
    assert junk and {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert load_calibrated(target).config.name
    with pytest.raises(CheckpointError):
        load_calibrated(tmp_path / junk[0])
    rows.append(["kill -9 inside calibrate (save step)", "load_calibrated", "previous calibration intact (bytes)",
                 f"child killed after {waited:.1f} s"])


def test_kill9_mid_export_keeps_the_previous_bundle(rows, calibrated, tmp_path, capsys):
    from nvila_edge.export import export_bundle

    target = tmp_path / "bundle"
    export_bundle(calibrated, target, "cpu", progress=False)
    manifest = (target / "manifest.json").read_text()
    waited = _kill_mid_write("export", target, source=calibrated)
    junk = _leftovers(target)
    assert junk and (target / "manifest.json").read_text() == manifest
    assert cli(["verify", str(target)]) == 0
    rt = Runtime.load(target, backend="onnxruntime", threads=1)
    assert rt.generate("what color is the circle", max_new_tokens=2).finish_reason
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.open(tmp_path / junk[0])  # the interrupted export is not a bundle
    capsys.readouterr()
    rows.append(["kill -9 inside export_bundle", "verify + Runtime.load", "previous bundle verifies and runs",
                 f"child killed after {waited:.1f} s"])


def test_signed_bundle_verifies_only_with_its_key(rows, bundle, tmp_path, capsys):
    """Hashes catch accidents; a deliberate edit that re-hashes the manifest passes them and only the signature
    (``nvila-edge verify --key``) catches it."""
    pytest.importorskip("cryptography")
    from nvila_edge.bundle import BundleWriter
    from nvila_edge.signing import SIGNATURE, generate_key, sign_manifest

    key, other = generate_key(tmp_path / "key.pem"), generate_key(tmp_path / "other.pem")
    signed = tmp_path / "signed"
    shutil.copytree(bundle, signed)
    sign_manifest(signed, key)
    assert cli(["verify", str(signed), "--key", f"{key}.pub"]) == 0 and "signature: OK" in capsys.readouterr().out
    assert cli(["verify", str(signed), "--key", str(key)]) == 0  # the private key verifies too (its public half)
    assert cli(["verify", str(signed), "--key", f"{other}.pub"]) == 2 and "does not match" in capsys.readouterr().err
    assert cli(["verify", str(bundle), "--key", f"{key}.pub"]) == 2 and "not signed" in capsys.readouterr().err
    # the attacker's edit: a longer context, the manifest re-hashed so every hash holds
    make_corpus._manifest_edit(make_corpus._config_set("context_length", 65536), rehash=True)(signed)
    assert cli(["verify", str(signed)]) == 0  # the hashes alone cannot tell
    capsys.readouterr()
    msg = _refused(lambda: Bundle.open(signed, key=f"{key}.pub"), BundleError, r"signature does not match")
    assert cli(["verify", str(signed), "--key", f"{key}.pub"]) == 2
    (signed / SIGNATURE).write_text("garbage!")
    _refused(lambda: Bundle.open(signed, key=f"{key}.pub"), BundleError, r"signature does not match")
    _refused(lambda: Bundle.open(signed, key=tmp_path / "key.pem.missing"), BundleError, r"cannot read the key")
    # BundleWriter(sign_key=...) writes the signature inside the atomic directory
    b = Bundle.open(bundle)
    with BundleWriter(tmp_path / "w", b.config, sign_key=key) as w:
        w.path_for("cpu/x.bin").write_bytes(b"x")
        w.add_target("cpu", files={"x": "cpu/x.bin"}, precision="fp32")
    assert Bundle.open(tmp_path / "w", key=f"{key}.pub").manifest["files"]["cpu/x.bin"]["size"] == 1
    rows.append(["bundle: config edited and manifest re-hashed", "verify --key", "BundleError (exit 2)", msg[:90]])
