"""``nvila-edge demo``: the embedded demo pipeline's command (registered by nvila_edge.cli; the demo
module pulls torch, so it is imported only when the verb runs)."""

from __future__ import annotations


def cmd_demo(args) -> int:
    """Train (or reuse) the embedded demo model offline and answer held-out questions with streaming."""
    from .demo import run_demo

    run_demo(cache_dir=args.cache_dir, retrain=args.retrain, questions=args.questions, verbose=args.verbose,
             seed=args.seed)
    return 0


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="train (or reuse) the embedded demo model offline and answer questions")
    demo.add_argument("--cache-dir", help="where data and checkpoints are cached (default: the user cache dir)")
    demo.add_argument("--retrain", action="store_true", help="retrain even if a cached model exists")
    demo.add_argument("--questions", type=int, default=4, help="held-out questions to answer with streaming")
    demo.add_argument("--seed", type=int, default=0,
                      help="training seed (own cache folder per seed; the data and held-out questions stay the same)")
    demo.add_argument("--verbose", action="store_true",
                      help="also print the Trainer's logs (otherwise only in each stage's metrics.json)")
    demo.set_defaults(func=cmd_demo)
