"""Runs recipe stages with transformers ``Trainer``; each stage ends in a VILA-layout checkpoint that
carries the config, the recipe and the stage metrics. Re-running resumes after the last finished stage.

The same code runs under ``torchrun`` / ``accelerate launch`` (DDP; gloo on CPU, NCCL on GPU): only rank 0
writes checkpoints, every rank then reloads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from nvila_edge import NVILAConfig, NVILAModel, NVILAProcessor, NVILATokenizer
from nvila_edge.errors import ConfigError

from .data import (DataIssue, ExampleCache, LengthGroupedSampler, NVILACollator, NVILADataset, Record,
                   dataset_lengths, read_jsonl, warm_cache)
from .recipe import FSDP_MODES, MODULES, DataSource, Recipe, Stage

log = logging.getLogger("nvila_edge.training")
COMPLETE = "metrics.json"  # written inside the atomic checkpoint: its presence means the stage finished


@dataclass
class StageResult:
    name: str
    checkpoint: Path
    metrics: dict
    skipped: bool = False


def set_trainable(model: NVILAModel, modules: Sequence[str]) -> int:
    """Freeze everything but ``modules``; return the number of trainable parameters."""
    for name in MODULES:
        for p in getattr(model, name).parameters():
            p.requires_grad_(name in modules)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stage_sources(recipe: Recipe, stage: Stage, on_error: str = "skip",
                  issues: list[DataIssue] | None = None) -> list[tuple[DataSource, list[Record]]]:
    """Each of the stage's sources with its JSONL records (filtered, capped, repeated); rendered sources
    come with none (``stage_dataset`` renders them in memory)."""
    out: list[tuple[DataSource, list[Record]]] = []
    for src in stage.data:
        if src.synthetic:
            out.append((src, []))
            continue
        recs = read_jsonl(recipe.resolve(src.path), on_error=on_error, issues=issues, tasks=src.tasks)
        if src.max_examples is not None:
            recs = recs[: src.max_examples]
        out.append((src, recs * max(1, src.repeat)))
    return out


def stage_processor(processor: NVILAProcessor, stage: Stage, source: DataSource | None = None) -> NVILAProcessor:
    """The processor with the stage's preprocessing overrides, then the source's (the model's own config is
    untouched)."""
    over = {**(stage.preprocessing or {}), **((source.preprocessing if source else None) or {})}
    if not over:
        return processor
    cfg = processor.config
    over = {k: tuple(v) if isinstance(v, list) else v for k, v in over.items()}
    pre = dataclasses.replace(cfg.preprocessing, **over)
    return NVILAProcessor(dataclasses.replace(cfg, preprocessing=pre), processor.tokenizer)


Sources = Sequence[tuple[DataSource, Sequence[Record]]]  # stage_sources: each source with its JSONL records


def stage_dataset(stage: Stage, sources: Sources, processor: NVILAProcessor,
                  cache: ExampleCache | None = None) -> torch.utils.data.Dataset:
    """The stage's examples: per source (``stage_sources``), its JSONL records or its rendered images, each
    through the processor with the stage's and the source's preprocessing overrides. With ``cache``, each
    example is processed once for the whole run."""
    from .recipe import VIDEO_TASKS
    from .synthetic import RenderedImages
    from .synthetic_video import RenderedVideos

    parts: list[torch.utils.data.Dataset] = []
    for src, recs in sources:
        proc = stage_processor(processor, stage, src)
        if recs:
            parts.append(NVILADataset(recs, proc, cache))
        elif src.synthetic:
            videos = bool(src.tasks) and set(src.tasks) <= set(VIDEO_TASKS)
            rendered = (RenderedVideos if videos else RenderedImages)(proc, src.synthetic, src.tasks, seed=src.seed,
                                                                      cache=cache)
            parts += [rendered] * max(1, src.repeat)
    if not parts:
        raise ConfigError(f"stage {stage.name!r} has no examples")
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def training_arguments(output_dir: Path, *, batch_size: int, learning_rate: float, epochs: float, max_steps: int,
                       warmup_ratio: float, weight_decay: float, scheduler: str, seed: int, progress: bool,
                       logging_steps: int = 25, gradient_accumulation_steps: int = 1):
    """transformers ``TrainingArguments`` as every nvila-edge training run uses them (``batch_size`` per
    forward, ``gradient_accumulation_steps`` forwards per optimizer step): no intermediate saves
    or reporting, our own collator's columns kept, bf16 autocast on a bf16 GPU and fp32 on the CPU, and DDP
    (gloo on CPU) when launched with several processes."""
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        max_steps=max_steps,
        warmup_steps=warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=weight_decay,
        lr_scheduler_type=scheduler,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        seed=seed,
        disable_tqdm=not progress,
        ddp_backend=("nccl" if cuda else "gloo") if _world_size() > 1 else None,
        ddp_find_unused_parameters=True,  # frozen towers / text-only batches leave parameters unused
    )


@contextlib.contextmanager
def linear_patch_embedding(model: NVILAModel):
    """While training, the vision tower's patch convolution runs as patchify + matmul (same weights, same
    result): its kernel equals its stride, and on the CPU oneDNN's stride-28 convolution and its backward
    took ~20 % of a demo VEP step against ~3x less as a matmul. Export and inference keep the Conv."""
    conv = getattr(getattr(model.vision_tower, "embeddings", None), "patch_embedding", None)
    plain = (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == conv.stride and conv.groups == 1
             and conv.dilation == (1, 1) and conv.padding in ((0, 0), "valid"))
    if not plain:
        yield
        return

    def forward(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p, q = conv.kernel_size
        if h % p or w % q:
            return torch.nn.Conv2d.forward(conv, x)
        t = x.reshape(n, c, h // p, p, w // q, q).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // q), c * p * q)
        y = torch.nn.functional.linear(t, conv.weight.reshape(conv.out_channels, -1), conv.bias)
        return y.transpose(1, 2).reshape(n, conv.out_channels, h // p, w // q)

    conv.forward = forward
    try:
        yield
    finally:
        del conv.forward  # back to the class's Conv2d.forward


def stage_trainer(group_lengths: Sequence[int] | None = None, **kwargs):
    """A transformers ``Trainer`` (imported here: it is slow to import) that samples with our
    ``LengthGroupedSampler`` when given the examples' lengths."""
    from transformers import Trainer

    class StageTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            if group_lengths is None:
                return super()._get_train_sampler(train_dataset)
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(group_lengths, batch, seed=self.args.seed)

    return StageTrainer(**kwargs)


def quiet_progress(trainer, desc: str, progress: bool) -> None:
    """The Trainer's terminal output cut to one progress bar named ``desc`` (none without ``progress``): its
    dict logs stay in ``trainer.state.log_history`` (saved in the stage's metrics.json), not on the terminal."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class StageProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(desc)

        def on_log(self, args, state, control, logs=None, **kwargs):
            pass  # kept in state.log_history

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(StageProgress())


def warm_workers(stage: Stage, num_examples: int) -> int:
    """Processes for ``warm_cache`` before ``stage`` trains: all the cores, when the stage draws at least
    1/cores of its examples (then processing all of them in parallel costs no more time than the drawn ones
    one by one); 0 under torchrun (each rank has its own cache) or with one core."""
    cores = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    if cores < 2 or _world_size() > 1 or num_examples == 0:
        return 0
    drawn = stage.max_steps * stage.batch_size if stage.max_steps > 0 else stage.epochs * num_examples
    return cores if drawn * cores >= num_examples else 0


def train_stage(model: NVILAModel, processor: NVILAProcessor, stage: Stage, sources: Sources,
                out_dir: Path, seed: int = 0, gradient_checkpointing: bool = False, progress: bool = True,
                extra_files: dict[str, str] | None = None, cache: ExampleCache | None = None,
                verbose: bool = True, fsdp: str = "no", resume: bool = False, save_steps: int = 0,
                fingerprint: dict | None = None) -> dict:
    """Train one stage on its ``sources`` (``stage_sources``) and save the checkpoint to ``out_dir`` (rank 0,
    atomically);
    ``cache`` keeps processed examples for later epochs and stages. ``verbose=False``: one progress bar, the
    Trainer's logs only in the checkpoint's metrics.json (``log_history``).

    ``fsdp`` other than "no": the stage trains sharded over the process group (training/fsdp.py; the
    stage's ``batch_size`` is then the global batch), with sharded saves every ``save_steps`` steps that
    ``resume`` continues from (``fingerprint``: what the resumed run must share); ``model`` is left
    sharded: reload the checkpoint to use it."""
    n_trainable = set_trainable(model, stage.trains)
    if gradient_checkpointing:
        model.llm.gradient_checkpointing_enable()
        model.vision_tower.gradient_checkpointing_enable()
    scratch = out_dir.parent / f".{out_dir.name}.trainer"
    args = training_arguments(scratch, batch_size=stage.batch_size, learning_rate=stage.learning_rate,
                              epochs=stage.epochs, max_steps=stage.max_steps, warmup_ratio=stage.warmup_ratio,
                              weight_decay=stage.weight_decay, seed=seed, progress=progress,
                              scheduler="constant" if stage.scheduler == "one_cycle" else stage.scheduler,
                              logging_steps=max(1, min(25, stage.max_steps if stage.max_steps > 0 else 25)))
    if cache is not None:  # another stage's overrides will not come back: free their tiles
        cache.retain({ExampleCache.processor_key(stage_processor(processor, stage, src)) for src in stage.data})
    dataset = stage_dataset(stage, sources, processor, cache)
    if cache is not None:
        cache.retain_sources(dataset)
    log.info("stage %s: %d examples (%d from JSONL)", stage.name, len(dataset), sum(len(r) for _, r in sources))
    if cache is not None and (workers := warm_workers(stage, len(dataset))) > 1:
        warm_cache(dataset, cache, workers=workers, progress=progress and verbose and _is_main(),
                   desc=f"{stage.name}: process examples")
    trained = model
    if stage.objective != "lm":  # the tag head is a training-time module: the checkpoint below never holds it
        from .media_tags import MediaTagModel

        tok = processor.tokenizer
        trained = MediaTagModel(model, stage.objective, stage.tag_weight,
                                ignore_ids=[*tok.eos_token_ids, tok.pad_token_id, *tok.newline_ids])
    if fsdp != "no":
        return _train_sharded(model, trained, processor, stage, dataset, out_dir, scratch, seed=seed, fsdp=fsdp,
                              resume=resume, save_steps=save_steps, fingerprint=fingerprint or {},
                              progress=progress, extra_files=extra_files, n_trainable=n_trainable,
                              gradient_checkpointing=gradient_checkpointing)
    optimizers = (None, None)
    if stage.scheduler == "one_cycle":
        optimizers = one_cycle(trained, stage, len(dataset))
    lengths = dataset_lengths(dataset) if stage.group_by_length else None
    trainer = stage_trainer(lengths, model=trained, args=args, train_dataset=dataset, data_collator=NVILACollator(packed=stage.packing),
                            optimizers=optimizers)
    if not verbose:
        quiet_progress(trainer, stage.name, progress and _is_main())
    with linear_patch_embedding(model):
        result = trainer.train()
    metrics = {**result.metrics, "trainable_parameters": n_trainable, "examples": len(dataset),
               "loss_history": [h["loss"] for h in trainer.state.log_history if "loss" in h],
               "log_history": trainer.state.log_history}
    if gradient_checkpointing:
        model.llm.gradient_checkpointing_disable()
        model.vision_tower.gradient_checkpointing_disable()
    for p in model.parameters():
        p.requires_grad_(False)
    if _is_main():
        files = dict(extra_files or {})
        files[COMPLETE] = json.dumps(metrics, indent=2)
        model.save_pretrained(out_dir, tokenizer=processor.tokenizer, extra_files=files)
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    _barrier()
    return metrics


def _train_sharded(model, trained, processor, stage, dataset, out_dir: Path, scratch: Path, *, seed: int, fsdp: str,
                   resume: bool, save_steps: int, fingerprint: dict, progress: bool, extra_files, n_trainable: int,
                   gradient_checkpointing: bool) -> dict:
    """``train_stage`` under FSDP: train sharded, then rank 0 writes the gathered checkpoint (atomically) and
    drops the stage's mid-stage shards."""
    from . import fsdp as sharded

    with linear_patch_embedding(model):
        metrics, plain = sharded.train_stage_fsdp(
            trained, model, dataset, NVILACollator(packed=stage.packing), stage, out_dir, mode=fsdp, seed=seed,
            fingerprint_=fingerprint, save_steps=save_steps, resume=resume, progress=progress,
            prefix="model." if trained is not model else "")
    metrics = {**metrics, "trainable_parameters": n_trainable, "examples": len(dataset)}
    if _is_main():
        files = dict(extra_files or {})
        files[COMPLETE] = json.dumps(metrics, indent=2)
        plain.save_pretrained(out_dir, tokenizer=processor.tokenizer, extra_files=files)
        sharded.drop_shards(out_dir)
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    _barrier()
    return metrics


def one_cycle(model: torch.nn.Module, stage: Stage, num_records: int):
    """AdamW + ``OneCycleLR`` (5 % warm-up from lr/25, cosine down, momentum cycled 0.95 → 0.85 → 0.95).

    The demo's media-tag stage learns left / right in a late jump; with this schedule the jump came (95 %),
    with warm-up + cosine at the same steps it did not (64 %) — docs/BENCHMARKS.md."""
    import math

    world = _world_size()
    per_epoch = math.ceil(math.ceil(num_records / world) / stage.batch_size)
    steps = stage.max_steps if stage.max_steps > 0 else math.ceil(stage.epochs * per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all parameters (the per-tensor loop was ~15 % of a small media-tag step)
    opt = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=stage.weight_decay, fused=True)
    # one spare step: OneCycleLR refuses to step past its total
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, stage.learning_rate, total_steps=steps + 1, pct_start=0.05)


def stage_dir(output_dir: Path, index: int, stage: Stage) -> Path:
    return output_dir / f"stage{index + 1}-{stage.name}"


def base_model(recipe: Recipe, tokenizer: NVILATokenizer | None = None) -> tuple[NVILAModel, NVILAProcessor]:
    """The recipe's starting point: a checkpoint, or a preset initialised from the seed."""
    if recipe.checkpoint:
        path = recipe.resolve(recipe.checkpoint)
        model = NVILAModel.from_pretrained(path)
        return model, NVILAProcessor.from_pretrained(path)
    if tokenizer is None and recipe.tokenizer:
        tokenizer = NVILATokenizer.from_pretrained(recipe.resolve(recipe.tokenizer))
    if tokenizer is None:
        if recipe.preset not in ("demo", "tiny", "tiny-lite"):
            raise ConfigError(f"recipe {recipe.name!r} starts from preset {recipe.preset!r}: set 'tokenizer' to a tokenizer folder")
        from .tokenizer import demo_tokenizer

        tokenizer = demo_tokenizer()
    from transformers import set_seed  # python, numpy and torch RNGs (CUDA too); imported here: it is slow

    config = NVILAConfig.from_preset(recipe.preset)
    set_seed(recipe.seed)
    model = NVILAModel(config)
    from .initialization import init_position_embeddings

    init_position_embeddings(model, recipe.position_init)
    model.tokenizer = tokenizer
    return model, NVILAProcessor(config, tokenizer)


def run_recipe(recipe: Recipe, output_dir: str | Path, stages: Sequence[str] | None = None,
               tokenizer: NVILATokenizer | None = None, on_error: str = "skip", progress: bool = True,
               cache_bytes: int = 4 << 30, verbose: bool = True,
               on_stage: Callable[[StageResult], None] | None = None, fsdp: str | None = None,
               resume: bool = False, save_steps: int | None = None) -> list[StageResult]:
    """Run ``stages`` (default: all) in recipe order, resuming after the last finished checkpoint.

    ``verbose=False``: per stage one progress bar, the Trainer's logs in its metrics.json only; ``on_stage``
    is called with each stage's result as it finishes (or is found cached).

    Processed examples are kept across epochs and stages up to ``cache_bytes`` of float16 pixels
    (``ExampleCache``; 0 turns it off).

    ``fsdp`` (default: the recipe's): "full_shard" / "shard_grad_op" train each stage sharded under torchrun
    (training/fsdp.py), with sharded saves every ``save_steps`` (default: the recipe's) steps; ``resume``
    continues a stage from its latest complete save."""
    from transformers import set_seed

    output_dir = Path(output_dir)
    wanted = list(stages) if stages else [s.name for s in recipe.stages]
    for name in wanted:
        recipe.stage(name)  # raises for unknown names
    fsdp = recipe.fsdp if fsdp is None else fsdp
    save_steps = recipe.save_steps if save_steps is None else save_steps
    if fsdp not in FSDP_MODES:
        raise ConfigError(f"--fsdp must be one of {FSDP_MODES}, got {fsdp!r}")
    if fsdp != "no":  # refused before any weight is built
        from . import fsdp as sharded

        for i, stage in enumerate(recipe.stages):
            found = sharded.latest_shards(stage_dir(output_dir, i, stage))
            if found is not None and not resume and stage.name in wanted:
                raise ConfigError(f"stage {stage.name!r} has mid-stage shards at {found}: pass --resume to continue "
                                  f"from there, or delete {found.parent} to start the stage over")
        world = sharded.init_process_group()
        sharded.stage_needs([recipe.stage(n) for n in wanted], world)
    elif resume:
        raise ConfigError("--resume continues a stage from its sharded mid-stage saves, which only FSDP writes: "
                          "pass --fsdp full_shard (finished stages are always skipped on a re-run)")
    results: list[StageResult] = []
    current: Path | None = None  # the checkpoint the next stage starts from
    model = processor = None
    cache = ExampleCache(cache_bytes) if cache_bytes > 0 else None
    for i, stage in enumerate(recipe.stages):
        ckpt = stage_dir(output_dir, i, stage)
        done = (ckpt / COMPLETE).is_file()
        if stage.name not in wanted or done:
            if done:
                current = ckpt
                model = None
                if stage.name in wanted:
                    results.append(StageResult(stage.name, ckpt, json.loads((ckpt / COMPLETE).read_text()), skipped=True))
                    if on_stage:
                        on_stage(results[-1])
            continue
        if model is None:
            if current is not None:
                model, processor = NVILAModel.from_pretrained(current), NVILAProcessor.from_pretrained(current)
            else:
                model, processor = base_model(recipe, tokenizer)
        model.train()
        issues: list[DataIssue] = []
        sources = stage_sources(recipe, stage, on_error=on_error, issues=issues)
        set_seed(recipe.seed + i)
        log.info("stage %d/%d %s: trains %s", i + 1, len(recipe.stages), stage.name, stage.trains)
        extra = {"recipe.json": json.dumps(recipe.to_dict(), indent=2),
                 "data_issues.json": json.dumps([str(x) for x in issues], indent=2)}
        metrics = train_stage(model, processor, stage, sources, ckpt, seed=recipe.seed + i,
                              gradient_checkpointing=recipe.gradient_checkpointing, progress=progress, extra_files=extra, cache=cache,
                              verbose=verbose, fsdp=fsdp, resume=resume, save_steps=save_steps,
                              fingerprint={"recipe": _fingerprint(recipe), "stage": stage.name})
        model.eval()
        if fsdp != "no":
            model = None  # left sharded: the next stage loads the gathered checkpoint
        results.append(StageResult(stage.name, ckpt, metrics))
        if on_stage:
            on_stage(results[-1])
        current = ckpt
    return results


def _fingerprint(recipe: Recipe) -> dict:
    """The recipe's training content, which a resumed stage must share with the run that wrote its shards (not
    where its files are, how often it saves, or how it shards)."""
    d = recipe.to_dict()
    for k in ("base_dir", "save_steps", "fsdp"):
        d.pop(k, None)
    return d


def last_checkpoint(recipe: Recipe, output_dir: str | Path) -> Path | None:
    found = None
    for i, stage in enumerate(recipe.stages):
        ckpt = stage_dir(Path(output_dir), i, stage)
        if (ckpt / COMPLETE).is_file():
            found = ckpt
    return found
