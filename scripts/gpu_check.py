"""Helpers of scripts/gpu_check.sh: ``env`` (what the machine has, exit 2 without CUDA torch) and
``summary OUT TESTS_RC BENCH_RC`` (the bench's figures and targets, for docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


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


def summary(out: str, tests_rc: str, bench_rc: str) -> int:
    out_dir = Path(out)
    s = {"gpu_tests_rc": int(tests_rc), "bench_rc": int(bench_rc)}
    f = out_dir / "bench-nvila-lite-2b-cuda.json"
    if f.is_file():
        r = json.loads(f.read_text())
        g = r.get("gpu", {})
        s.update(gpu=g.get("gpu_name"), date=r.get("date"), ratios=r.get("ratios"),
                 targets=[(t["target"], t["status"], t["ratio"]) for t in r.get("targets", [])],
                 kernels=g.get("kernels"))
    print(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "env"
    sys.exit(env() if cmd == "env" else summary(*sys.argv[2:5]))
