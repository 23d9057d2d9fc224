"""Fine-tuning memory, measured: the peak of live tensor memory over one real training step
(``measure_finetune_peak``), and a preset at its real size with random weights fine-tuned as ``finetune``
runs (``measure_preset_peak``), so the estimate of ``memory.py`` is checked against reality
(tests/test_memory.py, docs/BENCHMARKS.md)."""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from nvila_edge.config import NVILAConfig

from .finetune import param_groups, prepare_model, set_gradient_checkpointing
from .finetune_config import FinetuneConfig, tile_capped_config
from .memory import MemoryEstimate, estimate_finetune_memory, estimate_for_finetune


# ---- measurement ----------------------------------------------------------------------------------------------
@dataclass
class MeasuredPeak:
    """Peak live tensor bytes of one training step (forward, backward, optimizer step)."""

    peak_bytes: int
    baseline_bytes: int  # live before the step: parameters, buffers, NF4 quant states, optimizer states, batch
    baseline: dict[str, int] = field(default_factory=dict)
    device_peak_bytes: int | None = None  # CUDA: torch.cuda.max_memory_allocated over the step (allocator view)

    @property
    def step_bytes(self) -> int:
        """What the step adds at its peak: activations, gradients, temporaries."""
        return self.peak_bytes - self.baseline_bytes


def _storages(t: torch.Tensor):
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        for a in attrs:
            inner = getattr(t, a)
            if isinstance(inner, torch.Tensor):
                yield from _storages(inner)
    else:
        yield t.untyped_storage()


class _LiveTensorTracker:
    """Counts each tensor storage once from its creation (any op run under the dispatch mode) until it is
    freed (weakref finalizer on the storage), and records the peak of the sum."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker.add(t)
                return out

        self.mode = _Mode()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def add(self, t: torch.Tensor) -> int:
        added = 0
        for st in _storages(t):
            if st.device.type == "meta":
                continue
            key = st._cdata
            if key in self.live:
                continue
            n = st.nbytes()
            self.live[key] = n
            self.current += n
            added += n
            weakref.finalize(st, self._free, key)
        self.peak = max(self.peak, self.current)
        return added

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    @contextlib.contextmanager
    def tracking(self):
        """The dispatch mode, plus storages resized in place: FSDP2 allocates and frees a unit's gathered
        weights with ``UntypedStorage.resize_`` (no tensor op), so those sizes are followed here."""
        tracker, real = self, torch.UntypedStorage.resize_

        def resize_(st, size):
            out = real(st, size)
            key = st._cdata
            if key in tracker.live:
                tracker.current += st.nbytes() - tracker.live[key]
                tracker.live[key] = st.nbytes()
                tracker.peak = max(tracker.peak, tracker.current)
            elif st.nbytes() and st.device.type != "meta":
                tracker.live[key] = st.nbytes()
                tracker.current += st.nbytes()
                tracker.peak = max(tracker.peak, tracker.current)
                weakref.finalize(st, tracker._free, key)
            return out

        torch.UntypedStorage.resize_ = resize_
        try:
            with self.mode:
                yield
        finally:
            torch.UntypedStorage.resize_ = real


def _quant_state_tensors(model: torch.nn.Module):
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is None:
            continue
        for name in ("absmax", "code"):
            t = getattr(qs, name, None)
            if isinstance(t, torch.Tensor):
                yield t
        nested = getattr(qs, "state2", None)
        if nested is not None:
            for name in ("absmax", "code"):
                t = getattr(nested, name, None)
                if isinstance(t, torch.Tensor):
                    yield t


def measure_finetune_peak(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer | None = None,
                          warmup_steps: int = 1) -> MeasuredPeak:
    """Measure the peak of live tensor memory of one training step of ``model`` (prepared for fine-tuning,
    e.g. by ``finetune.prepare_model``) on ``batch`` (an ``NVILACollator`` batch), on any device.

    ``warmup_steps`` untracked steps run first so the optimizer states exist (the steady state); then one
    step — forward, loss, backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)`` — runs under a
    ``TorchDispatchMode`` that counts every tensor storage from the op that creates it until it is freed.
    The peak includes the live baseline: parameters, buffers, bitsandbytes quant states (absmax), optimizer
    states and the batch's tensors.

    Counted: every tensor storage PyTorch ops allocate (activations kept for backward, gradients,
    temporaries, optimizer updates), each storage once however many views share it. Not counted:
    allocator caching and fragmentation, kernel-internal workspaces that never become tensors, Python
    objects and the interpreter (i.e. this is not RSS). Note: the parameters are updated (pass a copy)."""
    import contextlib

    model.train()
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cuda = next(model.parameters()).device.type == "cuda"
    # as Trainer runs it on a bf16 GPU (training_arguments: bf16=True)
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if cuda and torch.cuda.is_bf16_supported() \
        else contextlib.nullcontext

    def step():
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup_steps):
        step()
    tracker = _LiveTensorTracker()
    base: dict[str, int] = {}

    def register(kind: str, tensors) -> None:
        base[kind] = base.get(kind, 0) + sum(tracker.add(t) for t in tensors)

    register("parameters", model.parameters())
    register("buffers", (b for b in model.buffers() if b is not None))
    register("quant_states", _quant_state_tensors(model))
    register("optimizer_states", (v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)))
    register("batch", (t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)))
    baseline = tracker.current
    tracker.peak = baseline
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tracker.tracking():
        step()
    device_peak = None
    if cuda:
        torch.cuda.synchronize()
        device_peak = int(torch.cuda.max_memory_allocated())
    return MeasuredPeak(int(tracker.peak), int(baseline), base, device_peak)


def estimate_for_batch(config: NVILAConfig, batch: dict, **kwargs) -> MemoryEstimate:
    """``estimate_finetune_memory`` with ``batch_size``, ``seq_len`` (media-expanded, longest example),
    ``answer_tokens`` (supervised, per example on average) and ``tiles`` (per example) read from an
    ``NVILACollator`` batch."""
    n = len(batch["input_ids"])
    answers = sum(int((torch.as_tensor(lab)[1:] != -100).sum()) for lab in batch["labels"])
    kwargs.setdefault("answer_tokens", math.ceil(answers / n))
    lengths = []
    for ids, items in zip(batch["input_ids"], batch["media"]):
        placeholders = sum(m.num_placeholders for m in items)
        lengths.append(len(ids) - placeholders + sum(m.num_tokens for m in items))
    tiles = batch["pixel_values"].shape[0] if batch.get("pixel_values") is not None else 0
    return estimate_finetune_memory(config, batch_size=n, seq_len=max(lengths), tiles=math.ceil(tiles / n), **kwargs)


def preset_example(config: NVILAConfig, answer_words: int = 96, packed: bool = False) -> tuple[dict, int, int, int]:
    """One training example for ``config`` (an image of its largest tiling, 4:3, and an answer of
    ``answer_words`` words), collated; with its tiles, media-expanded length and supervised tokens."""
    from nvila_edge import NVILAProcessor

    from .data import NVILACollator
    from .tokenizer import demo_tokenizer

    proc = NVILAProcessor(config, demo_tokenizer())
    tile = config.vision.image_size
    image = np.random.default_rng(0).integers(0, 256, (3 * tile, 4 * tile, 3), dtype=np.uint8)  # 4:3, the most tiles
    words = "the red circle is to the left of the small blue square".split()
    answer = " ".join(words[i % len(words)] for i in range(answer_words))
    conv = [{"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": answer}]
    batch = NVILACollator(packed=packed)([proc(conv, images=[image], add_generation_prompt=False, return_labels=True)])
    tiles = batch["pixel_values"].shape[0]
    length = len(batch["input_ids"][0]) - 1 + sum(m.num_tokens for m in batch["media"][0])
    answers = int((batch["labels"][0][1:] != -100).sum())
    return batch, tiles, length, answers


def measure_sharded_peak(preset: str, trains=("vision_tower", "mm_projector", "llm"), fsdp: str = "full_shard",
                         steps: int = 2, answer_words: int = 96) -> tuple[MemoryEstimate, MeasuredPeak]:
    """Inside a ``torchrun`` process group on the CPU: a preset at its real size with random weights, the
    ``trains`` modules trained, sharded as ``train --fsdp`` shards it (training/fsdp.py), one example per
    rank; ``steps - 1`` warm-up steps, then the measured one. Returns (``estimate_training_memory`` for that
    step on this world size, this rank's measured peak)."""
    from nvila_edge import NVILAModel

    from . import fsdp as sharded
    from .memory import estimate_training_memory
    from .trainer import set_trainable

    world = sharded.init_process_group()
    config = NVILAConfig.from_preset(preset)
    torch.manual_seed(0)
    model = NVILAModel(config)
    set_trainable(model, trains)
    sharded.freeze_unused(model)
    sharded.shard(model, model, fsdp)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch, tiles, length, answers = preset_example(config, answer_words)
    est = estimate_training_memory(config, trains, batch_size=1, world=world, fsdp=fsdp, seq_len=length, tiles=tiles,
                                   answer_tokens=answers, device="cpu", tile_batch_size=model.tile_batch_size)
    return est, measure_finetune_peak(model, batch, optimizer, warmup_steps=max(0, steps - 1))


def measure_preset_peak(preset: str, device: str = "cpu", steps: int = 3, ft: FinetuneConfig | None = None,
                        answer_words: int = 96) -> tuple[MemoryEstimate, MeasuredPeak]:
    """A preset at its real size with random weights (no download), fine-tuned as ``finetune`` would (``ft``,
    default ``FinetuneConfig()``: QLoRA r 64, micro-batch 1, gradient checkpointing) on one example with an
    image of the model's largest tiling and an answer of ``answer_words`` words; ``steps - 1`` warm-up steps,
    then the measured one. Returns (``estimate_for_finetune`` for that example, the measured peak: on CUDA
    ``device_peak_bytes`` is ``torch.cuda.max_memory_allocated``). The GPU check of docs/BENCHMARKS.md:
    ``pytest -m gpu tests/test_memory.py -s``."""
    from nvila_edge import NVILAModel, NVILAProcessor

    from .data import NVILACollator
    from .tokenizer import demo_tokenizer

    ft = ft or FinetuneConfig()
    config = tile_capped_config(NVILAConfig.from_preset(preset), ft.max_tiles)
    dtype = getattr(torch, config.model_dtype) if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = NVILAModel(config).to(dtype)
    groups = prepare_model(model, ft)
    optimizer = torch.optim.AdamW(param_groups(groups, ft))
    set_gradient_checkpointing(model, ft.gradient_checkpointing)
    batch, tiles, length, answers = preset_example(config, answer_words)
    est = estimate_for_finetune(config, ft, seq_len=length, answer_tokens=answers, tiles=tiles, device=device,
                                tile_batch_size=model.tile_batch_size)
    measured = measure_finetune_peak(model, batch, optimizer, warmup_steps=max(0, steps - 1))
    return est, measured
