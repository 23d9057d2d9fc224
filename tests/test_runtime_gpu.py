"""Torch backend on CUDA in fp16 (skipped without a GPU): close to the fp32 CPU reference, sessions reuse
the cache, the video stream works. ``gpu_device`` is "cpu" in the device check's dry run (every step on the
CPU, eager decoding)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_model, random_image
from nvila_edge.runtime import Runtime
from nvila_edge.runtime.backends.torch import TorchBackend

pytestmark = pytest.mark.gpu


def _np(e):
    """Runtime.embed gives the backend's own array (a device tensor on CUDA)."""
    return e.float().cpu().numpy() if hasattr(e, "cpu") else np.asarray(e)


@pytest.fixture(scope="module")
def gpu_rt(tiny_config, tokenizer, gpu_device):
    return Runtime(tiny_config, tokenizer, TorchBackend(make_model(tiny_config), device=gpu_device, dtype="float16"))


def test_fp16_cuda_follows_fp32_cpu(gpu_rt, tiny_model, tokenizer, gpu_device):
    be = gpu_rt.backend
    d = be.describe()
    assert (be.device, d["dtype"]) == (gpu_device, "float16")
    assert d["decode"] == ("cuda-graph" if gpu_device.startswith("cuda") else "eager")
    cpu = Runtime(tiny_model.config, tokenizer, TorchBackend(tiny_model, device="cpu"))
    inputs = cpu.plan("What is in the image?", images=[random_image(600, 400)]).inputs
    e_cpu, e_gpu = _np(cpu.embed(inputs)), _np(gpu_rt.embed(inputs))
    cos = np.sum(e_cpu * e_gpu, -1) / np.linalg.norm(e_cpu, axis=-1) / np.linalg.norm(e_gpu, axis=-1)
    assert cos.min() > 0.995
    cb, cc = be.new_cache(), cpu.backend.new_cache()
    ours, ref = _np(be.prefill(e_cpu, cb)), _np(cpu.backend.prefill(e_cpu, cc))
    top1 = []
    for _ in range(24):  # teacher-forced on the fp32 path
        tok = int(np.argmax(ref))
        top1.append(int(np.argmax(ours)) == tok)
        ours, ref = _np(be.decode_step(tok, cb)), _np(cpu.backend.decode_step(tok, cc))
    assert np.mean(top1) >= 0.9


def test_session_and_video_stream_on_cuda(gpu_rt, tiny_config, tokenizer, gpu_device):
    img = random_image(500, 300, seed=7)
    s = gpu_rt.session()
    a1 = s.generate("What is it?", images=[img], max_new_tokens=6)
    a2 = s.generate("And then?", max_new_tokens=6)
    fresh = Runtime(tiny_config, tokenizer, gpu_rt.backend.__class__(gpu_rt.backend.model, device=gpu_device))
    conv = [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": a1.text},
            {"role": "user", "content": "And then?"}]
    assert a2.token_ids == fresh.generate(conv, images=[img], max_new_tokens=6).token_ids
    vs = gpu_rt.video_stream(fps=1, window_s=8)
    frames = [random_image(48, 48, seed=i) for i in range(8)]
    for i, f in enumerate(frames):
        vs.push(f, timestamp=float(i))
    assert len(vs.generate("What happens?", max_new_tokens=4).token_ids) >= 1


def test_cuda_graph_decoding_equals_eager(gpu_rt, tiny_config, tokenizer, gpu_device):
    eager = Runtime(tiny_config, tokenizer, TorchBackend(gpu_rt.backend.model, device=gpu_device, cuda_graph=False))
    assert eager.backend.describe()["decode"] == "eager"
    inputs = eager.plan("What is in the image?", images=[random_image(400, 300, seed=2)]).inputs
    e = _np(eager.embed(inputs))
    a, b = gpu_rt.backend, eager.backend
    ca, cb = a.new_cache(), b.new_cache()
    assert type(ca).__name__ == "GraphDecoder" and type(cb).__name__ == "TorchKVCache"
    la, lb = _np(a.prefill(e, ca)), _np(b.prefill(e, cb))
    for step in range(16):
        assert np.abs(la - lb).max() < 0.05 * max(1.0, float(np.abs(lb).max())), step
        tok = int(np.argmax(lb))
        la, lb = _np(a.decode_step(tok, ca)), _np(b.decode_step(tok, cb))
    ca.truncate(e.shape[1] + 3), cb.truncate(e.shape[1] + 3)
    np.testing.assert_allclose(_np(a.decode_step(5, ca)), _np(b.decode_step(5, cb)),
                               atol=0.05 * max(1.0, float(np.abs(lb).max())))
