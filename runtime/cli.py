"""``nvila-edge run BUNDLE [--image a.jpg] [--video v.mp4] "question"``: stream the answer to the terminal.

Registered by ``nvila_edge.cli`` (``add_parser`` / ``add_run_parser``); imports nothing heavy until run.
The answer goes to stdout as it is generated; the plan and timings go to stderr (or one JSON object to
stdout with ``--json``). ``--chat`` goes on reading questions from stdin, one per line (a KV-cached session);
the question ``-`` is read from stdin too.
"""

from __future__ import annotations

import itertools
import json
import sys


def add_run_parser(sub) -> None:
    r = sub.add_parser("run", help="answer a question about images / a video with a bundle (streams the answer)")
    r.add_argument("bundle", help="bundle directory (`nvila-edge export`)")
    # required (not nargs="?"): argparse then still fills it when options come between BUNDLE and it
    r.add_argument("question", help='the question; "-" reads it from stdin')
    r.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    r.add_argument("--video", help="video file (frames sampled uniformly)")
    r.add_argument("--backend", choices=("auto", "onnxruntime", "openvino", "tensorrt", "torch"), default="auto")
    r.add_argument("--device", help="cpu or cuda (default: the fastest available)")
    r.add_argument("--vision-engine", choices=("onnxruntime", "openvino"),
                   help="onnxruntime backend: the engine for the vision tower (openvino: faster on CPUs, [openvino] extra)")
    r.add_argument("--llm-engine", choices=("onnxruntime", "llamacpp"),
                   help="onnxruntime backend: the engine for the LLM (llamacpp: the bundle's gguf target, [llamacpp] extra)")
    r.add_argument("--threads", type=int, help="CPU threads for the backend")
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--repetition-penalty", type=float, default=1.0)
    r.add_argument("--seed", type=int)
    r.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    r.add_argument("--system", help="system prompt")
    r.add_argument("--max-tiles", type=int, help="at most this many vision tiles per image")
    r.add_argument("--latency-budget-ms", type=float, help="pick the largest tiling whose vision time fits")
    r.add_argument("--num-frames", type=int, help="video frames to sample (default: the model's)")
    r.add_argument("--overflow", choices=("error", "drop_frames"), default="error",
                   help="when the prompt exceeds the context: refuse, or down-sample the video")
    r.add_argument("--chat", action="store_true", help="after the answer, read more questions from stdin (one per "
                   "line), keeping the conversation and its KV cache")
    r.add_argument("--json", action="store_true", help="print one JSON result instead of streaming")
    r.add_argument("--no-verify", action="store_true", help="skip re-hashing the bundle's files")
    r.set_defaults(func=run_main)


add_parser = add_run_parser  # the name nvila_edge.cli's STAGE_CLIS loop calls


def _sampling(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
            "stop": tuple(args.stop)}


def _summary(plan, fin) -> str:
    t = fin.timings
    media = ", ".join(f"{m['kind']} {m.get('mode', '')} {m.get('num_tiles', m.get('num_frames'))} tiles".replace("  ", " ")
                      for m in plan.media) or "no media"
    dropped = f", {plan.dropped_frames} frames dropped" if plan.dropped_frames else ""
    return (f"[{media}{dropped}; {fin.usage.prompt_tokens} prompt tokens ({fin.usage.visual_tokens} visual); "
            f"preprocess {t.preprocess_ms:.0f} ms, vision {t.vision_ms:.0f} ms, prefill {t.prefill_ms:.0f} ms, "
            f"TTFT {t.ttft_ms:.0f} ms; {fin.usage.completion_tokens} tokens at {t.tokens_per_s:.1f} tok/s; "
            f"{fin.reason}]")


def _result(plan, fin) -> dict:
    t = fin.timings
    return {"text": fin.text, "token_ids": fin.token_ids, "finish_reason": fin.reason,
            "usage": {"prompt_tokens": fin.usage.prompt_tokens, "visual_tokens": fin.usage.visual_tokens,
                      "completion_tokens": fin.usage.completion_tokens},
            "timings": {"preprocess_ms": t.preprocess_ms, "vision_ms": t.vision_ms, "prefill_ms": t.prefill_ms,
                        "ttft_ms": t.ttft_ms, "decode_ms": t.decode_ms, "tokens_per_s": t.tokens_per_s},
            "plan": {"media": plan.media, "num_tiles": plan.num_tiles, "visual_tokens": plan.visual_tokens,
                     "tile_cap": plan.tile_cap, "ms_per_tile": plan.ms_per_tile,
                     "dropped_frames": plan.dropped_frames}}


def _show(events, args, out=None, err=None) -> dict:
    from nvila_edge.events import FinishEvent, TokenEvent

    from .planner import PlanEvent

    out, err = out or sys.stdout, err or sys.stderr  # looked up now: callers may redirect them
    plan = fin = None
    for ev in events:
        if isinstance(ev, PlanEvent):
            plan = ev
        elif isinstance(ev, TokenEvent) and not args.json:
            out.write(ev.text)
            out.flush()
        elif isinstance(ev, FinishEvent):
            fin = ev
    result = _result(plan, fin)
    if args.json:
        out.write(json.dumps(result) + "\n")
    else:
        out.write("\n")
        err.write(_summary(plan, fin) + "\n")
    return result


def run_main(args) -> int:
    from nvila_edge.errors import GenerationError

    from .runtime import Runtime

    question = args.question
    if question == "-":
        question = sys.stdin.readline().strip()
    if not question:
        raise GenerationError("the question is empty")
    rt = Runtime.load(args.bundle, backend=args.backend, max_tiles=args.max_tiles,
                      latency_budget_ms=args.latency_budget_ms, threads=args.threads, device=args.device,
                      verify=not args.no_verify, vision_engine=args.vision_engine, llm_engine=args.llm_engine)
    media = {"images": args.image or None, "video": args.video, "overflow": args.overflow,
             "num_frames": args.num_frames}
    if not args.chat:
        _show(rt.stream(question, system=args.system, **media, **_sampling(args)), args)
        return 0
    session = rt.session(system=args.system)
    first = True
    lines = itertools.chain([question], (raw.strip() for raw in sys.stdin))
    for line in lines:  # lazily: each answer streams before the next line is read
        if not line:
            continue
        # the media go with the first turn (where a fresh prompt of the conversation has them)
        _show(session.stream(line, **(media if first else {}), **_sampling(args)), args)
        first = False
    return 0
