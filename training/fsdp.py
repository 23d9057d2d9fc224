"""One recipe stage trained with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) under ``torchrun``:
weights, gradients and AdamW state sharded over the ranks, so a model whose DDP copy does not fit one GPU
(NVILA-8B: ~16 bytes a parameter) trains on several.

Why ``fully_shard`` and not the HF Trainer / accelerate FSDP path: accelerate enables FSDP only for GPU
process groups, so that path could not be tested here on CPU ranks; ``fully_shard`` runs the same on gloo
(CPU) and NCCL (GPU). The loop is the Trainer's arithmetic (AdamW, a transformers scheduler, gradient norm
clipped at 1.0) with one difference that makes the run independent of the world size: a stage's
``batch_size`` is the *global* batch, split over the ranks, and the LM loss is the sum over each rank's
supervised tokens divided by the global count (``num_items_in_batch``), so G ranks compute the gradient one
process computes on the whole batch. Not carried over from the Trainer path: ``group_by_length`` (batches are
drawn at random), and a media-tag objective's loss is weighted by examples, not tokens.

Units: one per SigLIP encoder layer, the SigLIP patch embedding, one per Qwen2 decoder layer, and the root
(embeddings, projector, norms, LM head, a training-time tag head). Mid-stage saves are
``torch.distributed.checkpoint`` shards (every rank writes its own) in ``.<stage>.shards/step-N``, renamed
into place only when every rank has written; the stage's output is a normal VILA-layout checkpoint gathered
on rank 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch

from nvila_edge.errors import CheckpointError, ConfigError

log = logging.getLogger("nvila_edge.training")

PROGRESS = "progress.json"  # written last into a step folder (before its rename): the resume point
MAX_GRAD_NORM = 1.0  # as transformers' Trainer clips


# ---- process group and batch checks ------------------------------------------------------------------------
def init_process_group() -> int:
    """The world size of the process group ``torchrun`` set up (initialised here when torchrun's variables are
    set and no group exists yet); ``ConfigError`` outside torchrun."""
    dist = torch.distributed
    if not dist.is_available():
        raise ConfigError("FSDP needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            raise ConfigError("--fsdp needs a process group: run it under torchrun, e.g. "
                              "`torchrun --nproc-per-node 8 -m nvila_edge.cli train --recipe R -o OUT --fsdp full_shard`")
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_world_size()


def check_global_batch(stage, world: int) -> int:
    """Examples per rank and step: the stage's global ``batch_size`` over ``world`` ranks."""
    if stage.batch_size % world:
        raise ConfigError(f"stage {stage.name!r}: the global batch_size {stage.batch_size} is not divisible by the "
                          f"world size {world}; use a multiple of {world} or another number of ranks")
    return stage.batch_size // world


# ---- sharding ------------------------------------------------------------------------------------------------
def shard_units(model) -> list[torch.nn.Module]:
    """The modules that become FSDP units below the root: the patch embedding, every SigLIP encoder layer,
    every Qwen2 decoder layer."""
    vt = model.vision_tower
    units = [vt.embeddings] if hasattr(vt, "embeddings") else []
    return units + list(vt.encoder.layers) + list(model.llm.model.layers)


def shard(root: torch.nn.Module, model, mode: str) -> torch.nn.Module:
    """``fully_shard`` each unit of ``model`` (``shard_units``), then ``root`` (the module the step calls:
    the model or its training wrapper). ``full_shard`` frees each unit's gathered weights after its forward
    (ZeRO-3); ``shard_grad_op`` keeps them until backward (ZeRO-2: less communication, more memory). On a
    bf16 GPU the gathered weights are bf16 and gradients reduce in fp32; on the CPU everything stays fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cuda = torch.cuda.is_available()  # fully_shard moves each rank's shards to its GPU (never the whole model)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if cuda and torch.cuda.is_bf16_supported() else MixedPrecisionPolicy())
    reshard = mode == "full_shard"
    for unit in shard_units(model):
        fully_shard(unit, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(root, reshard_after_forward=reshard, mp_policy=mp)
    return root


def freeze_unused(model) -> None:
    """Freeze what the forward never runs: the SigLIP layers above ``select_layer``, its post-LayerNorm and
    pooling head. They would get no gradient, hence no optimizer state, and a resumed run's optimizer (which
    DCP loads into a template holding a state for every trainable parameter) would not match the saved one."""
    vt = model.vision_tower
    layers = vt.encoder.layers
    keep = model.config.vision.select_layer % (len(layers) + 1)
    unused = [*layers[keep:], getattr(vt, "post_layernorm", None), getattr(vt, "head", None)]
    for m in unused:
        if m is not None:
            m.requires_grad_(False)


# ---- data order ------------------------------------------------------------------------------------------------
def global_batch(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Indices of optimizer step ``step``'s global batch: epoch ``step // (n // batch)`` draws a permutation of
    the ``n`` examples from ``seed + epoch``; the last incomplete batch of an epoch is dropped. The same on
    every rank and at every world size."""
    per_epoch = n // batch
    epoch, b = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[b * batch:(b + 1) * batch].tolist()


def total_steps(stage, n: int) -> int:
    if n < stage.batch_size:
        raise ConfigError(f"stage {stage.name!r}: {n} examples are fewer than the global batch_size {stage.batch_size}")
    return stage.max_steps if stage.max_steps > 0 else max(1, math.ceil(stage.epochs * (n // stage.batch_size)))


def _supervised(batch: dict) -> int:
    return sum(int((torch.as_tensor(lab)[1:] != -100).sum()) for lab in batch["labels"])


# ---- sharded checkpoints ------------------------------------------------------------------------------------------
def shards_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.shards"


def _step_dirs(root: Path) -> list[Path]:
    """Complete step folders, oldest first (a half-written one is a hidden ``.step-N.tmp``, never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / PROGRESS).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_shards(out_dir: Path) -> Path | None:
    dirs = _step_dirs(shards_dir(out_dir))
    return dirs[-1] if dirs else None


def _differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(set(a) | set(b)) for x in _differences(a.get(k), b.get(k), f"{path}.{k}" if path else k)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [x for i, (u, v) in enumerate(zip(a, b)) for x in _differences(u, v, f"{path}[{i}]")]
    return [] if a == b else [path or "(root)"]


def _state(root: torch.nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(root), "optim": get_optimizer_state_dict(root, optimizer)}


def save_shards(out_dir: Path, step: int, root: torch.nn.Module, optimizer, progress: dict) -> Path:
    """Every rank writes its shards of the model and optimizer into ``.step-N.tmp``; once all have, rank 0
    adds ``progress.json`` (step, world size, scheduler, losses, fingerprint), renames the folder to
    ``step-N`` and removes the older ones."""
    import torch.distributed.checkpoint as dcp

    dist = torch.distributed
    root_dir = shards_dir(out_dir)
    final, tmp = root_dir / f"step-{step:08d}", root_dir / f".step-{step:08d}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(root, optimizer), checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        from nvila_edge.io import atomic_write_text

        atomic_write_text(tmp / PROGRESS, json.dumps({**progress, "step": step, "world_size": dist.get_world_size()}))
        os.replace(tmp, final)
        for old in _step_dirs(root_dir)[:-1]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_shards(path: Path, root: torch.nn.Module, optimizer, expect: dict) -> dict:
    """Load the shards of ``path`` into the sharded ``root`` and ``optimizer`` and return its progress.
    ``CheckpointError`` when the shards come from another recipe or stage; another world size is resharded
    (DCP maps the saved shards onto this run's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    progress = json.loads((path / PROGRESS).read_text())
    diff = _differences(progress.get("fingerprint"), expect)
    if diff:
        raise CheckpointError(f"cannot resume from {path}: it was written by a different recipe or stage "
                              f"(differs in {', '.join(diff[:6])}); delete {path.parent} to start the stage over")
    world = torch.distributed.get_world_size()
    if progress["world_size"] != world:
        log.warning("resuming %s written by %d ranks on %d: resharding", path, progress["world_size"], world)
    state = _state(root, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP's own errors name the missing / mismatched keys
        raise CheckpointError(f"cannot resume from {path}: {e}") from e
    set_model_state_dict(root, state["model"])
    set_optimizer_state_dict(root, optimizer, state["optim"])
    return progress


# ---- the gathered checkpoint ------------------------------------------------------------------------------------
def gathered_model(root: torch.nn.Module, model, prefix: str):
    """The full weights (a collective: every rank calls it) as a plain ``NVILAModel`` on rank 0, None on the
    others. ``prefix``: where ``model`` sits in ``root`` ("" or "model." under a training wrapper)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from nvila_edge import NVILAModel

    full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    with torch.device("meta"):
        plain = NVILAModel(model.config)
    plain.load_state_dict(sd, assign=True, strict=False)
    missing = [k for k, v in plain.state_dict().items() if v.is_meta]
    if missing:
        raise CheckpointError(f"the gathered state lacks {missing[:5]}")
    plain.tokenizer = model.tokenizer
    return plain


# ---- the stage loop -----------------------------------------------------------------------------------------------
def scheduler(optimizer, stage, steps: int):
    """The stage's learning-rate schedule over ``steps`` optimizer steps (as ``train_stage`` gives the
    Trainer: a transformers scheduler name with its warm-up, or one-cycle)."""
    if stage.scheduler == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, stage.learning_rate, total_steps=steps + 1, pct_start=0.05)
    from transformers import get_scheduler

    warm = stage.warmup_ratio
    warm = math.ceil(warm * steps) if warm < 1 else int(warm)
    return get_scheduler(stage.scheduler, optimizer, num_warmup_steps=warm, num_training_steps=steps)


def train_stage_fsdp(root: torch.nn.Module, model, dataset, collate, stage, out_dir: Path, *, mode: str, seed: int,
                     fingerprint_: dict, save_steps: int = 0, resume: bool = False, progress: bool = True,
                     prefix: str = "") -> tuple[dict, object]:
    """Train ``stage`` on ``dataset`` with ``root`` (``model`` or its training wrapper) sharded over the
    process group. Returns (metrics, the gathered plain model on rank 0 / None elsewhere); ``model`` and
    ``root`` are left sharded (reload the checkpoint to use them)."""
    from tqdm.auto import tqdm

    dist = torch.distributed
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = check_global_batch(stage, world)
    n = len(dataset)
    steps = total_steps(stage, n)
    found = latest_shards(out_dir) if resume else None  # run_recipe refused leftover shards without resume
    freeze_unused(model)
    shard(root, model, mode)
    params = [p for p in root.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=stage.weight_decay)
    sched = scheduler(optimizer, stage, steps)
    start, losses = 0, []
    if found is not None:
        state = load_shards(found, root, optimizer, fingerprint_)
        start, losses = state["step"], state["losses"]
        sched.load_state_dict(state["scheduler"])
        log.info("stage %s: resumed at step %d/%d from %s", stage.name, start, steps, found)
    device = next(root.parameters()).device
    bar = tqdm(total=steps, initial=start, desc=stage.name, disable=not (progress and rank == 0))
    root.train()
    for step in range(start, steps):
        mine = global_batch(n, stage.batch_size, step, seed)[rank * per_rank:(rank + 1) * per_rank]
        batch = collate([dataset[i] for i in mine])
        lm = stage.objective == "lm"
        # collectives on the rank's device (NCCL takes only GPU tensors)
        count = torch.tensor([float(_supervised(batch) if lm else len(mine))], device=device)
        batch = torch.utils._pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)
        dist.all_reduce(count)
        if lm:  # sum over this rank's tokens / all ranks' tokens: the whole batch's token mean, summed over ranks
            loss = root(**batch, num_items_in_batch=count[0]).loss
        else:  # mean over this rank's examples, weighted by its share of the batch
            loss = root(**batch).loss * (len(mine) / float(count))
        (loss * world).backward()  # FSDP averages the gradients over the ranks
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().float().reshape(1)
        dist.all_reduce(total)
        losses.append(float(total))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if save_steps > 0 and (step + 1) % save_steps == 0 and step + 1 < steps:
            save_shards(out_dir, step + 1, root, optimizer, {"losses": losses, "scheduler": sched.state_dict(),
                                                              "fingerprint": fingerprint_})
    bar.close()
    plain = gathered_model(root, model, prefix)
    metrics = {"train_loss": sum(losses) / len(losses) if losses else float("nan"), "global_step": steps,
               "epoch": steps / max(1, n // stage.batch_size), "loss_history": losses, "fsdp": mode,
               "world_size": world, "resumed_from_step": start}
    return metrics, plain


def drop_shards(out_dir: Path) -> None:
    """Rank 0, after the stage's checkpoint is written: its mid-stage shards are no longer needed."""
    shutil.rmtree(shards_dir(out_dir), ignore_errors=True)


def stage_needs(stages: Sequence, world: int) -> None:
    """Refuse, before any weight is built, a run whose stages' global batches ``world`` does not divide."""
    for s in stages:
        check_global_batch(s, world)

