"""Speed / memory sanity check for the LLM decoder export (not a test; random weights, minutes at real size).

    python scripts/bench_llm_onnx.py export OUT [--preset nvila-lite-2b] [--lm-head int8] [--precision int4] [--awq]
        NVILAModel with random weights (optionally ModelOpt INT4-AWQ calibrated on random embeddings) → OUT/decoder.onnx + embeddings; prints peak RSS
    python scripts/bench_llm_onnx.py decode OUT [--prompt 128] [--tokens 64]
        our loop: IOBinding, past/present in one preallocated buffer; prints prefill s and decode tok/s
    python scripts/bench_llm_onnx.py genai OUT [--preset nvila-lite-2b] [--block-size 128]
        onnxruntime-genai's model builder (int4, CPU) on a random LLM of the same config, then its own
        generation loop; prints decode tok/s

Run the three in separate processes (each measures its own peak RSS) and on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cmd_export(a):
    import torch

    from nvila_edge import NVILAConfig, NVILAModel
    from nvila_edge.export.llm_onnx import export_decoder, export_embeddings

    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.no_grad():
        model = NVILAModel(NVILAConfig.from_preset(a.preset)).eval()
    print(f"model built in {time.perf_counter() - t:.0f} s, peak RSS {peak_rss_gb():.2f} GB", flush=True)
    if a.awq:  # ModelOpt INT4-AWQ on a few random embeddings: exercises the calibrated-weights path
        import modelopt.torch.quantization as mtq

        t = time.perf_counter()
        data = [torch.randn(1, 32, model.config.llm.hidden_size) * 0.02 for _ in range(2)]
        with torch.no_grad():
            mtq.quantize(model.llm, mtq.INT4_AWQ_CFG, lambda m: [m(inputs_embeds=x) for x in data])
        print(f"AWQ calibrated in {time.perf_counter() - t:.0f} s, peak RSS {peak_rss_gb():.2f} GB", flush=True)
    t = time.perf_counter()
    io = export_decoder(model, a.out, precision=a.precision, block_size=a.block_size, lm_head=a.lm_head,
                        max_length=a.max_length)
    print(f"decoder exported in {time.perf_counter() - t:.0f} s, peak RSS {peak_rss_gb():.2f} GB", flush=True)
    emb = export_embeddings(model, a.out)
    (Path(a.out) / "io.json").write_text(json.dumps(io, indent=1))
    sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in Path(a.out).iterdir()}
    print(json.dumps({"io": io, "embeddings": emb, "MiB": sizes, "peak_rss_gb": round(peak_rss_gb(), 2)}))


def cmd_decode(a):
    import onnxruntime as ort

    io = json.loads((Path(a.out) / "io.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    if not a.spin:  # spinning workers lose badly when another process holds a core
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    t = time.perf_counter()
    sess = ort.InferenceSession(str(Path(a.out) / io["file"]), so, providers=["CPUExecutionProvider"])
    print(f"session created in {time.perf_counter() - t:.1f} s, peak RSS {peak_rss_gb():.2f} GB", flush=True)
    L, K, D, H = io["num_layers"], io["num_kv_heads"], io["head_dim"], io["hidden_size"]
    max_len = a.prompt + a.tokens
    bufs = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, K, max_len, D), np.float32)) for _ in range(2 * L)]
    rng = np.random.default_rng(0)
    emb_table = rng.standard_normal((1024, H), dtype=np.float32) * 0.02

    logits_buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, io["vocab_size"]), np.float32))
    b = sess.io_binding()  # bound once: only the embeddings and the mask change per step
    b.bind_ortvalue_output("logits", logits_buf)
    for i in range(L):
        for j, (past, present) in enumerate(((io["past_key"], io["present_key"]),
                                             (io["past_value"], io["present_value"]))):
            b.bind_ortvalue_input(past.format(i=i), bufs[2 * i + j])
            b.bind_ortvalue_output(present.format(i=i), bufs[2 * i + j])
    masks = np.ones((1, max_len), np.int64)

    def step(embeds, total):
        b.bind_cpu_input("inputs_embeds", embeds)
        b.bind_cpu_input("attention_mask", masks[:, :total])
        sess.run_with_iobinding(b)
        return logits_buf.numpy()[0, -1]

    for rep in range(a.repeats):
        t = time.perf_counter()
        logits = step(rng.standard_normal((1, a.prompt, H), dtype=np.float32) * 0.02, a.prompt)
        prefill = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        for n in range(a.tokens):
            logits = step(emb_table[[int(logits.argmax()) % 1024]][None], a.prompt + n + 1)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        print(f"ours: prefill {a.prompt} tok {prefill:.2f} s, decode {a.tokens / dt:.1f} tok/s "
              f"({a.tokens / dc:.1f} tok per CPU-s)", flush=True)
    print(f"peak RSS {peak_rss_gb():.2f} GB")


def cmd_genai(a):
    """The builder loads the model through a monkeypatched load_weights (no second copy, no tokenizer)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nvila_edge import NVILAConfig, vila_format

    out = Path(a.out)
    if not (out / "genai_config.json").exists():
        from onnxruntime_genai.models import builder as B

        torch.manual_seed(0)
        cfg = Qwen2Config(**vila_format.llm_hf_config(NVILAConfig.from_preset(a.preset)))
        cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = 0
        with torch.no_grad():
            llm = Qwen2ForCausalLM(cfg).eval()
        B.get_hf_details = lambda *x, **k: {"extra_kwargs": {}, "hf_name": str(out), "hf_config": cfg}
        B.QwenModel.load_weights = lambda self, p: llm
        B.QwenModel.save_processing = lambda *x, **k: None
        opts = [f"block_size={a.block_size}", "accuracy_level=4"]
        kv = B.parse_extra_options(None, str(out), str(out), "int4", "cpu", str(out / "cache"), opts)
        t = time.perf_counter()
        B.create_model(None, str(out), str(out), "int4", "cpu", str(out / "cache"), **kv)
        print(f"builder: {time.perf_counter() - t:.0f} s, peak RSS {peak_rss_gb():.2f} GB", flush=True)
        del llm
    import onnxruntime_genai as og

    model = og.Model(str(out))
    rng = np.random.default_rng(0)
    for rep in range(a.repeats):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=a.prompt + a.tokens + 1, min_length=a.prompt + a.tokens + 1,
                                  do_sample=False)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(rng.integers(1, 500, (1, a.prompt)).astype(np.int32))
        gen.generate_next_token()
        prefill = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        for _ in range(a.tokens):
            gen.generate_next_token()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        print(f"genai: prefill {a.prompt} tok {prefill:.2f} s, decode {a.tokens / dt:.1f} tok/s "
              f"({a.tokens / dc:.1f} tok per CPU-s)", flush=True)
        del gen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=("export", "decode", "genai"))
    p.add_argument("out")
    p.add_argument("--preset", default="nvila-lite-2b")
    p.add_argument("--precision", default="int4")
    p.add_argument("--lm-head", default=None)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--awq", action="store_true", help="export: calibrate the LLM with ModelOpt INT4-AWQ first")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--spin", type=int, default=0, help="decode: ORT intra-op spinning (off, as the runtime)")
    a = p.parse_args(argv)
    {"export": cmd_export, "decode": cmd_decode, "genai": cmd_genai}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
