"""The ``cuda`` export target and the torch backend's low-bit kernels, on CPU (the CPU variants of tinygemm
and ``torch._int_mm``) and, marked ``gpu``, on CUDA: the int4 packing round-trips to ModelOpt's codes (and is
the cpu target's MatMulNBits bytes), the target reproduces the calibrated fake-quant model (logits within
2 % of their range, identical greedy tokens, vision cosine >= 0.999), answers as the cpu target on ONNX
Runtime, stores the LLM compactly; bad input; ``backend="auto"`` rules; the GPU sampler.

ModelOpt is needed only to build the calibrated model: where it is missing (the GPU machine) the gpu test reads
the artefacts scripts/gpu_check.py prepare made and carried (tests/cuda_artefacts.py), and the CPU tests that
need the fake-quant model itself skip."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nvila_edge import BackendUnavailable, BundleError, NVILAConfig, NVILAProcessor
from nvila_edge.bundle import Bundle
from nvila_edge import quant_format as qf
from nvila_edge.modeling import quantized as Q

import cuda_artefacts
from conftest import make_model, random_image

pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore")

LOGIT_TOL = 0.02  # max |Δlogit| / max |logit|: int8 token table + LM head, fp16 norms / biases
BF16_LOGIT_TOL = 3 * LOGIT_TOL  # the same with bf16 activations (tinygemm's dtype), CPU kernels or CUDA


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    pytest.importorskip("modelopt.torch.quantization")
    return cuda_artefacts.build(tmp_path_factory.mktemp("cuda-target"), tokenizer, make_model, random_image)


@pytest.fixture(scope="module")
def fake(built):
    from nvila_edge.calibration import load_calibrated

    return load_calibrated(built[0])


@pytest.fixture(scope="module")
def reference(request):
    """(bundle, reference outputs): the carried artefacts where they exist, else made here (needs ModelOpt)."""
    d = cuda_artefacts.carried()
    if d is not None:
        return d / "bundle", cuda_artefacts.read_reference(d)
    _, bundle, proc = request.getfixturevalue("built")
    fake = request.getfixturevalue("fake")
    ref = cuda_artefacts.reference_inputs(fake.config, proc, random_image)
    with torch.inference_mode():
        ref.update(logits=fake.llm(inputs_embeds=ref["x"]).logits.float(), features=fake.encode_tiles(ref["pixels"]))
    return bundle, ref


def _int4_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and qf.enabled_quantizer(m, "weight_quantizer") is not None and m.weight_quantizer.num_bits == 4]


def test_int4_codes_are_modelopt_codes_and_the_cpu_targets_bytes(built, fake):
    from safetensors.torch import load_file

    import onnx
    from onnx import numpy_helper

    _, bundle, _ = built
    b = Bundle.open(bundle)
    t = load_file(str(b.file("weights", "cuda")))
    mods = _int4_modules(fake)
    assert len(mods) == 7 * fake.config.llm.num_hidden_layers
    for name, lin in mods:
        wq = lin.weight_quantizer
        with torch.no_grad():
            fq = wq(lin.weight).float()
        g = int(wq.block_sizes[-1])
        amax = wq.amax.float().reshape(fq.shape[0], -1)
        scale = torch.where(amax <= 2.0 ** -24, torch.ones_like(amax), amax / 7.0)
        codes = torch.round(fq.reshape(fq.shape[0], -1, g) / scale[..., None]).reshape(fq.shape)
        assert torch.equal(qf.unpack_int4(t[f"{name}.qweight"]).float(), codes), name
        assert torch.equal(t[f"{name}.scales"], scale), name
        assert torch.allclose(qf.dequantize_int4(t[f"{name}.qweight"], t[f"{name}.scales"]), fq, atol=1e-6)
    g = onnx.load(str(b.file("decoder")), load_external_data=True).graph
    inits = {i.name: i for i in g.initializer}
    ort_bytes = numpy_helper.to_array(inits["model.layers.0.attn.o_proj.MatMul.weight_Q4"])
    ours = t["llm.model.layers.0.self_attn.o_proj.qweight"].numpy()
    assert np.array_equal(ort_bytes.reshape(ours.shape), ours)  # the very bytes MatMulNBits holds


def test_bundle_stores_the_llm_compactly(built):
    b = Bundle.open(built[1])
    spec = b.target("cuda")
    assert spec["precision"]["layers"]["int4"] == 7 * 2 and spec["precision"]["layers"]["w8a8"] == 6 * 2
    assert spec["files"]["weights"] == "cuda/model.safetensors"
    assert b.manifest["files"]["cuda/model.safetensors"]["sha256"]  # hashed like every target
    # the tiny model is mostly its int8 token table; the linears alone are ~0.27 of fp16
    assert spec["sizes"]["llm_bytes"] < 0.4 * spec["sizes"]["llm_fp16_bytes"]


def test_cuda_target_on_cpu_reproduces_the_fake_quant_model(built, fake, one_thread):
    _, bundle, proc = built
    b = Bundle.open(bundle)
    q = Q.load_quantized(b.config, b.file("weights", "cuda"), device="cpu")
    assert q.quant_modes == {"Int8Linear:int8": 12, "Int4Linear:int4": 14, "Int8Embedding:int8": 2,
                             "Int8Head:int8": 1}
    torch.manual_seed(0)
    x = torch.randn(1, 11, b.config.llm.hidden_size)
    with torch.inference_mode():
        a, r = q.llm(inputs_embeds=x).logits, fake.llm(inputs_embeds=x).logits
    assert (a - r).abs().max() <= LOGIT_TOL * r.abs().max(), float((a - r).abs().max())
    assert torch.equal(a.argmax(-1), r.argmax(-1))
    px = torch.as_tensor(proc("<image>\nwhat?", images=[random_image(300, 120, seed=5)]).pixel_values)
    with torch.inference_mode():
        fa, fr = q.encode_tiles(px), fake.encode_tiles(px)
    cos = torch.nn.functional.cosine_similarity(fa.reshape(-1, fa.shape[-1]), fr.reshape(-1, fr.shape[-1]))
    assert float(cos.mean()) >= 0.999
    ref = fake.generate(**proc("what color is the circle?", images=[random_image(200, 140, seed=7)]),
                        tokenizer=proc.tokenizer, max_new_tokens=10)
    from nvila_edge.runtime import Runtime

    rt = Runtime.load(bundle, backend="torch", device="cpu")
    assert rt.backend.describe()["target"] == "cuda"
    got = rt.generate("what color is the circle?", images=[random_image(200, 140, seed=7)], max_new_tokens=10)
    assert got.token_ids == ref.token_ids


def test_cuda_target_answers_as_the_cpu_target(built, one_thread):
    from nvila_edge.runtime.parity import compare_targets

    items = [{"question": "what color is the circle?", "images": [random_image(150 + 40 * i, 110, seed=i)]}
             for i in range(4)] + [{"question": "how many shapes are there"}]
    r = compare_targets(built[1], items, max_new_tokens=8, threads=1)
    assert r.total == 5 and r.fraction >= 0.8, r.mismatches


def test_heldout_questions_reads_training_jsonl(tmp_path):
    from nvila_edge.runtime.parity import heldout_questions

    (tmp_path / "h.jsonl").write_text(json.dumps({"id": "a", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}) + "\n")
    assert heldout_questions(tmp_path / "h.jsonl") == [{"question": "What?", "images": [str(tmp_path / "x.png")]}]


def test_wrong_int4_shape_is_refused_naming_the_tensor(built, tmp_path):
    from safetensors.torch import load_file, save_file

    b = Bundle.open(built[1])
    t = load_file(str(b.file("weights", "cuda")))
    key = "llm.model.layers.1.mlp.down_proj.qweight"
    t[key] = t[key][:, :-2].contiguous()
    save_file(t, str(tmp_path / "bad.safetensors"))
    with pytest.raises(BundleError, match=r"llm\.model\.layers\.1\.mlp\.down_proj"):
        Q.load_quantized(b.config, tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BundleError, match="cannot read"):
        Q.load_quantized(b.config, tmp_path / "junk.safetensors")


def test_cuda_only_bundle_without_cuda(built, monkeypatch):
    from nvila_edge.runtime import Runtime
    from nvila_edge.runtime import backends

    b = Bundle.open(built[1])
    del b.manifest["targets"]["cpu"]  # a cuda-only bundle
    monkeypatch.setattr(backends, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="cpu target"):
        Runtime.load(b, backend="auto")
    with pytest.raises(BackendUnavailable, match="cpu target"):
        Runtime.load(b, backend="torch")
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        Runtime.load(b, backend="torch", device="cuda")
    rt = Runtime.load(b, backend="auto", device="cpu")  # asked for the CPU: the CPU kernels
    assert rt.backend.describe()["target"] == "cuda" and rt.generate("how many", max_new_tokens=2).token_ids


def test_auto_choice_rules(monkeypatch):
    from nvila_edge.runtime import backends

    def bundle(*targets, engines=False):
        return SimpleNamespace(manifest={"targets": {t: {} for t in targets}}, path="B",
                               has=lambda role, target="cpu": engines and target == "tensorrt")

    monkeypatch.setattr(backends, "_installed", lambda m: True)  # every library "installed"
    monkeypatch.setattr(backends, "cuda_device_count", lambda: 1)  # the driver answers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends.choose_backend(bundle("cpu", "cuda", "torch")) == "onnxruntime"  # a CPU build beside a driver
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backends.choose_backend(bundle("cpu", "cuda", "torch")) == "torch"
    assert backends.choose_backend(bundle("cpu", "cuda"), device="cpu") == "onnxruntime"
    assert backends.choose_backend(bundle("cpu", "tensorrt", engines=True)) == "onnxruntime"  # never tensorrt
    monkeypatch.setattr(backends, "cuda_device_count", lambda: 0)
    assert backends.choose_backend(bundle("cpu", "cuda")) == "onnxruntime"
    assert backends.choose_backend(bundle("cuda", "torch")) == "torch"
    with pytest.raises(BackendUnavailable, match="cpu target"):
        backends.choose_backend(bundle("cuda"))
    assert backends.choose_backend(bundle("cuda"), device="cpu") == "torch"
    assert backends.cuda_device_count.__module__  # the real probe runs torch-free (ctypes)


def test_real_cuda_probe_is_torch_free():
    import subprocess
    import sys

    code = ("import sys; from nvila_edge.runtime.backends import cuda_device_count; n = cuda_device_count(); "
            "print(n, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    assert out[1] == "False" and int(out[0]) == torch.cuda.device_count()


def test_unsupported_gpu_falls_back_to_dense_with_a_warning(monkeypatch):
    torch.manual_seed(1)
    lin = Q.Int4Linear(256, 64, 128, bias=True, pre_quant_scale=True)
    lin.qweight.copy_(qf.pack_int4(torch.randint(-8, 8, (64, 256))))
    lin.scales.copy_(torch.rand(64, 2) * 0.1 + 0.01)
    lin.bias.copy_(torch.randn(64))
    lin.pre_quant_scale.copy_(torch.rand(256) + 0.5)
    x = torch.randn(3, 256)
    assert lin.prepare(torch.float32) == "int4"
    want = lin(x)
    assert torch.allclose(want, x @ lin.dequantized_weight().t() + lin.bias, atol=1e-4)
    monkeypatch.setattr(Q, "int4_kernel_support", lambda dev: "Test GPU (sm_75) has no int4 tinygemm kernel")
    with pytest.warns(RuntimeWarning, match="sm_75.*dequantized weights"):
        assert lin.prepare(torch.float32) == "dense"
    assert torch.allclose(lin(x), want, atol=1e-4)  # the same numbers, never different ones


def test_w8a8_module_is_modelopt_fake_quant():
    torch.manual_seed(2)
    lin = Q.Int8Linear(64, 48, bias=True, pre_quant_scale=True)
    lin.weight.copy_(torch.randint(-127, 128, (48, 64), dtype=torch.int8))
    lin.weight_scale.copy_(torch.rand(48) * 0.01 + 1e-3)
    lin.input_amax.fill_(2.5)
    lin.bias.copy_(torch.randn(48))
    lin.pre_quant_scale.copy_(torch.rand(64) + 0.5)
    x = torch.randn(5, 7, 64) * 2
    assert lin.prepare(torch.float32) == "int8"
    xs = x * lin.pre_quant_scale
    s = 127.0 / torch.tensor(2.5)
    ref = (torch.clamp(torch.round(xs * s), -128, 127) / s) @ (lin.weight.float() * lin.weight_scale[:, None]).t()
    assert torch.allclose(lin(x), ref + lin.bias, atol=1e-4)
    assert lin.prepare(torch.float32, kernel=False) == "dense"
    assert torch.allclose(lin(x), ref + lin.bias, atol=1e-4)


def test_torch_sampler_matches_numpy_rules():
    from nvila_edge.runtime.backends.torch import TorchSampler
    from nvila_edge.sampling import Sampler, SamplingParams

    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.standard_normal(300).astype(np.float32)
        logits[rng.integers(0, 300, 2)] = logits.max()  # ties: both pick the first maximum
        t = torch.from_numpy(logits)
        for params in (SamplingParams(), SamplingParams(repetition_penalty=1.5)):
            prev = [int(np.argmax(logits)), 3]
            assert TorchSampler(params, "cpu")(t, prev) == Sampler(params)(logits, prev)
        clean = torch.from_numpy(rng.standard_normal(300).astype(np.float32))  # no ties: one top token
        assert TorchSampler(SamplingParams(temperature=0.7, top_k=1), "cpu")(clean) == int(clean.argmax())
        assert TorchSampler(SamplingParams(temperature=0.7, top_p=1e-6), "cpu")(clean) == int(clean.argmax())
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=4)
    a = [TorchSampler(p, "cpu")(torch.from_numpy(logits)) for _ in range(3)]
    assert len(set(a)) == 1  # seeded: reproducible
    picks = {TorchSampler(SamplingParams(temperature=1.0, top_k=5, seed=s), "cpu")(torch.from_numpy(logits))
             for s in range(40)}
    assert picks <= set(np.argsort(logits)[-5:].tolist()) and len(picks) > 1


def test_cuda_in_target_all_and_cli_help():
    from nvila_edge.export import TARGETS

    assert "cuda" in TARGETS and TARGETS["cuda"].vision_recipes[1] == "w8a8-smoothquant"


EXPECTED_KERNELS = {  # the cuda target's tiny model: every quantized module on its kernel, none dense
    "cuda": {"Int8Linear:int8": 12, "Int4Linear:int4": 14, "Int8Embedding:int8": 2, "Int8Head:dense": 1},
    "cpu": {"Int8Linear:int8": 12, "Int4Linear:int4": 14, "Int8Embedding:int8": 2, "Int8Head:int8": 1},
}


def check_cuda_target(bundle, ref, device: str) -> None:
    """The quantized path in bf16 on ``device``'s kernels against the fp32 fake-quant model: logits within
    ``BF16_LOGIT_TOL`` of their range, vision cosine >= 0.99, and which kernels and which decode ran."""
    from nvila_edge.runtime import Runtime
    from nvila_edge.runtime.backends import choose_backend

    b = Bundle.open(bundle)
    q = Q.load_quantized(b.config, b.file("weights", "cuda"), device=device, dtype=torch.bfloat16)
    assert q.quant_modes == EXPECTED_KERNELS[device]
    with torch.inference_mode():
        a = q.llm(inputs_embeds=ref["x"].to(device, torch.bfloat16)).logits.float().cpu()
        fa = q.encode_tiles(ref["pixels"]).float().cpu()
    r, fr = ref["logits"], ref["features"]
    err = float((a - r).abs().max() / r.abs().max())
    assert err <= BF16_LOGIT_TOL, err
    cos = torch.nn.functional.cosine_similarity(fa.reshape(-1, fa.shape[-1]), fr.reshape(-1, fr.shape[-1]))
    assert float(cos.mean()) >= 0.99
    cuda = device.startswith("cuda")
    assert choose_backend(b, "auto") == ("torch" if cuda else "onnxruntime")
    rt = Runtime.load(bundle, backend="torch", device=device)
    d = rt.backend.describe()
    assert (d["backend"], d["target"], d["device"]) == ("torch", "cuda", device)
    assert d["decode"] == ("cuda-graph" if cuda else "eager")  # a silent eager fallback fails here
    assert d["kernels"] == EXPECTED_KERNELS[device]
    for kw in ({}, {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.2, "seed": 0}):
        assert len(rt.generate("how many", max_new_tokens=4, **kw).token_ids) >= 1


def test_cuda_target_in_bf16_on_the_cpu_kernels(reference):
    check_cuda_target(*reference, "cpu")


@pytest.mark.gpu
def test_cuda_target_on_cuda(reference, gpu_device):
    """The same on the GPU: tinygemm int4 (bf16) + cuBLASLt int8, CUDA-graph decode, GPU sampling. The carried
    artefacts make it run where ModelOpt is not installed (scripts/gpu_check.sh)."""
    check_cuda_target(*reference, gpu_device)
