"""``nvila-edge calibrate``: the calibration stage's command (registered by nvila_edge.cli)."""

from __future__ import annotations

import tempfile
from pathlib import Path


def add_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="ModelOpt calibration: W8A8 SmoothQuant SigLIP + W4A16 AWQ Qwen2, with a fidelity report")
    c.add_argument("checkpoint", help="checkpoint (VILA or -hf layout), merged if it was fine-tuned")
    c.add_argument("-o", "--output", help="calibrated directory (default: CHECKPOINT-calibrated)")
    c.add_argument("--vision", default="w8a8-smoothquant", help="vision recipe (w8a8-smoothquant, w8a8-smoothquant-proj, fp16)")
    c.add_argument("--llm", default="w4a16-awq", help="LLM recipe (w4a16-awq, w4a16-rtn, fp16)")
    c.add_argument("--data", help="directory of images/videos (optional prompts.txt) or a training JSONL "
                                  "(default: a small synthetic set made on the fly)")
    c.add_argument("-n", "--num-samples", type=int, default=64, help="calibration prompts")
    c.add_argument("--heldout", help="held-out prompts for the fidelity report (default: held back from --data)")
    c.add_argument("--num-heldout", type=int, default=8)
    c.add_argument("--eval", help="JSONL whose questions are answered before and after (exact-match accuracy)")
    c.add_argument("--num-eval", type=int, default=100)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    import logging

    from .calibrator import calibrate

    logging.getLogger("modelopt").setLevel(logging.ERROR)
    output = args.output or str(Path(args.checkpoint.rstrip("/")).with_name(Path(args.checkpoint.rstrip("/")).name + "-calibrated"))
    records = None
    if args.eval:
        from nvila_edge.training.data import read_jsonl
        from nvila_edge.training.evaluate import single_questions

        records = single_questions(read_jsonl(args.eval))[: args.num_eval]
    with tempfile.TemporaryDirectory(prefix="nvila-calib-") as tmp:
        data = args.data
        if data is None:
            from nvila_edge.training.synthetic import SyntheticConfig, make_dataset

            n = max(args.num_samples + args.num_heldout, 16)
            data = make_dataset(Path(tmp) / "synthetic", SyntheticConfig(num_images=n, num_videos=max(2, n // 8), num_heldout_videos=0),
                                progress=False)["train"]
            print(f"calibration data: synthetic set ({n} images) in {data}")
        result = calibrate(args.checkpoint, output, vision=args.vision, llm=args.llm, data=data,
                           num_samples=args.num_samples, heldout=args.heldout, num_heldout=args.num_heldout,
                           eval_records=records, seed=args.seed)
    print(result.fidelity.table())
    q = result.stats["quantizers"]
    print(f"quantized linears: vision {q['vision']['weight_quantized']}/{q['vision']['linears']}, "
          f"projector {q['projector']['weight_quantized']}/{q['projector']['linears']}, "
          f"llm {q['llm']['weight_quantized']}/{q['llm']['linears']}")
    print(f"calibrated model written to {result.path} (fidelity.json beside it)")
    return 0
