"""``nvila-edge make-data | train | finetune | merge | prune``: the training stage's commands (registered by
nvila_edge.cli; every command imports its module lazily so ``--help`` pulls no torch)."""

from __future__ import annotations

from nvila_edge.config import PRESETS


def cmd_make_data(args) -> int:
    """Write the synthetic offline data set (images, videos, captions; train / held-out split)."""
    from nvila_edge.training.synthetic import SyntheticConfig, make_dataset

    cfg = SyntheticConfig(num_images=args.images, num_videos=args.videos, seed=args.seed,
                          heldout_fraction=args.heldout, num_heldout_videos=args.heldout_videos)
    paths = make_dataset(args.output, cfg)
    for name, path in paths.items():
        n = sum(1 for _ in open(path))
        print(f"{name:9s} {n:6d} records  {path}")
    return 0


def cmd_train(args) -> int:
    """Run the stages of a recipe (all or --stages), resuming after the last finished stage."""
    from nvila_edge.training.recipe import Recipe
    from nvila_edge.training.trainer import run_recipe

    if args.estimate:
        from nvila_edge.config import NVILAConfig
        from nvila_edge.training.memory import estimate_report
        from nvila_edge.training.recipe import nvila_recipe

        recipe = Recipe.load(args.recipe) if args.recipe else nvila_recipe(preset=args.preset)
        print(estimate_report(NVILAConfig.from_preset(args.preset), recipe, args.gpus, args.gpu_mem, args.stage))
        return 0
    if not args.recipe or not args.output:
        raise SystemExit("nvila-edge train: --recipe and -o/--output are required (or use --estimate)")
    recipe = Recipe.load(args.recipe)
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    results = run_recipe(recipe, args.output, stages=stages, on_error=args.on_error, fsdp=args.fsdp,
                         resume=args.resume, save_steps=args.save_steps)
    for r in results:
        loss = r.metrics.get("loss_history") or [r.metrics.get("train_loss", float("nan"))]
        state = "cached" if r.skipped else f"final loss {loss[-1]:.4f}"
        print(f"{r.name:18s} {state:22s} {r.checkpoint}")
    return 0


def cmd_finetune(args) -> int:
    """LoRA / QLoRA on the LLM + LayerNorm-only on the vision tower; or --estimate the memory of that run."""
    from nvila_edge.config import NVILAConfig
    from nvila_edge.training.finetune import finetune
    from nvila_edge.training.finetune_config import FinetuneConfig

    # one config for both: --estimate shows the step the run with the same flags makes
    cfg = FinetuneConfig(mode=args.mode, r=args.r, alpha=args.alpha, dropout=args.dropout, learning_rate=args.lr,
                         vit_lr_ratio=args.vit_lr_ratio, train_projector=args.train_projector, epochs=args.epochs,
                         max_steps=args.max_steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                         max_tiles=args.max_tiles, gradient_checkpointing=not args.no_gradient_checkpointing)
    if args.estimate:
        from nvila_edge.training.memory import estimate_for_finetune

        if args.checkpoint:
            from nvila_edge.checkpoint import read_config

            config, _ = read_config(args.checkpoint)
        else:
            config = NVILAConfig.from_preset(args.preset)
        est = estimate_for_finetune(config, cfg, seq_len=args.seq_len, answer_tokens=args.answer_tokens,
                                    tiles=args.tiles, device=args.device)
        print(est.table())
        return 0
    if not args.checkpoint or not args.data or not args.output:
        raise SystemExit("nvila-edge finetune: CHECKPOINT, --data and -o/--output are required (or use --estimate)")
    result = finetune(args.checkpoint, args.data, args.output, cfg, on_error=args.on_error)
    print(f"fine-tuned adapter + deltas written to {result.output_dir}")
    return 0


def cmd_merge(args) -> int:
    """Merge a fine-tune (LoRA adapter + LayerNorm / projector deltas) into a full checkpoint."""
    from nvila_edge.training.finetune import merge

    out = merge(args.base, args.finetune, args.output)
    print(f"merged checkpoint written to {out}")
    return 0


def cmd_prune(args) -> int:
    """DeltaLoss pruning (paper Eq. 1): keep the examples the large model finds much easier than the small one."""
    from nvila_edge.training.prune import prune_jsonl

    report = prune_jsonl(args.data, args.large, args.small, args.output, keep=args.keep, by=args.by,
                         report_path=args.report)
    print(report)
    return 0


def add_parser(sub) -> None:
    md = sub.add_parser("make-data", help="write the synthetic training data set (offline)")
    md.add_argument("output", help="output folder")
    md.add_argument("--images", type=int, default=1200)
    md.add_argument("--videos", type=int, default=120)
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("--heldout", type=float, default=0.1, help="held-out fraction of the images")
    md.add_argument("--heldout-videos", type=int, default=250, help="held-out video clips (tasks in turn)")
    md.set_defaults(func=cmd_make_data)

    tr = sub.add_parser("train", help="run a training recipe (any subset of the five NVILA stages)")
    tr.add_argument("--recipe", help="recipe YAML / JSON")
    tr.add_argument("-o", "--output", help="folder for the stage checkpoints")
    tr.add_argument("--stages", help="comma-separated stage names (default: all)")
    tr.add_argument("--on-error", choices=("skip", "raise"), default="skip", help="bad data lines: skip (reported) or fail")
    tr.add_argument("--fsdp", choices=("full_shard", "shard_grad_op", "no"),
                    help="under torchrun: shard weights, gradients and AdamW state over the ranks (default: the recipe's)")
    tr.add_argument("--save-steps", type=int, help="FSDP: sharded mid-stage saves every N steps (default: the recipe's)")
    tr.add_argument("--resume", action="store_true", help="FSDP: continue a stage from its latest complete save")
    tr.add_argument("--estimate", action="store_true",
                    help="print the per-GPU memory of --stage under DDP and FSDP at --gpus GPUs and exit")
    tr.add_argument("--preset", default="nvila-8b", choices=sorted(PRESETS), help="model for --estimate")
    tr.add_argument("--stage", type=int, help="--estimate: the stage's number (1-5) in the recipe (default: all)")
    tr.add_argument("--gpus", type=int, default=8, help="--estimate: GPUs (world size)")
    tr.add_argument("--gpu-mem", type=float, default=80.0, help="--estimate: memory of one GPU in GB")
    tr.set_defaults(func=cmd_train)

    ft = sub.add_parser("finetune", help="LoRA / QLoRA + ViT-LayerNorm fine-tuning, or --estimate its memory")
    ft.add_argument("checkpoint", nargs="?", help="base checkpoint (VILA or -hf layout)")
    ft.add_argument("--data", help="training JSONL")
    ft.add_argument("-o", "--output", help="output folder (adapter/, deltas.safetensors, finetune.json)")
    ft.add_argument("--mode", choices=("lora", "qlora"), default="qlora")
    ft.add_argument("--r", type=int, default=64)
    ft.add_argument("--alpha", type=float, default=16)
    ft.add_argument("--dropout", type=float, default=0.05)
    ft.add_argument("--lr", type=float, default=2e-4, help="LLM LoRA learning rate")
    ft.add_argument("--vit-lr-ratio", type=float, default=10.0, help="ViT LayerNorm lr = lr / ratio (5-50)")
    ft.add_argument("--train-projector", action="store_true")
    ft.add_argument("--epochs", type=float, default=3.0)
    ft.add_argument("--max-steps", type=int, default=-1)
    ft.add_argument("--batch-size", type=int, default=4, help="effective batch: examples per optimizer step")
    ft.add_argument("--micro-batch-size", type=int, default=1,
                    help="examples per forward; --batch-size / this many forwards accumulate (default 1)")
    ft.add_argument("--max-tiles", type=int, help="tiles per example, all scales counted (default: the model's)")
    ft.add_argument("--on-error", choices=("skip", "raise"), default="skip")
    ft.add_argument("--estimate", action="store_true", help="print the memory estimate and exit")
    ft.add_argument("--preset", default="nvila-8b", choices=sorted(PRESETS), help="model for --estimate")
    ft.add_argument("--seq-len", type=int, help="--estimate: tokens per example (default: visual + 512)")
    ft.add_argument("--tiles", type=int, help="--estimate: tiles per example (default: the model's max)")
    ft.add_argument("--answer-tokens", type=int,
                    help="--estimate: supervised tokens per example (default: all the text tokens)")
    ft.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="--estimate: the device the run uses (cpu: fp32 weights)")
    ft.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="keep every layer's activations (faster, much more memory); default: checkpointed")
    ft.set_defaults(func=cmd_finetune)

    mg = sub.add_parser("merge", help="merge a fine-tune into a full checkpoint (before calibration)")
    mg.add_argument("base", help="the base checkpoint the fine-tune started from")
    mg.add_argument("finetune", help="the fine-tune output folder")
    mg.add_argument("-o", "--output", required=True)
    mg.set_defaults(func=cmd_merge)

    pr = sub.add_parser("prune", help="DeltaLoss data pruning with a large and a small model")
    pr.add_argument("data", help="training JSONL")
    pr.add_argument("--large", required=True, help="checkpoint of the larger model")
    pr.add_argument("--small", required=True, help="checkpoint of the smaller model")
    pr.add_argument("-o", "--output", required=True, help="pruned JSONL")
    pr.add_argument("--keep", type=float, default=0.5, help="fraction kept per sub-dataset")
    pr.add_argument("--by", choices=("task", "source"), default="task", help="sub-dataset key")
    pr.add_argument("--report", help="score report JSON (default: beside the output)")
    pr.set_defaults(func=cmd_prune)
