"""Check a bundle's ``cuda`` target against its ``cpu`` target: greedy answers to held-out questions.

    python samples/check_cuda_target.py BUNDLE --heldout DATA/heldout.jsonl [--limit 200] [--device cpu|cuda]

The demo's data is under the demo cache (``~/.cache/nvila-edge/demo-v7/data/heldout.jsonl``) and its bundle
beside it; the issue's bar is >= 95 % identical answers. Exit status 0 when the bar is met, 1 otherwise."""

from __future__ import annotations

import argparse
import json
import sys

from nvila_edge.runtime.parity import compare_targets, heldout_questions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--heldout", required=True, help="training-format JSONL of held-out questions")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--device", default="cpu", help="where the cuda target runs (cpu: the CPU kernels)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--bar", type=float, default=0.95)
    p.add_argument("--json", dest="json_out")
    a = p.parse_args(argv)
    items = heldout_questions(a.heldout, a.limit)
    r = compare_targets(a.bundle, items, device=a.device, max_new_tokens=a.max_new_tokens)
    print(f"{r.identical}/{r.total} identical answers ({100 * r.fraction:.1f} %; bar {100 * a.bar:.0f} %)")
    for m in r.mismatches[:5]:
        print(f"  Q: {m['question']!r}: cpu {m['a']!r} vs cuda target {m['b']!r}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(r.to_dict(), f, indent=1)
    return 0 if r.fraction >= a.bar else 1


if __name__ == "__main__":
    sys.exit(main())
