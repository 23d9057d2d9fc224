"""The gguf export target and the llama.cpp LLM engine (``Runtime.load(bundle, llm_engine="llamacpp")``).

Ladder: calibrated torch (ModelOpt AWQ int4) → GGUF tensors (the codes exactly, Q4_0) → llama.cpp logits vs the ORT
decoder's on the same bundle → Runtime answers. The engine tests skip (with the reason) without llama-cpp-python."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from nvila_edge import BackendUnavailable, BundleError, ContextOverflowError, NVILAConfig, NVILAProcessor
from nvila_edge.bundle import Bundle

from conftest import make_model, random_image

pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("onnxruntime")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.filterwarnings("ignore")

try:
    import llama_cpp  # noqa: F401

    LLAMA = None
except ImportError as e:
    LLAMA = f"llama-cpp-python is not installed (pip install 'nvila-edge[llamacpp]'): {e}"
needs_llama = pytest.mark.skipif(LLAMA is not None, reason=LLAMA or "")


def _items(n):
    return [{"conversation": "<image>\nwhat color is the circle?", "images": [random_image(120 + 40 * i, 100, seed=i)]}
            for i in range(n)] + [{"conversation": "how many shapes"}]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tokenizer):
    from nvila_edge.calibration import calibrate, load_calibrated
    from nvila_edge.export import export_bundle

    tmp = tmp_path_factory.mktemp("gguf")
    model = make_model(NVILAConfig.from_preset("demo"), seed=0)
    model.tokenizer = tokenizer
    proc = NVILAProcessor(model.config, tokenizer)
    calibrate(model, tmp / "cal", data=_items(4), num_samples=4, num_heldout=1, processor=proc, progress=False)
    export_bundle(tmp / "cal", tmp / "bundle", "cpu,gguf".split(","), progress=False)
    return tmp / "bundle", load_calibrated(tmp / "cal")


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_int4_codes_are_carried_exactly(bundle):
    """Each Q4_0 block dequantizes to the calibrated fake-quantized weight (d is fp16 of the AWQ scale)."""
    from gguf.quants import dequantize

    path, cal = bundle
    b = Bundle.open(path)
    t = _tensors(b.file("llm", "gguf"))
    layer = cal.llm.model.layers[0]
    fq = lambda lin: lin.weight_quantizer(lin.weight.detach()).float()  # noqa: E731
    down = layer.mlp.down_proj.input_quantizer.pre_quant_scale.float().reshape(-1)
    pqs = lambda lin: lin.input_quantizer.pre_quant_scale.float().reshape(-1)  # noqa: E731
    deq = lambda name: torch.from_numpy(dequantize(t[name].data, t[name].tensor_type)).float()  # noqa: E731
    # down_proj (its scale folded into up_proj's rows): its very codes, only fp16(d) rounds
    assert t["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert torch.allclose(deq("blk.0.ffn_down.weight"), fq(layer.mlp.down_proj), rtol=2 ** -10, atol=1e-7)
    # awq_lite gave o_proj (never foldable under GQA) and up_proj their own input scales: scaled weight re-quantized
    at, mlp = layer.self_attn, layer.mlp
    for name, ref in (("attn_output", fq(at.o_proj) * pqs(at.o_proj)[None, :]),
                      ("ffn_up", fq(mlp.up_proj) * pqs(mlp.up_proj)[None, :] * down[:, None])):
        w = deq(f"blk.0.{name}.weight")
        assert t[f"blk.0.{name}.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # the default, near-exact
        assert torch.nn.functional.cosine_similarity(w.flatten(), ref.flatten(), 0) > 0.9999 and not torch.allclose(w, ref)
    # the head keeps its int8 row codes, the manifest says which types and which folds were written
    info = b.target("gguf")["io"]["llm"]
    assert t["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0 and info["types"]["output.weight"] == "q8_0"
    n = len(cal.llm.model.layers)
    assert info["awq_folds"]["down_into_up_rows"] == n and info["types"]["blk.0.attn_output.weight"] == "q8_0-requant"
    assert info["awq_folds"]["requantized"] == sum(v.endswith("-requant") for v in info["types"].values()) >= n


def test_q4_0_nibble_order():
    """Q4_0: element j in the low nibble, j + 16 in the high one (MatMulNBits is even / odd)."""
    from gguf.quants import dequantize

    from nvila_edge.export.gguf import q4_0_blocks

    codes = np.tile(np.arange(16, dtype=np.uint8), 4).reshape(1, 64)
    codes[0, 16:32] = 15 - codes[0, 16:32]
    raw = q4_0_blocks(codes, np.array([[0.5]], np.float32))
    assert raw.shape == (1, 36) and raw[0, 2] == (codes[0, 0] | (codes[0, 16] << 4))
    w = dequantize(raw, gguf.GGMLQuantizationType.Q4_0).reshape(-1)
    assert np.array_equal(w, (codes[0].astype(np.float32) - 8) * 0.5)


def test_manifest_hashes_the_gguf_and_verify_refuses_a_tampered_one(bundle, tmp_path):
    import shutil

    path, _ = bundle
    b = Bundle.open(path)
    assert "gguf/llm.gguf" in b.manifest["files"] and b.target("gguf")["files"]["vision"] == "cpu/vision.onnx"
    copy = tmp_path / "b"
    shutil.copytree(path, copy)
    f = copy / "gguf" / "llm.gguf"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="llm.gguf"):
        Bundle.open(copy)


def test_gguf_needs_the_cpu_target(bundle, tmp_path):
    from nvila_edge import ExportError
    from nvila_edge.export import export_bundle

    with pytest.raises(ExportError, match="cpu,gguf"):
        export_bundle(bundle[0].parent / "cal", tmp_path / "x", "gguf", progress=False)
    assert not (tmp_path / "x").exists()


def test_shape_or_type_mismatch_names_the_tensor(bundle):
    from nvila_edge.runtime.backends.llamacpp import check_gguf

    path, _ = bundle
    b = Bundle.open(path)
    info = dict(b.target("gguf")["io"]["llm"])
    check_gguf(b.file("llm", "gguf"), info)  # the bundle's own agrees
    with pytest.raises(BundleError, match=r"blk\.0\.ffn_gate\.weight has shape"):
        check_gguf(b.file("llm", "gguf"), dict(info, intermediate_size=info["intermediate_size"] + 32))
    with pytest.raises(BundleError, match=r"blk\.0\.attn_q\.weight is Q8_0, the manifest says q4_0"):
        check_gguf(b.file("llm", "gguf"), dict(info, types={**info["types"], "blk.0.attn_q.weight": "q4_0"}))


def test_missing_library_names_the_extra(bundle, monkeypatch):
    from nvila_edge.runtime import Runtime

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(BackendUnavailable, match=r"nvila-edge\[llamacpp\]"):
        Runtime.load(bundle[0], llm_engine="llamacpp")


def test_no_gguf_target_is_refused(tmp_path, tiny_model, tokenizer):
    from conftest import write_bundle
    from nvila_edge.runtime import Runtime

    p = write_bundle(tmp_path / "b", tiny_model, tokenizer)
    with pytest.raises(BundleError, match="--target cpu,gguf"):
        Runtime.load(p, llm_engine="llamacpp")


# ---- the engine ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(bundle):
    from nvila_edge.runtime import Runtime

    path, _ = bundle
    ort = Runtime.load(path, threads=1)
    lc = Runtime.load(path, threads=1, llm_engine="llamacpp")
    yield ort, lc
    lc.close()


def _cos(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


@needs_llama
def test_logits_match_the_ort_decoder(engines):
    ort, lc = engines
    rng = np.random.default_rng(0)
    ids = rng.integers(0, ort.config.llm.vocab_size, 96)
    embeds = ort.backend.embed_tokens(ids)[None]
    co, cl = ort.backend.new_cache(256), lc.backend.new_cache(256)
    assert _cos(ort.backend.prefill(embeds, co), lc.backend.prefill(embeds, cl)) >= 0.999
    for t in (5, 17, 99):
        assert _cos(ort.backend.decode_step(t, co), lc.backend.decode_step(t, cl)) >= 0.999
    assert cl.length == co.length == 99
    assert lc.describe()["llm"]["engine"] == "llamacpp"


@needs_llama
def test_greedy_answers_equal_the_ort_engine(engines):
    ort, lc = engines
    params = dict(max_new_tokens=12, temperature=0.0)
    img = random_image(160, 120, seed=3)
    for prompt, images in (("what color is the circle?", [img]), ("how many shapes", None)):
        a = ort.generate(prompt, images=images, **params)
        b = lc.generate(prompt, images=images, **params)
        assert b.token_ids == a.token_ids, prompt
        assert len(b.token_ids) > 0


@needs_llama
def test_caches_are_sequences_interleaved_and_rolled_back(engines):
    _, lc = engines
    be = lc.backend
    e = be.embed_tokens(np.arange(1, 40))[None]
    a, b = be.new_cache(128), be.new_cache(128)
    la = be.prefill(e[:, :20], a)
    lb = be.prefill(e[:, :30], b)  # b's positions do not disturb a's
    assert a.seq != b.seq
    la2 = be.decode_step(7, a)
    fresh = be.new_cache(128)
    be.prefill(e[:, :20], fresh)
    assert np.allclose(la2, be.decode_step(7, fresh), atol=1e-3)
    # rollback: truncate a to 20 and replay the same step
    a.truncate(20)
    assert np.allclose(be.decode_step(7, a), la2, atol=1e-3)
    assert a.length == 21 and b.length == 30 and lb.shape == la.shape
    for c in (a, b, fresh):
        c.close()


@needs_llama
def test_prompt_longer_than_the_context_is_refused_before_compute(engines):
    _, lc = engines
    be = lc.backend
    cache = be.new_cache()
    n = be.llm.n_ctx + 1
    with pytest.raises(ContextOverflowError, match=str(n)):
        be.prefill(np.zeros((1, n, be.config.llm.hidden_size), np.float32), cache)
    assert cache.length == 0
    cache.close()


@needs_llama
def test_a_killed_stream_frees_its_sequence(engines):
    _, lc = engines
    free = len(lc.backend.llm._free)
    gen = lc.stream("how many shapes", max_new_tokens=30)
    next(gen)
    next(gen)
    gen.close()  # the client went away
    pooled = lc._pool[-1]
    assert pooled.length == 0  # the next request on that cache starts empty
    assert lc.backend.llm.L.llama_memory_seq_pos_max(lc.backend.llm.mem, pooled.seq) == -1
    assert len(lc.backend.llm._free) == free - 1 or pooled.seq not in lc.backend.llm._free  # the pool keeps its id
    # and it answers like a fresh engine afterwards
    p = dict(max_new_tokens=6)
    assert lc.generate("how many shapes", **p).token_ids == lc.generate("how many shapes", **p).token_ids


@needs_llama
def test_demo_bundle_parity_on_the_llamacpp_engine(bundle, tmp_path):
    """The demo's parity line for llama.cpp (``bundle_parity(..., llm_engine="llamacpp")``) on the tiny bundle: the
    calibrated torch model's greedy tokens vs the gguf target's. Untrained weights are the hard case (near-flat
    logits); measured 2026-12-08: 32 of 32 tokens equal, 4 of 4 answers."""
    from PIL import Image

    from nvila_edge.pipelines.demo import bundle_parity
    from nvila_edge.training.data import Record

    records = []
    for i in range(4):
        f = tmp_path / f"{i}.png"
        Image.fromarray(random_image(120 + 40 * i, 100, seed=20 + i)).save(f)
        conv = [{"from": "human", "value": "<image>\nwhat color is the circle?"}, {"from": "gpt", "value": "red"}]
        records.append(Record(id=str(i), conversations=conv, images=[f], video=None, source="test", line=i))
    p = bundle_parity(bundle[0].parent / "cal", bundle[0], records, progress=False, llm_engine="llamacpp")
    assert p["prompts"] == 4 and 0.0 <= p["token_agreement"] <= 1.0 and 0.0 <= p["bundle_accuracy"] <= 1.0
    assert p["token_agreement"] >= 0.95 and p["answer_agreement"] >= 0.75  # the demo's bar is 99 % over 200 questions
