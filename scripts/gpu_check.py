"""Helpers of scripts/gpu_check.sh:

- ``prepare [FOLDER]`` (on a CPU machine with ModelOpt, before the GPU is asked for): the calibrated tiny
  model's cpu + cuda bundle and its fp32 reference outputs, into FOLDER (default .gpu-check/, git-ignored) —
  what tests/test_cuda_target.py's gpu test reads where ModelOpt is not installed;
- ``preflight [--cpu]``: every module, version and carried file the check needs; exit 3 naming what is
  missing (never a skip);
- ``env``: what the machine has (exit 2 without CUDA torch);
- ``kernels OUT.json [--cpu]``: each ``KernelOptions`` alternative timed at NVILA-Lite-2B sizes (the LM head,
  W8A8 eager / compiled, W4A16 tinygemm / cuBLAS on dequantized weights over M): the figures that settle them;
- ``summary OUT TESTS_RC BENCH_RC KERNELS_RC``: the bench's figures and targets, for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/cuda_artefacts.py: what the gpu test reads

# module → the lowest version it must have (None: any), for the check's steps; fastapi / modelopt are not needed.
# The device image has transformers 5.17, older than the `cache=` API this project uses (5.24): the check
# carries transformers' wheel (TRANSFORMERS_WHEEL, pure Python; its needs are all in the image).
TRANSFORMERS_WHEEL = "transformers==5.24.0"
NEEDS = {"torch": "2.6", "transformers": "5.24", "peft": None, "onnxruntime": None, "accelerate": None,
         "pytest": None, "safetensors": None, "tokenizers": None, "numpy": None, "PIL": None, "cv2": None}
DIST = {"PIL": "pillow", "cv2": "opencv-python-headless"}


def _version(v: str) -> tuple[int, ...]:
    return tuple(int("".join(c for c in x if c.isdigit()) or 0) for x in v.split("+")[0].split(".")[:3])


def prepare(folder: str | None = None) -> int:
    import shutil
    import tempfile

    import cuda_artefacts
    from conftest import _corpus, make_model, random_image
    from nvila_edge import NVILATokenizer
    from nvila_edge.calibration import load_calibrated

    import subprocess

    wheels = ROOT / ".whl"
    if not list(wheels.glob("transformers-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        TRANSFORMERS_WHEEL, "-d", str(wheels)], check=True)
    out = Path(folder) if folder else cuda_artefacts.folder()
    tmp = Path(tempfile.mkdtemp(prefix=".gpu-check-", dir=out.parent))
    try:
        cal, bundle, proc = cuda_artefacts.build(tmp, NVILATokenizer.train(_corpus()), make_model, random_image)
        cuda_artefacts.write_reference(tmp, load_calibrated(cal), proc, random_image)
        shutil.rmtree(cal)  # the bundle and the reference are what travels
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"folder": str(out), "MiB": round(size / 2**20, 2)}))
    return 0


def preflight(cpu: bool = False) -> int:
    """Exit 3 with one line per missing module / version / file: a missing piece fails the check, never skips."""
    import importlib

    bad = []
    for mod, want in NEEDS.items():
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - any import failure is a missing module here
            bad.append(f"module {mod} does not import ({type(e).__name__}: {e})")
            continue
        have = md.version(DIST.get(mod, mod))
        if want is not None and _version(have) < _version(want):
            hint = (f" (carry its wheel: `python scripts/gpu_check.py prepare` puts {TRANSFORMERS_WHEEL} in .whl/; "
                    "name .whl in the run's carry)") if mod == "transformers" else ""
            bad.append(f"{mod} is {have}, the check needs >= {want}{hint}")
    try:
        import torch

        if not cpu and not torch.cuda.is_available():
            bad.append(f"torch {torch.__version__} sees no CUDA GPU (use --cpu-dry-run on a CPU machine)")
    except ImportError:
        pass
    try:
        import nvila_edge.pipelines  # noqa: F401 - the package-dir mapping: needs `pip install -e .`
        import nvila_edge.runtime  # noqa: F401
    except ImportError as e:
        bad.append(f"nvila_edge does not import as installed ({e}): run `pip install --no-deps -e .` first")
    import cuda_artefacts

    bad += [f"carried file missing: {m} (make it on a CPU machine with `python scripts/gpu_check.py prepare`, "
            f"then name {cuda_artefacts.folder().name} in the run's carry)" for m in cuda_artefacts.missing()]
    print(json.dumps({"preflight": "ok" if not bad else "failed", "missing": bad}, indent=1))
    return 3 if bad else 0


def _time(fn, cuda: bool, reps: int) -> float:
    """Median milliseconds of ``fn()`` (after a warm-up that also compiles)."""
    import statistics

    import torch

    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(out), 4)


def kernels(out: str, cpu: bool = False) -> int:
    """Every KernelOptions alternative on the same random weights; NVILA-Lite-2B sizes (scaled down by 4 with
    --cpu, where only that each path runs is checked)."""
    import torch

    from nvila_edge.modeling import quantized as Q

    dev = torch.device("cpu" if cpu else "cuda")
    cuda, d = dev.type == "cuda", 4 if cpu else 1
    dt, reps = torch.bfloat16, 3 if cpu else 20
    h, inter, vocab, vh, vi, tile = 1536 // d, 8960 // d, 151936 // d, 1152 // d, 4304 // d, 729
    g = torch.Generator().manual_seed(0)
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "scale": f"1/{d}", "ms": {}}
    ms = res["ms"]
    with torch.inference_mode():
        table = Q.Int8Embedding(vocab, h)
        table.weight.copy_(torch.randint(-127, 128, (vocab, h), generator=g, dtype=torch.int8))
        table.scales.copy_(torch.rand(vocab, generator=g) * 0.01)
        table = table.to(dev)
        x1 = torch.randn(1, h, device=dev, dtype=dt)
        for choice in Q.HEAD_KERNELS:
            head = Q.Int8Head(table)
            mode = head.prepare(dt, options=Q.KernelOptions(head=choice))
            ms[f"head:{choice}->{mode}"] = _time(lambda: head(x1), cuda, reps)
        lin8 = Q.Int8Linear(vh, vi, bias=True)
        lin8.weight.copy_(torch.randint(-127, 128, (vi, vh), generator=g, dtype=torch.int8))
        lin8.weight_scale.copy_(torch.rand(vi, generator=g) * 0.01)
        lin8.input_amax.fill_(4.0)
        lin8.bias.copy_(torch.randn(vi, generator=g))
        lin8 = lin8.to(dev)
        xt = torch.randn(tile, vh, device=dev, dtype=dt)
        for choice in Q.W8A8_KERNELS:
            mode = lin8.prepare(dt, options=Q.KernelOptions(w8a8=choice))
            ms[f"w8a8:{choice}->{mode}:M{tile}"] = _time(lambda: lin8(xt), cuda, reps)
        lin4 = Q.Int4Linear(h, inter, 128)
        lin4.qweight.copy_(torch.randint(0, 256, (inter, h // 2), generator=g, dtype=torch.uint8))
        lin4.scales.copy_(torch.rand(inter, h // 128, generator=g) * 0.01)
        lin4 = lin4.to(dev)
        for m in (1, 16, 32, 64, 128, 256, 512):
            xm = torch.randn(m, h, device=dev, dtype=dt)
            for name, min_m in (("tinygemm", 1 << 62), ("cublas-dequant", 1)):
                mode = lin4.prepare(dt, options=Q.KernelOptions(int4_dense_min_m=min_m))
                if mode != "int4":
                    raise RuntimeError(f"int4 linear {inter}x{h} fell back to {mode}: the kernel did not run")
                ms[f"int4:{name}->{mode}:M{m}"] = _time(lambda: lin4(xm), cuda, reps)
    Path(out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


def env() -> int:
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import torch
    except ImportError:
        print(json.dumps({**info, "error": "torch is not installed"}))
        return 2
    info.update(torch=torch.__version__, cuda=torch.version.cuda, available=torch.cuda.is_available())
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    int4_tinygemm=torch.cuda.get_device_capability(0) >= (8, 0))
    print(json.dumps(info))
    return 0 if info["available"] else 2


def _junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {"error": f"no readable {path.name}"}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def summary(out: str, tests_rc: str, bench_rc: str, kernels_rc: str = "0") -> int:
    out_dir = Path(out)
    s = {"gpu_tests_rc": int(tests_rc), "bench_rc": int(bench_rc), "kernels_rc": int(kernels_rc),
         "gpu_tests": _junit(out_dir / "gpu-tests.xml")}
    for f in sorted(out_dir.glob("bench-*.json"))[:1]:
        r = json.loads(f.read_text())
        g = r.get("gpu", {})
        s.update(gpu=g.get("gpu_name"), date=r.get("date"), ratios=r.get("ratios"),
                 targets=[(t["target"], t["status"], t["ratio"]) for t in r.get("targets", [])],
                 kernels=g.get("kernels"))
    k = out_dir / "kernels.json"
    if k.is_file():
        s["kernel_ms"] = json.loads(k.read_text()).get("ms")
    print(json.dumps(s, indent=1))
    t = s["gpu_tests"]
    return 0 if t.get("tests") and not t.get("skipped") and not t.get("failures") and not t.get("errors") else 4


if __name__ == "__main__":
    cmd, args = (sys.argv[1] if len(sys.argv) > 1 else "env"), sys.argv[2:]
    cpu = "--cpu" in args
    args = [a for a in args if a != "--cpu"]
    sys.exit({"env": lambda: env(), "prepare": lambda: prepare(*args[:1]), "preflight": lambda: preflight(cpu),
              "kernels": lambda: kernels(args[0], cpu), "summary": lambda: summary(*args[:4])}[cmd]())
