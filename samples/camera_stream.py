"""Ask a question about a camera / RTSP stream / video file every few seconds, with the answer overlaid.

    python samples/camera_stream.py BUNDLE --source 0 --question "What is on the table?" --every 2
    python samples/camera_stream.py BUNDLE --source clip.mp4 --question "..." --headless --out annotated.mp4

Same as ``nvila-edge camera``; shows the public API: ``Runtime.load`` + ``CameraApp(...).run()``.
"""

import argparse
import sys

from nvila_edge.runtime import Runtime
from nvila_edge.apps.camera_app import CameraApp, add_arguments


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    with Runtime.load(args.bundle, backend=args.backend, threads=args.threads, vision_engine=args.vision_engine) as rt:
        app = CameraApp(rt, args.source, args.question, every=args.every, out=args.out, headless=args.headless,
                        max_seconds=args.max_seconds, max_retries=args.max_retries, backoff_s=args.backoff,
                        max_new_tokens=args.max_new_tokens)
        report = app.run()
    print(report.summary())
    return 0 if report.frames else 1


if __name__ == "__main__":
    sys.exit(main())
