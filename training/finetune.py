"""Parameter-efficient fine-tuning, the NVILA recipe (paper Table 5): LoRA / QLoRA on the LLM plus the
vision tower's LayerNorms only, with their own (5–50× smaller) learning rate.

- **LLM**: peft LoRA (default r 64, alpha 16, dropout 0.05) on the Qwen2 linears. ``mode="qlora"`` first
  replaces those linears by bitsandbytes ``Linear4bit`` (NF4, fp32 compute on CPU): the frozen base weights
  live in 4 bit, only the adapters train.
- **Vision tower**: only the LayerNorm parameters train (the paper's rule: freeze every ViT parameter whose
  name contains ``embedding``, ``mlp``, ``self_attn`` or ``head``), in their own optimizer group with
  ``lr = learning_rate / vit_lr_ratio``.
- **Projector**: frozen unless ``train_projector=True`` (own group, ``projector_lr``).

A fine-tune directory holds ``adapter/`` (peft format), ``deltas.safetensors`` (the trained ViT LayerNorm
and projector tensors, full values, keyed by ``NVILAModel.state_dict()`` names) and ``finetune.json``
(config, base checkpoint, metrics, versions). ``merge`` folds it into a plain checkpoint; ``load_finetuned``
rebuilds the trained model (NF4 base + adapter for QLoRA) for inference without merging.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from nvila_edge import NVILAConfig, NVILAModel, NVILAProcessor
from nvila_edge.errors import CheckpointError, ConfigError
from nvila_edge.io import atomic_directory
from nvila_edge.optional import require

from .data import DataIssue, NVILACollator, NVILADataset, read_jsonl
from .finetune_config import QWEN2_LINEARS, VIT_FROZEN_NAME_PARTS, FinetuneConfig, tile_capped_config
from .trainer import training_arguments

log = logging.getLogger("nvila_edge.training")

ADAPTER_DIR = "adapter"
DELTAS_FILE = "deltas.safetensors"
FINETUNE_FILE = "finetune.json"


@dataclass
class FinetuneResult:
    output_dir: Path
    metrics: dict
    trainable: dict[str, int]  # trainable parameter count per part: llm_lora, vision_layernorm, projector
    model: NVILAModel | None = field(default=None, repr=False, compare=False)  # the trained model (eval mode)


# ---- model preparation ------------------------------------------------------------------------------------
def _require(module: str, purpose: str):
    return require(module, "train", purpose)


def vit_layernorm_parameters(model: NVILAModel) -> dict[str, nn.Parameter]:
    """The ViT parameters the paper trains: names (in ``model``) without embedding/mlp/self_attn/head."""
    out = {}
    for name, p in model.vision_tower.named_parameters():
        if not any(part in name for part in VIT_FROZEN_NAME_PARTS):
            out[f"vision_tower.{name}"] = p
    norm_params = {id(p) for m in model.vision_tower.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    stray = [n for n, p in out.items() if id(p) not in norm_params]
    if stray:  # a vision tower with other parameter names: refuse rather than train the wrong thing
        raise ConfigError(f"the ViT-LayerNorm rule selected non-LayerNorm parameters {stray[:4]}")
    return out


def quantize_llm_nf4(llm: nn.Module, modules: Sequence[str] = QWEN2_LINEARS,
                     compute_dtype: torch.dtype = torch.float32) -> int:
    """Replace the decoder linears named ``modules`` by bitsandbytes NF4 ``Linear4bit`` (frozen, in place).

    The embeddings, the LM head and the norms stay in their dtype (as transformers' bnb integration does).
    Returns the number of replaced layers."""
    bnb = _require("bitsandbytes", "NF4 base weights for QLoRA")
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model
    replaced = 0
    for parent in list(decoder.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name not in modules or type(child) is not nn.Linear:
                continue
            device = child.weight.device if child.weight.device.type != "meta" else torch.device("cpu")
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
                                         quant_type="nf4", compress_statistics=False).to(device)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.detach().to(compute_dtype).clone(), requires_grad=False)
            setattr(parent, child_name, q)
            replaced += 1
    if not replaced:
        raise ConfigError(f"no nn.Linear named {list(modules)} in the LLM decoder to quantize")
    return replaced


def _lora_config(config: FinetuneConfig):
    peft = _require("peft", "LoRA / QLoRA fine-tuning")
    return peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                           target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")


def prepare_model(model: NVILAModel, config: FinetuneConfig) -> dict[str, list[nn.Parameter]]:
    """Freeze ``model``, quantize the LLM (QLoRA), wrap it with LoRA, unfreeze the ViT LayerNorms (and the
    projector when asked). Returns the trainable parameters per part: ``llm_lora``, ``vision_layernorm``,
    ``projector`` (the optimizer groups)."""
    peft = _require("peft", "LoRA / QLoRA fine-tuning")
    config.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    if config.mode == "qlora":  # NF4 matmuls in the model's dtype (bf16 on a GPU), as the estimate assumes
        quantize_llm_nf4(model.llm, QWEN2_LINEARS, compute_dtype=model.dtype)
    model.llm = peft.get_peft_model(model.llm, _lora_config(config))
    groups: dict[str, list[nn.Parameter]] = {
        "llm_lora": [p for n, p in model.llm.named_parameters() if "lora_" in n],
        "vision_layernorm": list(vit_layernorm_parameters(model).values()),
        "projector": list(model.mm_projector.parameters()) if config.train_projector else [],
    }
    for ps in groups.values():
        for p in ps:
            p.requires_grad_(True)
    if not groups["llm_lora"]:
        raise ConfigError(f"LoRA found no target modules {list(config.target_modules)} in the LLM")
    return groups


def param_groups(groups: dict[str, list[nn.Parameter]], config: FinetuneConfig) -> list[dict]:
    """Optimizer parameter groups: LLM LoRA at ``learning_rate``, ViT LayerNorm at ``learning_rate /
    vit_lr_ratio``, projector at ``projector_lr``. Each group carries its part name under ``"name"``."""
    lrs = {"llm_lora": config.learning_rate, "vision_layernorm": config.vit_lr,
           "projector": config.projector_learning_rate}
    return [{"params": ps, "lr": lrs[name], "weight_decay": config.weight_decay, "name": name}
            for name, ps in groups.items() if ps]


def set_gradient_checkpointing(model: NVILAModel, enabled: bool) -> None:
    """Per-layer (non-reentrant) activation checkpointing of the LLM and the vision tower, on or off."""
    for part in (model.llm, model.vision_tower):
        if enabled:
            if hasattr(part, "activation_checkpointing_enable"):  # transformers >= 5.x name
                part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(part, "activation_checkpointing_disable"):
            part.activation_checkpointing_disable()
        else:
            part.gradient_checkpointing_disable()


def _versions() -> dict:
    from nvila_edge.resources import package_versions

    return package_versions(("nvila-edge", "torch", "transformers", "peft", "bitsandbytes"))


def _trained_tensors(model: NVILAModel, groups: dict[str, list[nn.Parameter]]) -> dict[str, torch.Tensor]:
    wanted = {id(p) for name in ("vision_layernorm", "projector") for p in groups[name]}
    return {k: p.detach().to("cpu").clone().contiguous()
            for k, p in model.named_parameters() if id(p) in wanted}


# ---- fine-tune ---------------------------------------------------------------------------------------------
def _answer_tokens(processor: NVILAProcessor, conversations) -> int:
    """Supervised tokens of an example: each assistant turn's text and its ``<|im_end|>`` (the processor's
    labels), from the text alone."""
    from nvila_edge.chat import normalize_conversation

    enc = processor.tokenizer.encode
    return sum(len(enc(m.content)) + len(enc("<|im_end|>")) for m in normalize_conversation(conversations)
               if m.role == "assistant")


def check_examples(records: Sequence, processor: NVILAProcessor, on_error: str = "skip",
                   issues: list[DataIssue] | None = None) -> tuple[list, list[int], list[int]]:
    """The records that train something, with their media-expanded lengths and answer tokens (from the text
    and the image headers: no pixels decoded). A record with no answer token, or too long for the model's
    context (the processor refuses it whole: none of its answer would train), is an issue: skipped
    (``on_error="skip"``, reported in ``issues``) or a ``DataError`` (``"raise"``); a data set left with no
    answer token at all is a ``DataError`` naming its lines."""
    from .data import DataError

    limit = processor.config.llm.context_length
    lengths = NVILADataset(records, processor).lengths()
    kept, kept_lengths, kept_answers, bad = [], [], [], []
    for r, n in zip(records, lengths):
        answers = _answer_tokens(processor, r.conversations)
        reason = None
        if answers == 0:
            reason = "no answer tokens (no assistant turn): nothing to train on"
        elif n >= limit:
            reason = f"{n} tokens (text + visual) do not fit the context of {limit}: no answer token would train"
        if reason is None:
            kept.append(r)
            kept_lengths.append(n)
            kept_answers.append(answers)
            continue
        issue = DataIssue(r.source, r.line, reason)
        if on_error == "raise":
            raise DataError(str(issue))
        log.warning("skipping %s", issue)
        bad.append(issue)
    if issues is not None:
        issues.extend(bad)
    if not kept:
        lines = ", ".join(f"{i.file}:{i.line}" for i in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DataError(f"the fine-tune data has no answer tokens to train on ({lines}): {bad[0].reason}")
    return kept, kept_lengths, kept_answers


def _finetune_trainer(**kwargs):
    """A transformers ``Trainer`` that counts the answer tokens of every accumulated micro-batch: our collator
    keeps labels as a list of 1-D tensors, which ``Trainer`` cannot count, and with the count the model's
    loss (sum / count, ``NVILAModel.lm_loss``) of ``batch_size / micro_batch_size`` micro-batches adds up to
    the effective batch's mean."""
    from torch.nn.utils.rnn import pad_sequence
    from transformers import Trainer

    class FinetuneTrainer(Trainer):
        def _get_num_items_in_batch(self, batch_samples, device):
            # counted as ``shift_labels`` (what transformers takes as already shifted), whatever it assumes of
            # the model's loss; the batches the model sees are not changed
            shifted = [{**b, "shift_labels": pad_sequence([torch.as_tensor(x)[1:] for x in b["labels"]],
                                                          batch_first=True, padding_value=-100)}
                       if isinstance(b.get("labels"), (list, tuple)) else b for b in batch_samples]
            return super()._get_num_items_in_batch(shifted, device)

    return FinetuneTrainer(**kwargs)


def finetune(checkpoint: str | Path, data: str | Path | Sequence[str | Path], output_dir: str | Path,
             config: FinetuneConfig | None = None, on_error: str = "skip", progress: bool = True,
             memory_limit: int | None = None) -> FinetuneResult:
    """Fine-tune the checkpoint on LLaVA-style JSONL ``data`` and write the fine-tune directory atomically.

    Before any weight is loaded: the records are checked (``check_examples``) and the run's memory is
    estimated (``memory.estimate_for_finetune``: the micro-batch, the longest example, its answer tokens);
    a run that would not fit ``memory_limit`` bytes (default: the GPU's free memory, or the available RAM on
    a CPU) raises ``ResourceLimitError`` with the estimate table and a flag that makes it fit.
    On a GPU the model loads in its ``model_dtype`` (bf16), on a CPU in fp32.

    Returns a ``FinetuneResult`` whose ``model`` is the trained model (LoRA still unmerged, eval mode)."""
    from .memory import available_memory, require_fit

    config = config or FinetuneConfig()
    config.validate()
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    issues: list[DataIssue] = []
    records = read_jsonl(data, on_error=on_error, issues=issues)
    processor = NVILAProcessor.from_pretrained(checkpoint)
    base_config = processor.config
    processor = NVILAProcessor(tile_capped_config(base_config, config.max_tiles), processor.tokenizer)
    records, lengths, answers = check_examples(records, processor, on_error, issues)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    limit = available_memory(device) if memory_limit is None else int(memory_limit)
    estimate = require_fit(base_config, config, limit, device=device, seq_len=max(lengths), answer_tokens=max(answers))
    log.info("fine-tune memory estimate (limit %.2f GB):\n%s", limit / 1e9, estimate.table())
    dtype = getattr(torch, base_config.model_dtype) if device == "cuda" else torch.float32
    model = NVILAModel.from_pretrained(checkpoint, dtype=dtype)
    from transformers import set_seed

    set_seed(config.seed)
    groups = prepare_model(model, config)
    trainable = {name: sum(p.numel() for p in ps) for name, ps in groups.items()}
    optimizer = torch.optim.AdamW(param_groups(groups, config))
    if config.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    scratch = output_dir.parent / f".{output_dir.name}.trainer"
    args = training_arguments(scratch, batch_size=config.micro_batch_size, learning_rate=config.learning_rate,
                              epochs=config.epochs, max_steps=config.max_steps, warmup_ratio=config.warmup_ratio,
                              weight_decay=config.weight_decay, scheduler=config.scheduler, seed=config.seed,
                              progress=progress, logging_steps=1,
                              gradient_accumulation_steps=config.gradient_accumulation_steps)
    model.train()
    trainer = _finetune_trainer(model=model, args=args, train_dataset=NVILADataset(records, processor),
                                data_collator=NVILACollator(), optimizers=(optimizer, None))
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # no per-step log lines either
    try:
        result = trainer.train()
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    if config.gradient_checkpointing:
        set_gradient_checkpointing(model, False)
    model.eval()
    metrics = {**result.metrics, "examples": len(records), "steps": trainer.state.global_step,
               "micro_batch_size": config.micro_batch_size,
               "gradient_accumulation_steps": config.gradient_accumulation_steps,
               "memory_estimate_bytes": estimate.total_bytes,
               "loss_history": [h["loss"] for h in trainer.state.log_history if "loss" in h],
               "learning_rates": {g["name"]: g["initial_lr"] if "initial_lr" in g else g["lr"] for g in optimizer.param_groups}}
    _save(model, groups, config, checkpoint, output_dir, metrics, trainable, records, issues)
    for p in model.parameters():
        p.requires_grad_(False)
    return FinetuneResult(output_dir, metrics, trainable, model)


def _save(model, groups, config, checkpoint, output_dir, metrics, trainable, records, issues) -> None:
    from safetensors.torch import save_file

    info = {
        "format": "nvila-edge-finetune/1",
        "config": config.to_dict(),
        "base_checkpoint": str(checkpoint.resolve()),
        "base_config": model.config.to_dict(),
        "metrics": metrics,
        "trainable_parameters": trainable,
        "data": sorted({r.source for r in records}),
        "data_issues": [str(i) for i in issues],
        "versions": _versions(),
    }
    with atomic_directory(output_dir) as tmp:
        model.llm.save_pretrained(str(tmp / ADAPTER_DIR), save_embedding_layers=False)
        save_file(_trained_tensors(model, groups), str(tmp / DELTAS_FILE), metadata={"format": "pt"})
        (tmp / FINETUNE_FILE).write_text(json.dumps(info, indent=2))


# ---- reading a fine-tune directory -------------------------------------------------------------------------
def read_finetune_info(finetune_dir: str | Path) -> dict:
    """``finetune.json`` of a fine-tune directory, after checking the directory is complete."""
    d = Path(finetune_dir)
    if not d.is_dir():
        raise CheckpointError(f"fine-tune directory not found: {d}")
    needed = [d / FINETUNE_FILE, d / ADAPTER_DIR / "adapter_config.json", d / ADAPTER_DIR / "adapter_model.safetensors",
              d / DELTAS_FILE]
    missing = [str(p.relative_to(d)) for p in needed if not p.is_file()]
    if missing:
        raise CheckpointError(f"{d} is not a complete fine-tune directory (made by nvila_edge.training.finetune): "
                              f"missing {missing}")
    try:
        return json.loads((d / FINETUNE_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / FINETUNE_FILE} is not valid JSON: {e}") from e


def _architecture(cfg: dict) -> dict:
    """The fields of an ``NVILAConfig.to_dict()`` that decide weight shapes, flattened (``llm.hidden_size``)."""
    pre = cfg.get("preprocessing", {})
    out = {f"vision.{k}": cfg["vision"].get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                        "num_attention_heads", "patch_size", "image_size")}
    out.update({f"llm.{k}": cfg["llm"].get(k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                       "num_hidden_layers", "num_attention_heads",
                                                       "num_key_value_heads", "tie_word_embeddings")})
    out["projector.type"] = cfg["projector"].get("type")
    scales = len(pre.get("s2_scales", ())) if pre.get("image_aspect_ratio") == "dynamic_s2" else 1
    out["mm_hidden_size"] = cfg["vision"].get("hidden_size", 0) * scales
    return out


def _check_same_base(info: dict, base: NVILAConfig, finetune_dir: Path, base_path: Path) -> None:
    if not isinstance(info.get("base_config"), dict):
        raise CheckpointError(f"{finetune_dir / FINETUNE_FILE} has no base_config")
    try:
        want = _architecture(info["base_config"])
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{finetune_dir / FINETUNE_FILE}: malformed base_config ({e})") from e
    have = _architecture(base.to_dict())
    diffs = [f"{k}: {want[k]} (fine-tune) vs {have[k]} (base)" for k in want if want[k] != have[k]]
    if diffs:
        raise CheckpointError(
            f"{finetune_dir} was fine-tuned from a model with a different architecture than {base_path} "
            f"({'; '.join(diffs)}); use the base checkpoint it was made from ({info.get('base_checkpoint')})"
        )


def _load_deltas(model: NVILAModel, finetune_dir: Path) -> None:
    from safetensors.torch import load_file

    path = finetune_dir / DELTAS_FILE
    try:
        deltas = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    params = dict(model.named_parameters())
    for k, v in deltas.items():
        if k not in params:
            raise CheckpointError(f"{path}: tensor {k!r} is not a parameter of this model")
        if tuple(v.shape) != tuple(params[k].shape):
            raise CheckpointError(f"{path}: {k!r} has shape {tuple(v.shape)} but the base model has {tuple(params[k].shape)}")
    with torch.no_grad():
        for k, v in deltas.items():
            params[k].copy_(v.to(params[k].dtype))


def _attach_adapter(llm: nn.Module, adapter_dir: Path):
    peft = _require("peft", "LoRA / QLoRA fine-tuning")
    try:
        return peft.PeftModel.from_pretrained(llm, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:  # size mismatches, bad configs
        raise CheckpointError(f"the LoRA adapter in {adapter_dir} does not fit the base LLM: {e}") from e


def load_finetuned(base_checkpoint: str | Path, finetune_dir: str | Path, quantized: bool | None = None) -> NVILAModel:
    """The fine-tuned model as trained, without merging: base (NF4 when the fine-tune was QLoRA, or when
    ``quantized=True``) + LoRA adapter + ViT/projector tensors. Eval mode, frozen."""
    finetune_dir, base_checkpoint = Path(finetune_dir), Path(base_checkpoint)
    info = read_finetune_info(finetune_dir)
    model = NVILAModel.from_pretrained(base_checkpoint)
    _check_same_base(info, model.config, finetune_dir, base_checkpoint)
    if quantized is None:
        quantized = info.get("config", {}).get("mode") == "qlora"
    if quantized:
        quantize_llm_nf4(model.llm, QWEN2_LINEARS)
    model.llm = _attach_adapter(model.llm, finetune_dir / ADAPTER_DIR)
    _load_deltas(model, finetune_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def merge(base_checkpoint: str | Path, finetune_dir: str | Path, output_dir: str | Path,
          dtype: str | torch.dtype | None = None) -> Path:
    """Fold a fine-tune into a plain checkpoint: the full-precision base + LoRA merged into the LLM weights
    (``merge_and_unload``) + the trained ViT / projector tensors, saved in the VILA layout with the base's
    tokenizer (atomically). ``dtype`` of the saved weights: default the base config's ``model_dtype``.

    A QLoRA adapter was trained against the NF4-rounded base; merged into the full-precision weights, the
    result differs from the trained model by that rounding (usually the same greedy answers)."""
    finetune_dir, base_checkpoint, output_dir = Path(finetune_dir), Path(base_checkpoint), Path(output_dir)
    info = read_finetune_info(finetune_dir)
    model = NVILAModel.from_pretrained(base_checkpoint, dtype=torch.float32)
    _check_same_base(info, model.config, finetune_dir, base_checkpoint)
    peft_model = _attach_adapter(model.llm, finetune_dir / ADAPTER_DIR)
    model.llm = peft_model.merge_and_unload()
    _load_deltas(model, finetune_dir)
    if dtype is None:
        dtype = getattr(torch, model.config.model_dtype, torch.float32)
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    model.to(dtype)
    merged_info = {k: info[k] for k in ("config", "base_checkpoint", "metrics", "versions") if k in info}
    merged_info["finetune_dir"] = str(finetune_dir.resolve())
    model.save_pretrained(output_dir, tokenizer=model.tokenizer,
                          extra_files={FINETUNE_FILE: json.dumps(merged_info, indent=2)})
    return output_dir
