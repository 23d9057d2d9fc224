"""``nvila-edge bench``: our runtime against its baselines, in one run, on the same weights.

    nvila-edge bench BUNDLE                         # the bundle's engines (+ its torch target for baselines)
    nvila-edge bench --preset nvila-lite-2b         # real size, random weights, exported here (cached)
    nvila-edge bench --preset nvila-lite-2b --backend torch --device cuda   # GPU: fp16 vs W4A16/W8A8 (gpu.py)
    nvila-edge bench --report result.json           # re-render the docs from a saved result

On CPU each heavy phase runs in its own interpreter (``python -m nvila_edge.pipelines.bench PHASE spec out``)
so each reports its own peak RSS and the fp32 torch model's memory is gone before our runtime is timed:
``torch`` (model, torch eager vision + fp32/bf16 LLM, the exports the run needs, onnxruntime-genai's
builder), ``ort`` (our Runtime: vision, prefill, TTFT, decode, RSS; then the fp32 vision graph),
``ours_llamacpp`` (the same with ``llm_engine="llamacpp"`` on the bundle's gguf target), ``genai``
(onnxruntime-genai's own loop on the same int4 LLM), ``llamacpp``, the OpenVINO phases and ``openvino_genai``
(OpenVINO's own LLM path, with ``--optimum-cli``). Targets are printed as met / not met; a miss never
fails the command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


from nvila_edge.errors import ConfigError
from nvila_edge.io import atomic_write_text

from . import report
from .report import bandwidth_gbs, peak_rss_mb
from . import build, llamacpp, openvino_genai
from .timing import log, module_missing

FULL = {"vision_tiles": 3, "torch_vision_tiles": 2, "prefill": 512, "ort_tokens": 64, "genai_tokens": 64,
        "peer_tokens": 64, "torch_tokens": 16, "reps": 2, "ttft_reps": 2}
QUICK = {"vision_tiles": 1, "torch_vision_tiles": 1, "prefill": 128, "ort_tokens": 8, "genai_tokens": 8,
         "peer_tokens": 8, "torch_tokens": 4, "reps": 1, "ttft_reps": 1}
OWNED = ".nvila-edge-bench"  # marks a folder the bench made: it writes nowhere else in --work-dir
def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("bench", help="measure the runtime against transformers eager and onnxruntime-genai")
    p.add_argument("bundle", nargs="?", help="bundle directory (or --preset)")
    p.add_argument("--preset", help="preset with random weights, exported here (nvila-lite-2b, tiny, ...)")
    p.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime",
                   help="onnxruntime (CPU, default) or torch (GPU run: --device cuda)")
    p.add_argument("--device", default=None, help="torch backend device (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="few iterations (tests, smoke runs)")
    p.add_argument("--json", dest="json_out", help="write the whole result as JSON here")
    p.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=None,
                   help="update docs/BENCHMARKS.md and write a PNG plot (default: on for full runs)")
    p.add_argument("--docs", help="markdown file to update (default: the checkout's docs/BENCHMARKS.md)")
    p.add_argument("--work-dir", help="where the calibrated bundle and the peers' files are kept, in a folder of its "
                   "own inside it (default: a per-preset cache dir); nothing else there is touched")
    p.add_argument("--llama-cpp", metavar="PATH", help="llama.cpp's llama-bench binary, build folder or source tree "
                   "(llama-quantize beside it, convert_hf_to_gguf.py above it); default: llama-bench on PATH")
    p.add_argument("--optimum-cli", metavar="PATH", help="a side venv's optimum-cli (optimum-intel cannot join this env): "
                   "exports the LLM to int4 OpenVINO IR for the OpenVINO GenAI peer (openvino-genai's LLMPipeline)")
    p.add_argument("--prepare", action="store_true", help="only build and cache what the run needs (calibrated bundle, "
                   "exports, GGUFs, OpenVINO IR), time nothing: the timed run after it is short")
    p.add_argument("--seed", type=int, default=0, help="random-weight seed for --preset")
    p.add_argument("--report", help="only render a saved --json result (docs, table)")
    p.set_defaults(func=bench_main)


def default_docs() -> Path:
    docs = Path(__file__).resolve().parents[1] / "docs"  # runtime/ sits at the repo root in a checkout
    return docs / "BENCHMARKS.md" if docs.is_dir() else Path("docs/BENCHMARKS.md")


def bench_main(args) -> int:
    if args.report:
        result = json.loads(Path(args.report).read_text())
    elif bool(args.bundle) == bool(args.preset):
        print("nvila-edge bench: give either a BUNDLE or --preset NAME", file=sys.stderr)
        return 2
    else:
        result = run_bench(bundle=args.bundle, preset=args.preset, backend=args.backend, device=args.device,
                           threads=args.threads, quick=args.quick, work_dir=args.work_dir, seed=args.seed,
                           llama_cpp=args.llama_cpp, prepare=args.prepare, optimum_cli=args.optimum_cli)
    if result.get("prepared"):
        for k, v in result["prepared"].items():
            print(f"{k}: {v}")
        return 0
    print(report.render_text(result))
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(result, indent=1))
    if args.write_docs if args.write_docs is not None else not result.get("quick"):
        docs = Path(args.docs) if args.docs else default_docs()
        log(f"wrote {docs} and {report.write_docs(result, docs)}")
    return 0


# ---- orchestration -----------------------------------------------------------------------------------------
def _work_dir(work_dir, preset, bundle, seed, backend) -> Path:
    """The bench's own folder (``OWNED`` inside): in ``--work-dir`` a subfolder named after the run, so a user's
    files there are never overwritten; a folder of that name that the bench did not make is refused."""
    name = f"{preset}-seed{seed}" if preset else "bundle-" + Path(bundle).resolve().name
    name += "-torch" if backend == "torch" else ""
    if work_dir:
        work = Path(work_dir) / f"nvila-edge-bench-{name}"
    else:
        work = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nvila-edge" / "bench" / name
    if work.exists() and any(work.iterdir()) and not (work / OWNED).is_file():
        raise ConfigError(f"{work} exists and was not made by `nvila-edge bench`; pass another --work-dir "
                          "(the bench writes only into a folder of its own)")
    work.mkdir(parents=True, exist_ok=True)
    (work / OWNED).write_text("files made by `nvila-edge bench` (a cache: safe to delete)\n")
    return work


def genai_available() -> bool:
    return not module_missing("onnxruntime_genai")


def openvino_missing() -> str | None:
    gone = [m for m in ("openvino", "nncf") if module_missing(m)]
    return f"{' and '.join(gone)} not installed (pip install 'nvila-edge[bench]')" if gone else None


def _prepare(spec: dict) -> dict:
    """Config + tokenizer files for the children; for a bundle, the engines it already has."""
    from nvila_edge import NVILAConfig, NVILATokenizer

    work = Path(spec["work"])
    art = {"config": str(work / "config.json")}
    if spec["preset"]:
        cfg = NVILAConfig.from_preset(spec["preset"])
        # random weights need no real vocabulary: a small trained BPE whose special ids are put in the config
        words = "what is in the image video describe the scene left right red blue one two how many".split()
        corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 9)) + "?" for i in range(300)]
        tok = NVILATokenizer.train(corpus, num_time_tokens=cfg.video.num_time_tokens)
        cfg = cfg.replace(image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                          end_token_ids=list(tok.encode("\n")))
        tok.save_pretrained(work / "tokenizer")
        art["tokenizer"] = str(work / "tokenizer")
    else:
        art.update(bundle_artifacts(spec["bundle"]))
        from nvila_edge.bundle import Bundle

        cfg = Bundle.open(spec["bundle"]).config
    Path(art["config"]).write_text(cfg.to_json())
    return art


def bundle_artifacts(path) -> dict:
    """The engines a bundle's cpu target ships (what the ort phase runs) and its torch checkpoint, if any."""
    from nvila_edge.bundle import Bundle

    b = Bundle.open(path)
    cpu = b.target("cpu")
    art = {"bundle": str(Path(path).resolve()), "tokenizer": str(b.tokenizer_dir), "projector": str(b.file("projector")),
           "decoder": str(b.file("decoder")), "embeddings": str(b.file("embeddings")),
           "decoder_io": cpu["io"]["decoder"], "limits": cpu.get("limits") or {}}
    if cpu.get("precision", {}).get("vision") == "int8-qdq":
        q = b.manifest.get("quantization", {}).get("vision", {}).get("name", "?")
        art.update(vision_int8=str(b.file("vision")), vision_int8_kind=f"bundle's ModelOpt {q} Q/DQ")
    else:
        art["vision_fp32"] = str(b.file("vision"))
    art["has_gguf"] = "gguf" in b.targets
    if b.has("checkpoint", "torch"):
        art["checkpoint"] = str(b.file("checkpoint", "torch"))
    return art


def run_child(phase: str, spec: dict) -> dict:
    """One phase in a fresh interpreter: its JSON result, or {"error": ...} (never raises)."""
    work = Path(spec["work"])
    spec_path, out_path = work / f"spec-{phase}.json", work / f"result-{phase}.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "nvila_edge.pipelines.bench", phase, str(spec_path), str(out_path)]).returncode
    if rc != 0 or not out_path.is_file():
        return {"error": f"phase {phase} failed (exit status {rc}; see its output above)"}
    res = json.loads(out_path.read_text())
    res["phase_s"] = round(time.perf_counter() - t0, 1)
    return res


def run_bench(*, bundle=None, preset=None, backend="onnxruntime", device=None, threads=None, quick=False,
              work_dir=None, seed=0, llama_cpp=None, prepare=False, optimum_cli=None) -> dict:
    """Measure everything in one run; return the result (``report`` shows it)."""
    t0 = time.time()
    counts = QUICK if quick else FULL
    work = _work_dir(work_dir, preset, bundle, seed, backend)
    work.mkdir(parents=True, exist_ok=True)
    spec = {"bundle": str(Path(bundle).resolve()) if bundle else None, "preset": preset, "seed": seed,
            "threads": threads, "work": str(work), "counts": counts, "device": device, "genai": genai_available(),
            "llama_cpp": llama_cpp, "prepare": prepare, "optimum_cli": optimum_cli,
            "bundle_targets": build.bundle_targets(), "llamacpp_engine": build.llamacpp_missing()}
    spec.update(_prepare(spec))
    result = {"target": preset or Path(bundle).name, "preset": preset, "bundle": spec["bundle"], "backend": backend,
              "quick": quick, "seed": seed, "counts": counts, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    if backend == "torch":
        from . import gpu  # fp16 eager / fp16 CUDA graph / the cuda target's W4A16 + W8A8, one run

        from nvila_edge.bundle import Bundle

        quantized = preset or "cuda" in Bundle.open(bundle).targets
        log("torch backend: " + ("fp16 eager vs fp16 CUDA graph vs W4A16 / W8A8 (cuda target)" if quantized
                                 else "eager vs the torch backend (CUDA graph decoding on cuda)"))
        result["gpu"] = gpu.phase_quantized(spec, quick) if quantized else gpu.phase_gpu(spec, quick)
        result["counts"] = result["gpu"].pop("counts")
        result["machine"] = report.machine_info(result["gpu"].get("gpu_name"))
    else:
        result["machine"] = report.machine_info()
        if prepare:
            result["prepared"] = _prepare_cpu(spec)
            return result
        _run_cpu(spec, result, counts, threads)
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.time() - t0, 1)
    result["ratios"], result["targets"] = report.evaluate(result)
    return result


def _prepare_cpu(spec: dict) -> dict:
    """--prepare: every cached build of a CPU run, no timing (each phase reports what it made or why not)."""
    done: dict = {}
    if spec["preset"]:
        log("phase build (calibrate with the real recipes, export the cpu target; cached)")
        built = run_child("build", spec)
        done["build"] = built.get("error") or built.get("artifacts", {}).get("bundle")
        spec.update(bundle_artifacts(built["artifacts"]["bundle"]) if built.get("artifacts") else {},
                    calib_tiles=built.get("artifacts", {}).get("calib_tiles"))
    tools = llamacpp.find_tools(spec["llama_cpp"])
    spec["llamacpp"], spec["openvino"] = "missing" not in tools, openvino_missing() is None
    spec["openvino_genai"] = openvino_genai.missing(spec["optimum_cli"]) is None
    log("phase torch (fp32 exports for the peers; no timing)")
    t = run_child("torch", spec)
    done["torch"] = t.get("error") or sorted(t.get("artifacts", {}))
    spec.update(t.get("artifacts", {}))
    if spec["llamacpp"] and spec.get("hf_llm"):
        log("phase llamacpp (convert + quantize; no timing)")
        lc = run_child("llamacpp", spec)
        done["llamacpp"] = lc.get("error") or lc.get("prepared")
    else:
        done["llamacpp"] = tools.get("missing", "no HF weights")
    if spec["openvino"]:
        log("phase openvino_build")
        ov = run_child("openvino_build", spec)
        done["openvino"] = ov.get("error") or {k: v for k, v in ov.items() if k.startswith("ov-")}
    done["ours_llamacpp"] = spec["llamacpp_engine"] or ("gguf target built" if spec.get("has_gguf") else "no gguf target")
    og = _openvino_genai(spec)
    done["openvino_genai"] = og.get("prepared") or og.get("skipped") or og.get("error")
    return done


def _run_cpu(spec: dict, result: dict, counts: dict, threads) -> None:
    """The CPU phases, each in its own interpreter: build (preset) → torch → ours → the peers."""
    work = Path(spec["work"])
    if spec["preset"]:
        log(f"work dir {work}; phase build (calibrate with the real recipes, export the cpu target; cached)")
        result["build"] = run_child("build", spec)
        built = result["build"].pop("artifacts", {})
        if built.get("bundle"):
            spec.update(bundle_artifacts(built["bundle"]), calib_tiles=built.get("calib_tiles"))
    tools = llamacpp.find_tools(spec["llama_cpp"])
    spec["llamacpp"] = "missing" not in tools
    spec["openvino"] = openvino_missing() is None
    spec["openvino_genai"] = openvino_genai.missing(spec["optimum_cli"]) is None
    log("phase torch (model, fp32 exports for the peers, eager baselines)")
    result["torch"] = run_child("torch", spec)
    spec.update(result["torch"].pop("artifacts", {}))
    log("phase ort (ours: the bundle through Runtime)")
    ready = all(spec.get(k) for k in ("decoder", "vision_int8", "projector"))
    result["ort"] = run_child("ort", spec) if ready else {"error": "the engines could not be prepared (see the build phase)"}
    result["ours_llamacpp"] = _ours_llamacpp(spec, ready)
    if not spec["openvino"]:
        result["ours_openvino"] = {"skipped": openvino_missing()}
    elif not ready or spec.get("vision_int8_kind", "").startswith("dynamic"):
        result["ours_openvino"] = {"skipped": "the bundle's cpu target could not be prepared / has no INT8 tower"}
    else:
        log("phase ours_openvino (ours: the same bundle through Runtime on the openvino backend)")
        result["ours_openvino"] = run_child("ours_openvino", spec)
    if not spec["genai"]:
        result["genai"] = {"skipped": "onnxruntime-genai is not installed (pip install 'nvila-edge[export]')"}
    elif not spec.get("genai_dir"):
        result["genai"] = {"skipped": result["torch"].get("genai_skipped", "no HF weights to build it from")}
    else:
        log("phase genai (onnxruntime-genai on the same int4 LLM)")
        result["genai"] = run_child("genai", spec)
    if not spec["llamacpp"]:
        result["llamacpp"] = {"skipped": tools["missing"]}
    elif not spec.get("hf_llm"):
        result["llamacpp"] = {"skipped": "no HF weights to convert (the torch phase did not write them)"}
    else:
        log("phase llamacpp (convert_hf_to_gguf + llama-quantize Q4_0 / Q4_K_M, cached; llama-bench)")
        result["llamacpp"] = run_child("llamacpp", spec)
    result["openvino"] = _openvino(spec)
    result["openvino_genai"] = _openvino_genai(spec)
    # measured last: Linux carries a parent's peak RSS into the children it starts (kept across exec)
    result["bandwidth_gbs"] = bandwidth_gbs(threads or os.cpu_count() or 2)
    log(f"memory bandwidth {result['bandwidth_gbs']:.1f} GB/s")
    if spec.get("decoder"):
        ctx = counts["prefill"] + counts["ort_tokens"] // 2  # mean KV length while decoding
        result["bytes_per_token"] = report.decoder_bytes(spec["decoder"], spec["decoder_io"], ctx)
        if spec.get("genai_dir"):
            result["genai_bytes_per_token"] = report.decoder_bytes(Path(spec["genai_dir"]) / "model.onnx",
                                                                   spec["decoder_io"], ctx)


def _ours_llamacpp(spec: dict, ready: bool) -> dict:
    """Ours with ``llm_engine="llamacpp"`` on the bundle's gguf target (built with the bundle when it can be)."""
    if spec["llamacpp_engine"]:
        return {"skipped": spec["llamacpp_engine"]}
    if not ready:
        return {"skipped": "the engines could not be prepared (see the build phase)"}
    if not spec.get("has_gguf"):
        return {"skipped": "the bundle has no gguf target (export it with `nvila-edge export CAL -o B --target cpu,gguf`)"}
    log("phase ours_llamacpp (ours: the bundle's gguf target through Runtime, llm_engine=llamacpp)")
    return run_child("ours_llamacpp", spec)


def _openvino_genai(spec: dict) -> dict:
    """OpenVINO's own LLM path: optimum-intel's int4 export (a side venv's optimum-cli) on openvino-genai."""
    why = openvino_genai.missing(spec.get("optimum_cli"))
    if why:
        return {"skipped": why}
    if not spec.get("hf_llm"):
        return {"skipped": "no HF weights to export (the torch phase did not write them)"}
    log("phase openvino_genai (optimum-cli export openvino int4, cached; openvino-genai LLMPipeline)")
    return run_child("openvino_genai", spec)


def _openvino(spec: dict) -> dict:
    """OpenVINO: build (convert + NNCF, cached), then vision and LLM timed in their own processes."""
    why = openvino_missing()
    if why:
        return {"skipped": why}
    log("phase openvino_build (NNCF INT8 vision PTQ, INT4 weight compression; cached)")
    built = run_child("openvino_build", spec)
    if "error" in built:
        return built
    out: dict = {"build": built}
    for part, phase in (("vision", "openvino_vision"), ("llm", "openvino_llm")):
        state = built.get(f"ov-{part}", "skipped: not built")
        if state != "ok":
            out[part] = {"error" if state.startswith("failed") else "skipped": state}
            continue
        log(f"phase {phase}")
        out[part] = run_child(phase, spec)
    return out


def _phases() -> dict:
    from . import genai, ours, transformers_peer, openvino as ov

    return {"build": build.phase_build, "torch": transformers_peer.phase_torch, "ort": ours.phase_ort,
            "genai": genai.phase_genai, "ours_openvino": lambda spec: ours.phase_ort(spec, backend="openvino"),
            "llamacpp": llamacpp.phase_llamacpp, "openvino_build": ov.phase_openvino_build,
            "openvino_vision": ov.phase_openvino_vision, "openvino_llm": ov.phase_openvino_llm,
            "ours_llamacpp": ours.phase_ours_llamacpp, "openvino_genai": openvino_genai.phase_openvino_genai}


def _phase_main(argv: list[str]) -> int:
    phases = _phases()
    if len(argv) != 3 or argv[0] not in phases:
        print("usage: python -m nvila_edge.pipelines.bench PHASE SPEC.json OUT.json (what `nvila-edge bench` runs "
              f"in each child); PHASE: {', '.join(phases)}", file=sys.stderr)
        return 2
    phase, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads") and phase != "torch":
        os.environ.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    res = phases[phase](spec)
    res["peak_rss_mb"] = peak_rss_mb()
    Path(out_path).write_text(json.dumps(res, default=lambda x: x.item() if hasattr(x, "item") else str(x)))
    return 0
