"""ONNX Runtime backend on a tiny exported bundle: same greedy tokens as torch (fp32), KV reuse and growth,
int4 agreement, and the light import path (no torch in the process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_image, write_bundle
from nvila_edge.runtime import Runtime
from nvila_edge.runtime.backends.onnxruntime import OrtBackend
from nvila_edge.runtime.backends.torch import TorchBackend

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model, tokenizer):
    return write_bundle(tmp_path_factory.mktemp("ort") / "bundle", tiny_model, tokenizer, torch_target=True)


@pytest.fixture(scope="module")
def ort_rt(bundle):
    return Runtime.load(bundle, backend="onnxruntime", threads=1)


@pytest.fixture(scope="module")
def torch_rt(tiny_model, tokenizer):
    return Runtime(tiny_model.config, tokenizer, TorchBackend(tiny_model))


def test_auto_picks_onnxruntime_and_reads_limits(bundle):
    rt = Runtime.load(bundle)
    assert rt.backend.name == "onnxruntime" and rt.backend.device == "cpu"
    assert rt.describe()["kv"] == "shared-buffer"
    assert rt.context_length == rt.bundle.target("cpu")["limits"]["context_length"]


def test_torch_backend_loads_from_the_bundle(bundle, torch_rt, one_thread):
    rt = Runtime.load(bundle, backend="torch")
    assert rt.backend.name == "torch"
    assert rt.generate("hello", max_new_tokens=4).token_ids == torch_rt.generate("hello", max_new_tokens=4).token_ids


@pytest.mark.parametrize("case", ["image", "video", "two images", "text"])
def test_same_greedy_tokens_as_torch(ort_rt, torch_rt, case, one_thread):
    media = {
        "image": {"images": [random_image(640, 360, seed=1)]},
        "video": {"video": [random_image(64, 48, seed=s) for s in range(8)]},
        "two images": {"images": [random_image(200, 300, seed=2), random_image(300, 200, seed=3)]},
        "text": {},
    }[case]
    a = ort_rt.generate(QUESTION, max_new_tokens=12, **media)
    b = torch_rt.generate(QUESTION, max_new_tokens=12, **media)
    assert a.token_ids == b.token_ids and a.usage == b.usage
    assert a.plan.media == b.plan.media


def test_components_match_torch(ort_rt, tiny_model, one_thread):
    be, ref = ort_rt.backend, TorchBackend(tiny_model)
    px = np.random.default_rng(0).standard_normal((3, 3, 448, 448)).astype(np.float32)
    np.testing.assert_allclose(be.encode_tiles(px), ref.to_numpy(ref.encode_tiles(px)), atol=2e-4)
    f = np.random.default_rng(1).standard_normal((2, 1024, tiny_model.config.mm_hidden_size)).astype(np.float32)
    np.testing.assert_allclose(be.project(f), ref.project(f), atol=1e-4)
    ids = np.asarray([1, 5, 198, 300])
    np.testing.assert_allclose(be.embed_tokens(ids), ref.embed_tokens(ids), atol=1e-6)
    e = ref.embed_tokens(np.arange(20))[None]
    cb, cr = be.new_cache(), ref.new_cache()

    def same(a, b):
        np.testing.assert_allclose(a, ref.to_numpy(b), atol=1e-3)

    same(be.prefill(e[:, :13], cb), ref.prefill(e[:, :13], cr))
    same(be.prefill(e[:, 13:], cb), ref.prefill(e[:, 13:], cr))  # prefill on a cache
    same(be.decode_step(7, cb), ref.decode_step(7, cr))
    cb.truncate(10), cr.truncate(10)
    assert cb.length == cr.length == 10
    same(be.decode_step(9, cb), ref.decode_step(9, cr))


def test_kv_buffers_grow_without_changing_results(bundle, tiny_model, one_thread):
    from nvila_edge.bundle import Bundle

    b = Bundle.open(bundle)
    small = OrtBackend.from_bundle(b, threads=1, capacity=8)
    big = OrtBackend.from_bundle(b, threads=1)
    e = big.embed_tokens(np.arange(30))[None]
    cs, cb = small.new_cache(), big.new_cache()
    assert cs.capacity == small.describe()["kv_capacity"] == 8
    np.testing.assert_allclose(small.prefill(e[:, :6], cs), big.prefill(e[:, :6], cb), atol=1e-5)
    np.testing.assert_allclose(small.prefill(e[:, 6:], cs), big.prefill(e[:, 6:], cb), atol=1e-5)  # 8 → 32 positions
    for t in (3, 4, 5):
        np.testing.assert_allclose(small.decode_step(t, cs), big.decode_step(t, cb), atol=1e-5)
    assert cs.capacity == 64 and cs.length == 33  # 8 → 32 → 64


def test_long_prefill_runs_in_chunks_with_the_same_logits(bundle, tiny_model, monkeypatch, one_thread):
    """A prompt longer than PREFILL_CHUNK is fed in chunks over the cache: same logits and KV as one run."""
    from nvila_edge.bundle import Bundle
    from nvila_edge.runtime.backends import onnxruntime as ob

    be = OrtBackend.from_bundle(Bundle.open(bundle), threads=1)
    chunk = ob.PREFILL_CHUNK
    e = be.embed_tokens(np.random.default_rng(0).integers(10, 400, 2 * chunk + 17))[None]
    runs = []
    real = be._run
    monkeypatch.setattr(be, "_run", lambda x, c: runs.append(x.shape[1]) or real(x, c))
    cache = be.new_cache()
    chunked = be.prefill(e, cache)
    assert runs == [chunk, chunk, 17] and cache.length == e.shape[1]
    after = be.decode_step(5, cache)
    monkeypatch.setattr(ob, "PREFILL_CHUNK", 10_000)
    cache.clear()
    whole = be.prefill(e, cache)
    assert runs[-1] == e.shape[1]
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(be.decode_step(5, cache), after, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(ob, "PREFILL_CHUNK", chunk)
    cache.clear()
    runs.clear()
    be.prefill(e[:, :chunk], cache)  # exactly one chunk: one run
    assert runs == [chunk]


def test_session_on_ort_equals_fresh_prompt(ort_rt, bundle, one_thread):
    fresh_rt = Runtime.load(bundle, backend="onnxruntime", threads=1)
    img = random_image(500, 300, seed=7)
    s = ort_rt.session()
    a1 = s.generate("What is it?", images=[img], max_new_tokens=6, stop="OX")
    a2 = s.generate("And then?", max_new_tokens=6)
    conv = [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": a1.text},
            {"role": "user", "content": "And then?"}]
    assert a2.token_ids == fresh_rt.generate(conv, images=[img], max_new_tokens=6).token_ids


def test_video_stream_on_ort(ort_rt, one_thread):
    frames = [random_image(48, 48, seed=s) for s in range(8)]
    vs = ort_rt.video_stream(fps=1, window_s=8)
    for i, f in enumerate(frames):
        vs.push(f, timestamp=float(i))
    assert vs.generate(QUESTION, max_new_tokens=6).token_ids == ort_rt.generate(QUESTION, video=frames,
                                                                                max_new_tokens=6).token_ids


def test_int4_decoder_agrees_with_torch(tmp_path, tiny_model, tokenizer, one_thread):
    """Teacher-forced along torch's greedy path. Random tiny weights have near-tied logits (top-1 margins
    of ~0.05), so top-1 agreement says little here (the >= 95 % target is for trained weights); the
    logits must still be close and torch's choice always among the int4 top 5."""
    path = write_bundle(tmp_path / "int4", tiny_model, tokenizer, precision="int4")
    rt = Runtime.load(path, backend="onnxruntime", threads=1)
    assert rt.bundle.target("cpu")["io"]["decoder"]["precision"] == "int4"
    ref = TorchBackend(tiny_model)
    embeds = rt.embed(rt.plan("Describe the picture in detail.", images=[random_image(300, 300, seed=4)]).inputs)
    co, ct = rt.backend.new_cache(), ref.new_cache()
    ours, theirs = rt.backend.prefill(embeds, co), ref.to_numpy(ref.prefill(embeds, ct))
    cos, top5 = [], []
    for _ in range(40):
        cos.append(float(ours @ theirs / np.linalg.norm(ours) / np.linalg.norm(theirs)))
        tok = int(np.argmax(theirs))
        top5.append(tok in np.argsort(ours)[-5:])
        ours, theirs = rt.backend.decode_step(tok, co), ref.to_numpy(ref.decode_step(tok, ct))
    assert np.mean(cos) >= 0.98 and np.mean(top5) >= 0.95, (np.mean(cos), np.mean(top5))


LIGHT = r"""
import json, sys
import nvila_edge.runtime
from nvila_edge.runtime import Runtime
import numpy as np
rt = Runtime.load(sys.argv[1], backend="onnxruntime", threads=1)
res = rt.generate("What is it?", images=[np.zeros((200, 300, 3), np.uint8)], max_new_tokens=4)
heavy = [m for m in ("torch", "transformers", "peft", "modelopt") if m in sys.modules]
print("RESULT " + json.dumps({"heavy": heavy, "tokens": len(res.token_ids), "backend": rt.backend.name}))
"""


def test_runtime_import_and_ort_run_load_no_torch(bundle):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", LIGHT, str(bundle)], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parents[1]), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    assert r["heavy"] == [] and r["backend"] == "onnxruntime" and r["tokens"] >= 1


def test_no_torch_needed_for_ort_backend_code():
    src = Path(__file__).resolve().parents[1] / "runtime"
    for f in list(src.glob("*.py")) + [src / "backends" / "onnxruntime.py", src / "backends" / "base.py"]:
        text = f.read_text()
        assert "import torch" not in text and "from torch" not in text, f
    assert torch  # the test module itself may use torch
