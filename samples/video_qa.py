"""Ask about a long video: frames sampled per segment → temporal pooling → streamed answer, with the model's
time tokens turned into seconds of the video.

    python samples/video_qa.py BUNDLE long.mp4 "When does the circle appear?" [--segments 4 | --segment-s 30]
    python samples/video_qa.py                 # the demo's bundle on its first held-out "when" clip
    python samples/video_qa.py --heldout 3     # ... its fourth held-out "when" clip (--task for another task)

Prints, per segment: its time range, when the sampled frames are, how the frames were pooled (TSP groups,
visual tokens), the answer as it streams, and the seconds each time token (<t0>..) names.
"""

import argparse
import json
import sys
from pathlib import Path

from nvila_edge.apps.video_qa import VideoQA
from nvila_edge.errors import ConfigError
from nvila_edge.media.video import probe_video
from nvila_edge.runtime import Runtime


def demo_clip(demo: Path, task: str, index: int) -> tuple[str, str, str, str]:
    """(bundle, clip, question, expected answer) of the demo's ``index``-th held-out clip of ``task``."""
    held = demo / "data" / "heldout.jsonl"
    if not (demo / "bundle").is_dir() or not held.is_file():
        raise ConfigError(f"no demo bundle in {demo}: run `nvila-edge demo` first, or give BUNDLE VIDEO QUESTION")
    rows = [r for r in map(json.loads, held.read_text().splitlines()) if r.get("task") == task and "video" in r]
    if not 0 <= index < len(rows):
        raise ConfigError(f"the demo has {len(rows)} held-out {task!r} clips; --heldout must be below that")
    r = rows[index]
    q = r["conversations"][0]["value"].replace("<vila/video>", "").strip()
    return str(demo / "bundle"), str(held.parent / r["video"]), q, r["conversations"][1]["value"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="questions about a long video")
    p.add_argument("bundle", nargs="?", help="bundle folder (default: the demo's)")
    p.add_argument("video", nargs="?")
    p.add_argument("question", nargs="?")
    p.add_argument("--heldout", type=int, default=0, help="without BUNDLE: which held-out demo clip")
    p.add_argument("--task", default="when", help="without BUNDLE: the held-out clips' task")
    p.add_argument("--demo-dir", help="without BUNDLE: the demo's cache folder (default: `nvila-edge demo`'s)")
    p.add_argument("--segments", type=int, default=1, help="ask about this many equal parts of the video")
    p.add_argument("--segment-s", type=float, help="ask about parts of this many seconds instead")
    p.add_argument("--num-frames", type=int, help="frames sampled per segment (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    expected = None
    if args.bundle is None:
        from nvila_edge.pipelines.demo import demo_dir

        args.bundle, args.video, args.question, expected = demo_clip(
            Path(args.demo_dir) if args.demo_dir else demo_dir(), args.task, args.heldout)
    elif args.video is None or args.question is None:
        p.error("give BUNDLE VIDEO QUESTION, or none of them for a held-out demo clip")

    info = probe_video(args.video)
    with Runtime.load(args.bundle, threads=args.threads) as rt:
        qa = VideoQA(rt, num_frames=args.num_frames)
        print(f"{info.path}: {info.duration_s:.1f} s, {info.frame_count} frames at {info.fps:.1f} FPS; "
              f"{qa.num_frames} frames per segment; time tokens: "
              f"{rt.config.video.num_time_tokens if qa.has_time_tokens else 'none (the model has no <t0>..)'}")
        for a, b in qa.segments(info, args.segments, args.segment_s):
            print(f"\n[{a:6.1f} s – {b:6.1f} s] Q: {args.question}\nA: ", end="", flush=True)
            ans = qa.answer(info, a, b, args.question, on_token=lambda t: print(t, end="", flush=True),
                            max_new_tokens=args.max_new_tokens)
            video = ans.plan["media"][0]
            print(f"\n   frames at {', '.join(f'{t:.1f}' for t in ans.frame_times_s)} s → "
                  f"{sum(video['groups'])} pooled groups (pool {video['pool_sizes']}) → {ans.plan['visual_tokens']} "
                  f"visual tokens; TTFT {ans.ttft_ms:.0f} ms")
            if ans.times_s:
                print(f"   timestamps: {ans.text_with_times}")
    if expected is not None:
        print(f"\n   expected (held-out reference): {expected}")
    return 0


if __name__ == "__main__":
    from nvila_edge.errors import NVILAEdgeError

    try:
        sys.exit(main())
    except NVILAEdgeError as e:  # bad input: say what and what to do, no traceback
        print(f"video_qa: {e}", file=sys.stderr)
        sys.exit(2)
