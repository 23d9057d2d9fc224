"""Ask about a long video: frames sampled per segment → temporal pooling → streamed answer, with the model's
time tokens turned into seconds of the video.

    python samples/video_qa.py BUNDLE long.mp4 "When does the circle appear?" [--segments 4 | --segment-s 30]

Prints, per segment: its time range, when the sampled frames are, how the frames were pooled (TSP groups,
visual tokens), the answer as it streams, and the seconds each time token (<t0>..) names.
"""

import argparse
import sys

from nvila_edge.runtime import Runtime
from nvila_edge.apps.video_qa import VideoQA, probe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="questions about a long video")
    p.add_argument("bundle")
    p.add_argument("video")
    p.add_argument("question")
    p.add_argument("--segments", type=int, default=1, help="ask about this many equal parts of the video")
    p.add_argument("--segment-s", type=float, help="ask about parts of this many seconds instead")
    p.add_argument("--num-frames", type=int, help="frames sampled per segment (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)

    info = probe(args.video)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
