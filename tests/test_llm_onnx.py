"""LLM decoder / embedding export for the CPU bundle: ORT vs torch parity (fp32, int4 RTN, ModelOpt AWQ)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from conftest import make_model  # noqa: E402
from nvila_edge import NVILAConfig  # noqa: E402
from nvila_edge.errors import ExportError  # noqa: E402
from nvila_edge.export.llm_onnx import export_decoder, export_embeddings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LEN, NEW_TOKENS = 12, 12
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def trained(one_thread):
    """The tiny LLM trained a few seconds on a fixed token permutation: confident next-token choices like a
    real LM (random weights give near-ties that any int4 noise flips), with trained norms and q/k/v biases."""
    model = make_model(NVILAConfig.from_preset("tiny"))
    llm, vocab = model.llm, model.config.llm.vocab_size
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(vocab, generator=g)
    opt = torch.optim.Adam(llm.parameters(), lr=3e-3)
    llm.train()
    for _ in range(60):
        seq = [torch.randint(0, vocab, (16, 1), generator=g)]
        for _ in range(23):
            seq.append(perm[seq[-1]])
        ids = torch.cat(seq, 1)
        loss = llm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def prompts(model, n: int = 4) -> list[torch.Tensor]:
    """Mixed prompts: random "vision" embeddings followed by text-token embeddings."""
    g = torch.Generator().manual_seed(1)
    emb = model.llm.get_input_embeddings().weight.detach()
    out = []
    for _ in range(n):
        ids = torch.randint(0, model.config.llm.vocab_size, (PROMPT_LEN // 2,), generator=g)
        vis = torch.randn(PROMPT_LEN - len(ids), emb.shape[1], generator=g) * emb.std()
        out.append(torch.cat([vis, emb[ids]])[None])
    return out


def awq(model, block_size: int = 128):
    """A copy of ``model`` whose LLM is ModelOpt INT4-AWQ calibrated (what nvila_edge.calibration produces)."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    model = copy.deepcopy(model)
    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"][-1] = block_size
    data = prompts(model, 4)

    def loop(llm):
        for x in data:
            llm(inputs_embeds=x)

    mtq.quantize(model.llm, cfg, loop)
    return model


class OrtDecoder:
    """The runtime's contract: prefill on inputs_embeds, then one embedding per step with the KV cache; either
    plain feeds (cache copied out and back) or IOBinding with past and present in one preallocated buffer."""

    def __init__(self, path, io: dict, share_buffer: bool = False, max_len: int = 64):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.io, self.share, self.total = io, share_buffer, 0
        L, K, D = io["num_layers"], io["num_kv_heads"], io["head_dim"]
        self.names = [(io["past_key"].format(i=i), io["present_key"].format(i=i)) for i in range(L)]
        self.names += [(io["past_value"].format(i=i), io["present_value"].format(i=i)) for i in range(L)]
        size = max_len if share_buffer else 0
        self.cache = {p: np.zeros((1, K, size, D), np.float32) for p, _ in self.names}
        if share_buffer:
            self.cache = {p: ort.OrtValue.ortvalue_from_numpy(v) for p, v in self.cache.items()}

    def __call__(self, embeds: np.ndarray) -> np.ndarray:
        self.total += embeds.shape[1]
        mask = np.ones((1, self.total), np.int64)
        io = self.io
        if self.share:
            b = self.sess.io_binding()
            b.bind_cpu_input(io["inputs_embeds"], np.ascontiguousarray(embeds, np.float32))
            b.bind_cpu_input(io["attention_mask"], mask)
            b.bind_output(io["logits"])  # first, so it is output 0
            for past, present in self.names:
                b.bind_ortvalue_input(past, self.cache[past])
                b.bind_ortvalue_output(present, self.cache[past])
            self.sess.run_with_iobinding(b)
            return b.copy_outputs_to_cpu()[0][0, -1]
        feed = {io["inputs_embeds"]: embeds.astype(np.float32), io["attention_mask"]: mask, **self.cache}
        out = dict(zip([o.name for o in self.sess.get_outputs()], self.sess.run(None, feed)))
        self.cache = {past: out[present] for past, present in self.names}
        return out[io["logits"]][0, -1]


def run_pair(model, dec: OrtDecoder, x: torch.Tensor, steps: int, teacher: bool = True):
    """Prefill + ``steps`` decode steps on torch and ORT. ``teacher``: both are fed torch's greedy tokens
    (logits comparable at every step); else each follows its own greedy choice. Returns logits, tokens."""
    emb = model.llm.get_input_embeddings().weight.detach().numpy()
    cache = model.new_cache()
    tl = model.prefill(x, cache).float().numpy()
    ol = dec(x.numpy())
    t_logits, o_logits, t_tok, o_tok = [tl], [ol], [int(tl.argmax())], [int(ol.argmax())]
    for _ in range(steps):
        tl = model.decode_step(t_tok[-1], cache).float().numpy()
        ol = dec(emb[[t_tok[-1] if teacher else o_tok[-1]]][None])
        t_logits.append(tl)
        o_logits.append(ol)
        t_tok.append(int(tl.argmax()))
        o_tok.append(int(ol.argmax()))
    return np.stack(t_logits), np.stack(o_logits), t_tok, o_tok


def greedy_agreement(model, path, io, xs) -> float:
    same = total = 0
    for x in xs:
        _, _, t, o = run_pair(model, OrtDecoder(path, io), x, NEW_TOKENS, teacher=False)
        same += sum(a == b for a, b in zip(t, o))
        total += len(t)
    return same / total


def node_ops(path) -> list:
    return list(onnx.load(str(path), load_external_data=False).graph.node)


# ---- fp32 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("share_buffer", [False, True])
def test_fp32_decoder_matches_torch(trained, tmp_path, share_buffer):
    io = export_decoder(trained, tmp_path, precision="fp32")
    assert io["kv_dtype"] == "float32" and io["num_layers"] == 2 and io["position_ids"] is None
    for x in prompts(trained, 2):
        tl, ol, tt, ot = run_pair(trained, OrtDecoder(tmp_path / "decoder.onnx", io, share_buffer), x, 8)
        np.testing.assert_allclose(ol, tl, atol=1e-4 * max(1.0, np.abs(tl).max()), rtol=0)
        assert ot == tt
        _, _, tt, ot = run_pair(trained, OrtDecoder(tmp_path / "decoder.onnx", io, share_buffer), x, NEW_TOKENS, False)
        assert ot == tt  # free-running greedy: token for token


def test_fp32_io_contract(trained, tmp_path):
    io = export_decoder(trained, tmp_path, precision="fp32")
    m = onnx.load(str(tmp_path / "decoder.onnx"))
    ins, outs = {i.name for i in m.graph.input}, {o.name for o in m.graph.output}
    L = io["num_layers"]
    assert ins == {"inputs_embeds", "attention_mask"} | {io[k].format(i=i) for k in ("past_key", "past_value")
                                                         for i in range(L)}
    assert outs == {"logits"} | {io[k].format(i=i) for k in ("present_key", "present_value") for i in range(L)}
    ops = {n.op_type for n in m.graph.node}
    assert "GroupQueryAttention" in ops and "MatMulNBits" not in ops
    assert io["external_data"] is None and not (tmp_path / "decoder.onnx.data").exists()
    json.dumps(io)  # goes into the bundle manifest


# ---- int4 from an fp model (round to nearest) -------------------------------------------------------------
def dequantized_copy(model, path):
    """``model`` with every MatMulNBits weight replaced by its dequantized graph value (the int4 reference)."""
    m = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    ref = copy.deepcopy(model)
    for node in m.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        packed, scales = inits[node.input[1]], inits[node.input[2]]
        if a["bits"] == 4:
            codes = np.stack([packed & 15, packed >> 4], -1).reshape(a["N"], -1).astype(np.float32) - 8
        else:
            codes = packed.reshape(a["N"], -1).astype(np.float32) - 128
        w = torch.from_numpy((codes.reshape(a["N"], -1, a["block_size"]) * scales[..., None]).reshape(a["N"], -1))
        parts = node.name.split("/")
        if parts[1] == "lm_head":
            mods = [ref.llm.lm_head]
        else:
            layer = ref.llm.model.layers[int(parts[2].split(".")[1])]
            sub = getattr(layer, "self_attn" if parts[3] == "attn" else "mlp")
            mods = [sub.q_proj, sub.k_proj, sub.v_proj] if parts[4] == "qkv_proj" else [getattr(sub, parts[4])]
        rows = np.cumsum([0] + [mm.weight.shape[0] for mm in mods])
        with torch.no_grad():
            for mm, r0, r1 in zip(mods, rows[:-1], rows[1:]):
                mm.weight.copy_(w[r0:r1, :a["K"]])
    return ref


@pytest.mark.parametrize("lm_head", ["int8", "int4"])
def test_int4_rtn_weights_and_greedy(trained, tmp_path, lm_head):
    io = export_decoder(trained, tmp_path / "a1", precision="int4", accuracy_level=1, lm_head=lm_head)
    assert io["weights"] == "rtn" and io["block_size"] == 128
    ref = dequantized_copy(trained, tmp_path / "a1" / "decoder.onnx")
    for x in prompts(trained, 2):  # fp32 compute on the int4 weights: the same function as torch
        tl, ol, _, _ = run_pair(ref, OrtDecoder(tmp_path / "a1" / "decoder.onnx", io), x, 6)
        np.testing.assert_allclose(ol, tl, atol=2e-4 * np.abs(tl).max(), rtol=0)
    io = export_decoder(trained, tmp_path / "a4", precision="int4", lm_head=lm_head)  # int8 activations
    agree = greedy_agreement(trained, tmp_path / "a4" / "decoder.onnx", io, prompts(trained))
    print(f"int4 RTN (lm_head {lm_head}) vs fp32 torch: greedy agreement {agree:.3f}")
    assert agree >= 0.95


def count_linears(path, num_layers: int) -> dict:
    """(layer, projection) → MatMulNBits count; a fused qkv_proj covers q, k and v."""
    found = {}
    for n in node_ops(path):
        if n.op_type == "MatMulNBits" and n.name.startswith("/model/layers."):
            _, _, layer, _, proj, _ = n.name.split("/")
            for p in (("q_proj", "k_proj", "v_proj") if proj == "qkv_proj" else (proj,)):
                key = (int(layer.split(".")[1]), p)
                found[key] = found.get(key, 0) + 1
    return found


def test_int4_every_linear_is_matmulnbits(trained, tmp_path):
    io = export_decoder(trained, tmp_path, precision="int4")
    L = io["num_layers"]
    assert count_linears(tmp_path / "decoder.onnx", L) == {(i, p): 1 for i in range(L) for p in LINEARS}
    nodes = node_ops(tmp_path / "decoder.onnx")
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == 5 * L + 1  # fused qkv, o, gate, up, down + lm_head
    assert not any(n.op_type == "MatMul" for n in nodes)
    head = [n for n in nodes if n.name.startswith("/lm_head/MatMul")][0]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}["bits"] == 8


# ---- int4 from a ModelOpt AWQ-calibrated model ------------------------------------------------------------
@pytest.fixture(scope="module")
def calibrated(trained):
    return awq(trained)


def test_awq_int4_matches_fake_quant_torch(calibrated, tmp_path):
    io = export_decoder(calibrated, tmp_path / "a1", precision="int4", accuracy_level=1, lm_head="fp32")
    assert io["weights"] == "modelopt" and io["awq"]
    xs = prompts(calibrated)
    worst = 0.0
    for x in xs[:2]:  # fp32 compute: ORT must reproduce the fake-quant torch model
        tl, ol, _, _ = run_pair(calibrated, OrtDecoder(tmp_path / "a1" / "decoder.onnx", io), x, 6)
        worst = max(worst, float(np.abs(ol - tl).max() / np.abs(tl).max()))
    print(f"AWQ int4 (accuracy_level 1) vs fake-quant torch: max |logit diff| / max |logit| = {worst:.2e}")
    assert worst < 2e-4
    io = export_decoder(calibrated, tmp_path / "a4", precision="int4")
    tl, ol, _, _ = run_pair(calibrated, OrtDecoder(tmp_path / "a4" / "decoder.onnx", io), xs[0], 6)
    print(f"AWQ int4 (accuracy_level 4, lm_head int8): max |logit diff| / max |logit| = "
          f"{np.abs(ol - tl).max() / np.abs(tl).max():.2e}")
    agree = greedy_agreement(calibrated, tmp_path / "a4" / "decoder.onnx", io, xs)
    print(f"AWQ int4 (accuracy_level 4, lm_head int8) vs fake-quant torch: greedy agreement {agree:.3f}")
    assert agree >= 0.95
    L = io["num_layers"]
    assert count_linears(tmp_path / "a4" / "decoder.onnx", L) == {(i, p): 1 for i in range(L) for p in LINEARS}
    muls = [n.name for n in node_ops(tmp_path / "a4" / "decoder.onnx") if "pre_quant_scale" in n.name]
    assert len(muls) == 7 * L  # random calibration: every projection has its own AWQ scale


def test_awq_shared_scale_folds_into_norm(calibrated, tmp_path):
    model = copy.deepcopy(calibrated)
    with torch.no_grad():  # one scale per input group: folds into the RMSNorm weight, q/k/v stay fused
        for layer in model.llm.model.layers:
            for group in ((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                          (layer.mlp.gate_proj, layer.mlp.up_proj)):
                for m in group[1:]:
                    m.input_quantizer.pre_quant_scale = group[0].input_quantizer.pre_quant_scale
    io = export_decoder(model, tmp_path, precision="int4", accuracy_level=1, lm_head="fp32")
    nodes = node_ops(tmp_path / "decoder.onnx")
    assert sorted(n.name.split("/")[-3] for n in nodes if "pre_quant_scale" in n.name) == sorted(["down_proj", "o_proj"] * 2)
    assert sum("qkv_proj/MatMul" in n.name for n in nodes) == io["num_layers"]
    tl, ol, _, _ = run_pair(model, OrtDecoder(tmp_path / "decoder.onnx", io), prompts(model, 1)[0], 6)
    np.testing.assert_allclose(ol, tl, atol=2e-4 * np.abs(tl).max(), rtol=0)


def test_awq_fp32_export_keeps_fake_quant_values(calibrated, tmp_path):
    io = export_decoder(calibrated, tmp_path, precision="fp32")
    tl, ol, tt, ot = run_pair(calibrated, OrtDecoder(tmp_path / "decoder.onnx", io, True), prompts(calibrated, 1)[0], 6)
    np.testing.assert_allclose(ol, tl, atol=1e-4 * np.abs(tl).max(), rtol=0)


def test_awq_block_size_mismatch_is_an_error(calibrated, tmp_path):
    with pytest.raises(ExportError, match="block_size=128"):
        export_decoder(calibrated, tmp_path, precision="int4", block_size=64)


# ---- errors, embeddings -------------------------------------------------------------------------------------
def test_unsupported_settings_raise_export_error(tiny_model, tmp_path):
    with pytest.raises(ExportError, match="unsupported decoder precision 'int3'.*fp32, int4"):
        export_decoder(tiny_model, tmp_path, precision="int3")
    with pytest.raises(ExportError, match="lm_head"):
        export_decoder(tiny_model, tmp_path, precision="int4", lm_head="int2")
    with pytest.raises(ExportError, match="block_size"):
        export_decoder(tiny_model, tmp_path, block_size=100)
    with pytest.raises(ExportError, match="embedding dtype"):
        export_embeddings(tiny_model, tmp_path, dtype="bfloat16")
    assert not (tmp_path / "decoder.onnx").exists()


LOOKUP = r"""
import json, sys
import numpy as np
from nvila_edge.embeddings import load_embeddings
out = {}
for dtype in ("float32", "float16", "int8"):
    for mmap in (True, False):
        t = load_embeddings(sys.argv[1] + "/" + dtype + "/embeddings.safetensors", mmap=mmap)
        ids = np.array([[0, 5, 511], [198, 7, 7]])
        np.save(sys.argv[1] + f"/{dtype}_{mmap}.npy", t(ids))
        out[f"{dtype}_{mmap}"] = [t.vocab_size, t.hidden_size, list(t.end_token_ids)]
out["torch"] = "torch" in sys.modules
print("RESULT " + json.dumps(out))
"""


def test_embeddings_round_trip_without_torch(tiny_model, tmp_path):
    for dtype in ("float32", "float16", "int8"):
        info = export_embeddings(tiny_model, tmp_path / dtype, dtype=dtype)
        assert info == {"file": "embeddings.safetensors", "dtype": dtype, "vocab_size": 512, "hidden_size": 128,
                        "end_token_ids": [198]}
    r = subprocess.run([sys.executable, "-c", LOOKUP, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.split("RESULT ")[-1])
    assert res.pop("torch") is False
    assert all(v == [512, 128, [198]] for v in res.values())
    w = tiny_model.llm.get_input_embeddings().weight.detach().numpy()
    ref = w[np.array([[0, 5, 511], [198, 7, 7]])]
    amax = np.abs(w).max()
    for dtype, tol in (("float32", 0), ("float16", 1e-3 * amax), ("int8", amax / 127)):
        for mmap in (True, False):
            got = np.load(tmp_path / f"{dtype}_{mmap}.npy")
            assert got.dtype == np.float32 and got.shape == (2, 3, 128)
            np.testing.assert_allclose(got, ref, atol=tol, rtol=0)
