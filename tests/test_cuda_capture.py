"""The CUDA-graph decode step and the device sampler, traced on the meta device with the capture-mode branches
forced (``torch.cuda.is_current_stream_capturing`` → True) and the W4A16 layers on tinygemm's CUDA op: a
captured step may not read a value on the host (``.item()``, ``int(tensor)``), touch a CPU tensor or numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_model
from nvila_edge import NVILAConfig
from nvila_edge import quant_format as QF
from nvila_edge.modeling import quantized as Q
from nvila_edge.pipelines.bench.gpu import random_quantized_tensors
from nvila_edge.sampling import SamplingParams

HOST_READS = ("_local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal")


class Watch(TorchDispatchMode):
    """Every aten op that runs, and any that reads to the host or sees a tensor off the meta device."""

    def __init__(self):
        super().__init__()
        self.ops, self.bad = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        self.ops.append(name)
        if any(h in name for h in HOST_READS):
            self.bad.append(f"host read: {name}")
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.bad.append(f"{name} on {t.device}")
            if isinstance(t, np.ndarray):
                self.bad.append(f"{name} reads numpy")
        return out


def _as_cuda_int4(m: Q.Int4Linear, dtype) -> None:
    """What ``prepare``'s CUDA branch leaves (tinygemm's [N/8, K/(inner*16), 32, inner/2] int32 weight and the
    bf16 [K/g, N, 2] scale/zero), on meta: the forward then dispatches tinygemm's CUDA op."""
    n, k = m.out_features, m.in_features
    inner = Q.inner_k_tiles(k)
    m.mode, m._dtype, m._mm = "int4", dtype, torch.ops.aten._weight_int4pack_mm
    m._packed = torch.empty(n // 8, k // (inner * 16), 32, inner // 2, dtype=torch.int32, device="meta")
    m._packed.fake_device = torch.device("cuda", 0)  # tinygemm's meta kernel checks the CUDA layout by this
    m._sz = torch.empty(k // m.group_size, n, 2, dtype=dtype, device="meta")
    m._pqs = None if m.pre_quant_scale is None else torch.empty(k, dtype=dtype, device="meta")
    m._bias = None if m.bias is None else torch.empty(n, dtype=dtype, device="meta")
    m._dense_min_m = Q.KernelOptions().resolve(torch.device("cuda")).int4_dense_min_m


@pytest.fixture(scope="module")
def meta_llm():
    cfg = NVILAConfig.from_preset("tiny")
    tensors = random_quantized_tensors(make_model(cfg), group_size=32)
    model = Q.build_quantized(cfg, tensors)  # on meta
    dt = torch.bfloat16
    model.to(dt)
    for m in model.modules():
        if isinstance(m, Q.Int4Linear):
            _as_cuda_int4(m, dt)
        elif isinstance(m, Q.Int8Head):
            assert Q.KernelOptions().resolve(torch.device("cuda")).head == "dense"
            m.mode, m._dtype = "dense", dt
            m._dense = torch.empty(m.source.num_embeddings, m.source.embedding_dim, dtype=dt, device="meta")
        elif isinstance(m, Q.Int8Embedding):
            m._dtype = dt
    n4 = sum(isinstance(m, Q.Int4Linear) for m in model.modules())
    assert n4 == 7 * cfg.llm.num_hidden_layers
    return model.llm


def test_decode_step_is_capturable(meta_llm, monkeypatch):
    from nvila_edge.runtime.backends.cuda_graph import GraphDecoder

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    from nvila_edge.modeling.decoding import decode_one_token

    monkeypatch.setattr(GraphDecoder, "_capture", lambda self: None)  # the step itself is what is traced
    g = GraphDecoder(meta_llm, 64)
    with torch.inference_mode():
        decode_one_token(g.llm, g.cache, g.ids, g.pos)  # the static cache's tensors, made outside the trace
        w = Watch()
        with w:
            logits = decode_one_token(g.llm, g.cache, g.ids, g.pos)
    assert logits.shape[-1] == meta_llm.config.vocab_size and logits.device.type == "meta"
    assert w.bad == [], w.bad[:5]
    assert sum("_weight_int4pack_mm" in op for op in w.ops) == 7 * meta_llm.config.num_hidden_layers
    assert len(w.ops) > 50


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(repetition_penalty=1.3),
                                    SamplingParams(temperature=0.7, top_k=20),
                                    SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.1, seed=1)])
def test_sampler_pick_is_sync_free(params):
    """Every sampling mode: fixed-shape ops on the device, no host read until the one copy of the id."""
    from nvila_edge.runtime.backends.torch import TorchSampler

    s = TorchSampler(params, "cpu")
    s.gen = None  # meta kernels take no generator (the draw is the same op)
    logits = torch.empty(1000, device="meta")
    s._seen = torch.zeros(1000, dtype=torch.bool, device="meta")
    s._counted, s._last = 1, (torch.empty((), dtype=torch.long, device="meta"), 7)
    w = Watch()
    with w:
        tok = s.pick(logits, [7, 7])  # the second 7: the sampler's own pick, kept on the device
    assert tok.shape == () and tok.device.type == "meta"
    assert w.bad == [], w.bad[:5]


class DeviceIds(torch.Tensor):
    """Ids as a CUDA tensor behaves for numpy (``np.asarray`` refuses it), on a CPU machine."""

    def __array__(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first")

    def cpu(self, *args, **kwargs):
        return torch.Tensor.as_subclass(self, torch.Tensor)


def test_model_accepts_device_tensor_ids(tiny_model, tokenizer):
    """After ``ProcessedInputs.to("cuda")`` the ids are a device tensor: generate and the loss take it."""
    from nvila_edge.modeling.model import host_ids

    ids = tokenizer.encode("what color is the circle?")
    dev = torch.tensor([ids]).as_subclass(DeviceIds)
    with pytest.raises(TypeError):
        np.asarray(dev)
    assert host_ids(dev).tolist() == ids
    a = tiny_model.generate(input_ids=dev, tokenizer=tokenizer, max_new_tokens=4)
    b = tiny_model.generate(input_ids=ids, tokenizer=tokenizer, max_new_tokens=4)
    assert a.token_ids == b.token_ids
    with torch.no_grad():
        la = tiny_model(input_ids=dev, labels=torch.tensor(ids), media=[])
        lb = tiny_model(input_ids=ids, labels=torch.tensor(ids), media=[])
    assert torch.allclose(la.loss if hasattr(la, "loss") else la, lb.loss if hasattr(lb, "loss") else lb)
