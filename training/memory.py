"""Fine-tuning memory: an analytic estimate from the config (the measurement that checks it against one
real training step is ``memory_measure.py``).

``estimate_finetune_memory`` answers "does LoRA / QLoRA + ViT-LayerNorm fine-tuning of this model fit my
GPU?" without building the model.

The estimate counts what PyTorch keeps for backward in the transformers implementations this package
uses (Qwen2 decoder, SigLIP encoder, peft LoRA, bitsandbytes NF4, the answer-only chunked LM loss of
``nvila_edge.modeling.loss``), assuming a memory-efficient attention kernel (flash / efficient SDPA, no L×L
matrix) and no padding (batch of equal lengths, or batch 1). ``estimate_for_finetune`` maps a
``FinetuneConfig`` to the step the run makes (its micro-batch); ``require_fit`` refuses a run before any
weight is loaded when that estimate exceeds the device's memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nvila_edge.config import NVILAConfig
from nvila_edge.errors import ConfigError, ResourceLimitError
from nvila_edge.modeling.loss import CHUNK_TOKENS

from .finetune_config import QWEN2_LINEARS, FinetuneConfig, tile_capped_config

GB = 1e9
_UNITS = {"GB": 1e9, "MB": 1e6, "GiB": 2 ** 30, "MiB": 2 ** 20}
NF4_BLOCK = 64  # bitsandbytes 4-bit block size: one fp32 absmax per 64 weights
OPTIMIZERS = {"adamw": 2.0, "adamw_8bit": 0.5, "sgd": 0.0}  # state bytes per trainable-parameter byte
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ADAPTER_BYTES = 4  # peft keeps LoRA adapters in fp32 (autocast_adapter_dtype) even on a bf16 / NF4 base


@dataclass
class MemoryEstimate:
    """Bytes per part of one fine-tuning step (peak, everything assumed live at once) and the settings."""

    parts: dict[str, int]
    settings: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    def table(self, unit: str = "GB") -> str:
        """The parts as an aligned text table in ``unit`` (GB = 1e9 bytes, MB = 1e6; GiB / MiB)."""
        if unit not in _UNITS:
            raise ConfigError(f"unit must be one of {sorted(_UNITS)}, got {unit!r}")
        div = _UNITS[unit]
        width = max(len(k) for k in [*self.parts, "total"])
        head = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        rule = "-" * (width + 14)
        lines = [head, rule] if head else []
        lines += [f"{k:<{width}}  {v / div:>9.3f} {unit}" for k, v in self.parts.items()]
        lines += [rule, f"{'total':<{width}}  {self.total_bytes / div:>9.3f} {unit}"]
        return "\n".join(lines)


def _dtype_bytes(dtype) -> int:
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_BYTES:
        raise ConfigError(f"unsupported dtype {dtype!r} for the memory estimate; use one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def _max_tiles(config: NVILAConfig) -> int:
    """Tiles of the largest single image: Dynamic-S2 = all smaller scales + max_tiles at the last one;
    dynamic tiling = max_tiles + thumbnail; plain resize = 1."""
    p = config.preprocessing
    if p.image_aspect_ratio == "dynamic_s2":
        return sum((s // p.s2_scales[0]) ** 2 for s in p.s2_scales[:-1]) + p.max_tiles
    if p.image_aspect_ratio == "dynamic":
        return p.max_tiles + (1 if p.max_tiles > 1 else 0)
    return 1


def _visual_tokens(config: NVILAConfig, tiles: int) -> int:
    """LLM tokens of one image cut into ``tiles`` tiles (the largest image for the default)."""
    p = config.preprocessing
    n_end = len(config.end_token_ids)
    tpt = config.tokens_per_tile
    if p.image_aspect_ratio == "dynamic_s2":
        small = sum((s // p.s2_scales[0]) ** 2 for s in p.s2_scales[:-1])
        return tpt * max(tiles - small, 1) + n_end
    return tiles * (tpt + n_end)


def _llm_linear_shapes(config: NVILAConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of the seven Qwen2 linears of one decoder layer."""
    c = config.llm
    head_dim = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    h, i = c.hidden_size, c.intermediate_size
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _vision_params(config: NVILAConfig) -> tuple[int, int]:
    """(all SigLIP parameters, the LayerNorm parameters the fine-tune trains)."""
    v = config.vision
    h, i, n = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
    embed = 3 * v.patch_size ** 2 * h + h + v.grid ** 2 * h
    head = 0
    if v.use_head:  # attention-pooling head: probe, MultiheadAttention, LayerNorm, MLP
        head = h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h)
    ln = n * 4 * h + 2 * h  # layer_norm1/2 per layer + post_layernorm (head.layernorm is frozen: "head")
    return n * layer + embed + 2 * h + head, ln


def _projector_params(config: NVILAConfig) -> int:
    c, h = config.mm_hidden_size, config.llm.hidden_size
    if config.projector.downsample == 2:
        return 2 * 4 * c + (4 * c * h + h) + (h * h + h)
    return 2 * 9 * c + (9 * c * 3 * c + 3 * c) + 2 * 3 * c + (3 * c * h + h) + (h * h + h)


def _lora_saved_per_token(shapes: dict[str, tuple[int, int]], targets, r: int, dropout: float, mask_bytes: int) -> float:
    """Bytes LoRA keeps per token and layer: for each adapted linear its own dropout mask (``mask_bytes`` per
    element: a bool on CUDA, the activation dtype on CPU) and the fp32 dropout output (lora_A's input), plus
    lora_A's output (r, fp32, lora_B's input). Without dropout lora_A keeps its fp32 input once per distinct
    input (q/k/v share one, gate/up share one)."""
    total = 0.0
    for name in targets:
        d_in = shapes[name][0]
        total += r * _ADAPTER_BYTES
        if dropout > 0:
            total += d_in * (mask_bytes + _ADAPTER_BYTES)
    if dropout == 0:
        groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
        for g in groups:
            if any(n in targets for n in g):
                # fp32 model: the input itself (not otherwise kept); bf16 model: its fp32 cast
                total += shapes[g[0]][0] * _ADAPTER_BYTES
    return total


def llm_layer_activation_bytes(config: NVILAConfig, tokens: int, r: int, dropout: float, act: int,
                               targets=QWEN2_LINEARS, device: str = "cuda") -> float:
    """Bytes one Qwen2 decoder layer keeps for backward over ``tokens`` tokens (frozen base, LoRA on
    ``targets``):

    - two RMSNorms: the fp32 (up-cast) input, ``4·H`` + ``4`` (rsqrt) per token each;
    - attention (SDPA, flash / efficient kernel): q, k, v after RoPE and the output, ``(2·H + 2·kv)·act``, plus
      the fp32 log-sum-exp per head;
    - MLP: SiLU input (gate), and both factors of ``silu(gate)·up``: ``3·I·act``;
    - LoRA: see ``_lora_saved_per_token``. The frozen base linears (plain or NF4) keep no input.
    """
    c = config.llm
    head_dim = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    h, i = c.hidden_size, c.intermediate_size
    norms = 2 * (4 * h + 4)
    attn = (2 * h + 2 * kv) * act + 4 * c.num_attention_heads
    mlp = 3 * i * act
    lora = _lora_saved_per_token(_llm_linear_shapes(config), targets, r, dropout, 1 if device == "cuda" else _ADAPTER_BYTES)
    return tokens * (norms + attn + mlp + lora)


def vit_layer_activation_bytes(config: NVILAConfig, tokens: int, act: int) -> float:
    """Bytes one SigLIP encoder layer keeps for backward over ``tokens`` patch tokens when only the
    LayerNorms train (gradients still flow through every layer below the selected one):

    - LayerNorm 1 and 2: input (``2·Hv·act``) + fp32 mean / rstd (16 bytes);
    - attention (SDPA, efficient kernel): q, k, v, output ``4·Hv·act`` + fp32 log-sum-exp per head;
    - MLP: the tanh-GELU input ``Iv·act``. The frozen linears keep no input."""
    v = config.vision
    return tokens * ((2 * v.hidden_size + 4 * v.hidden_size + v.intermediate_size) * act + 16
                     + 4 * v.num_attention_heads)


def _projector_activation_bytes(config: NVILAConfig, n_vis: int, patch_tokens: int, act: int, trained: bool) -> float:
    """What the projector keeps for backward over ``n_vis`` visual tokens: LayerNorm and GELU inputs, the
    linears' inputs when it trains, and for Dynamic-S2 the per-scale maps the area resize keeps."""
    c = config.llm
    cin = config.projector.downsample ** 2 * config.mm_hidden_size  # after space-to-channel
    if config.projector.downsample == 2:  # LayerNorm(4C) → Linear → GELU → Linear
        norm_in, gelu_in, linear_in = (cin,), (c.hidden_size,), (cin, c.hidden_size)
    else:  # LayerNorm(9C) → Linear → GELU → LayerNorm(3C) → Linear → GELU → Linear
        mid = 3 * config.mm_hidden_size
        norm_in, gelu_in, linear_in = (cin, mid), (mid, c.hidden_size), (cin, mid, c.hidden_size)
    out = n_vis * (sum(norm_in) * act + 8 * len(norm_in) + sum(gelu_in) * act)  # LayerNorm + GELU inputs
    if trained:
        out += n_vis * sum(linear_in) * act  # the trained linears keep their (LayerNorm / GELU output) inputs
    if config.preprocessing.image_aspect_ratio == "dynamic_s2":
        out += patch_tokens * config.vision.hidden_size * act  # per-scale maps kept by the area resize
    return out


def _activation_parts(config: NVILAConfig, batch_size: int, tiles: int, seq_len: int, answer_tokens: int, act: int,
                      llm_layer: float, vit_layer: float | None, proj_act: float, gradient_checkpointing: bool,
                      tile_batch_size: int | None, loss_chunk_tokens: int) -> tuple[dict[str, int], str]:
    """The activation parts of a step (``estimate_finetune_memory``'s docstring says what each is) from one LLM
    layer's and one ViT layer's saved bytes (``vit_layer=None``: the tower keeps nothing, it is not in the
    backward) and the projector's; and the phase that makes the peak."""
    c, v = config.llm, config.vision
    L = c.num_hidden_layers
    head_dim = c.hidden_size // c.num_attention_heads
    tokens = batch_size * seq_len
    patch_tokens = batch_size * tiles * v.grid ** 2
    used = v.num_hidden_layers + 1 + v.select_layer if v.select_layer < 0 else v.select_layer
    llm_fixed = tokens * (4 * c.hidden_size + 4) + 2 * tokens * head_dim * 4  # final RMSNorm; RoPE cos/sin (fp32)
    answers = batch_size * answer_tokens
    logits = min(answers, loss_chunk_tokens) * c.vocab_size * 12 + 2 * answers * c.hidden_size * act  # docstring
    parts: dict[str, int] = {}
    if not gradient_checkpointing:
        parts["activations: LLM layers"] = int(L * llm_layer + llm_fixed)
        parts["activations: vision tower"] = int(used * vit_layer if vit_layer is not None else 0)
        parts["activations: projector"] = int(proj_act)
        parts["activations: logits + loss"] = int(logits)
        return parts, "backward start"
    llm_keep = L * tokens * c.hidden_size * act + llm_fixed
    vit_keep = used * patch_tokens * v.hidden_size * act if vit_layer is not None else 0
    # peak phase: start of backward (logits), LLM layer recompute, or ViT layer recompute (by then the
    # LLM checkpoints and the projector's tensors are freed)
    mlp_grads = 3 * tokens * c.intermediate_size * act  # backward temporaries inside the recomputed layer
    phases = {"logits": logits, "LLM layer recompute": llm_layer + mlp_grads}
    if vit_layer is not None:
        # the vision tower runs (and recomputes) tile_batch_size tiles at a time
        if tile_batch_size is None:
            tile_batch_size = max(1, 8192 // v.grid ** 2)
        n_tiles = batch_size * tiles
        chunk = min(n_tiles, tile_batch_size) / n_tiles if n_tiles else 0.0
        phases["ViT layer recompute"] = chunk * (vit_layer + 2 * patch_tokens * v.intermediate_size * act) - llm_keep - proj_act
    peak_phase = max(phases, key=phases.get)
    parts["activations: LLM layer inputs"] = int(llm_keep)
    parts["activations: vision layer inputs"] = int(vit_keep)
    parts["activations: projector"] = int(proj_act)
    parts[f"activations: peak ({peak_phase})"] = int(max(phases.values()))
    return parts, peak_phase


def estimate_finetune_memory(config: NVILAConfig, mode: str = "qlora", r: int = 64, batch_size: int = 1,
                             seq_len: int | None = None, tiles: int | None = None, gradient_checkpointing: bool = True,
                             train_projector: bool = False, optimizer: str = "adamw", dropout: float = 0.05,
                             dtype: str | torch.dtype | None = None, target_modules=QWEN2_LINEARS,
                             device: str = "cuda", tile_batch_size: int | None = None,
                             answer_tokens: int | None = None, loss_chunk_tokens: int = CHUNK_TOKENS) -> MemoryEstimate:
    """Peak memory of one LoRA / QLoRA + ViT-LayerNorm training forward + backward, by part, in bytes.

    Defaults from ``config``: ``tiles`` = the largest image (Dynamic-S2: 1 + 4 + 12 = 17 tiles for
    nvila-8b), ``seq_len`` = its visual tokens + 512 text tokens, ``answer_tokens`` (supervised) = all the
    text tokens (an upper bound); ``dtype`` (weights and activations) = ``config.model_dtype``. ``tiles``,
    ``seq_len`` and ``answer_tokens`` are per example; ``batch_size`` examples per forward (the
    micro-batch: accumulated micro-batches add no activations). ``device`` only changes the LoRA dropout
    masks: a bool per element on CUDA, fp32 on CPU.

    Weights: the LLM's seven linears in NF4 (``mode="qlora"``: 0.5 byte + one fp32 absmax per 64 weights)
    or in ``dtype`` (``"lora"``); embeddings, LM head, norms, biases, vision tower and projector in ``dtype``.
    Trainable: LoRA A/B (``r·(in + out)`` per adapted linear, fp32), the ViT LayerNorms (and the projector
    when ``train_projector``), each with a gradient of its size and optimizer states (AdamW: 2 per
    parameter, ``adamw_8bit``: 2 bytes per parameter, ``sgd``: none).

    Activations (what autograd keeps until backward; see ``llm_layer_activation_bytes`` and
    ``vit_layer_activation_bytes`` for the per-layer terms):

    - without gradient checkpointing: every LLM layer's saved tensors over ``batch·seq_len`` tokens and
      every ViT layer up to the selected one (``select_layer = -2``: all but the last) over
      ``batch·tiles·grid²`` patch tokens;
    - with gradient checkpointing (per decoder / encoder layer, non-reentrant): each layer keeps only its
      input hidden state (``tokens·hidden·act``); on top of those the peak is the largest of three backward
      phases: the start (logits, below), one LLM layer recomputed (its saved tensors + ~3 MLP-sized
      gradient temporaries) or one ViT layer recomputed for one chunk of ``tile_batch_size`` tiles
      (pass ``NVILAModel.tile_batch_size``; default 8192 patch tokens' worth, 8 tiles of 448: the tower runs
      chunk by chunk; saved tensors + ~2 MLP-sized temporaries; by then the LLM checkpoints and the
      projector's tensors are already freed);
    - always: the projector's saved inputs (LayerNorm input, GELU input; plus the linear inputs when it
      trains) and, for Dynamic-S2, the stitched per-scale maps; the final RMSNorm; the RoPE tables;
    - the logits: the LM head runs only on the ``batch·answer_tokens`` supervised positions, gathered
      (``answers·hidden·act``, and their gradient), ``loss_chunk_tokens`` at a time under checkpointing:
      one chunk's logits exist at once, recomputed in backward, where log-softmax's fp32 output, its
      gradient and the input gradient are alive together: ``chunk·vocab·12`` bytes.

    Not counted: allocator caching / fragmentation, kernel workspaces (cuBLAS, attention), CUDA context
    (~0.3–1 GB), transient dequantized NF4 weights (one linear at a time), the data loader.
    """
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if mode not in ("lora", "qlora"):
        raise ConfigError(f"mode must be 'lora' or 'qlora', got {mode!r}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    if r < 1 or batch_size < 1 or loss_chunk_tokens < 1:
        raise ConfigError("r, batch_size and loss_chunk_tokens must be >= 1")
    targets = tuple(target_modules)
    act = _dtype_bytes(dtype or config.model_dtype)
    tiles = _max_tiles(config) if tiles is None else int(tiles)
    vis_tokens = _visual_tokens(config, tiles) if tiles else 0
    seq_len = vis_tokens + 512 if seq_len is None else int(seq_len)
    answer_tokens = max(1, seq_len - vis_tokens) if answer_tokens is None else int(answer_tokens)
    c, v = config.llm, config.vision
    shapes = _llm_linear_shapes(config)
    L = c.num_hidden_layers

    # ---- weights
    linear_params = L * sum(i * o for i, o in shapes.values())
    lin_bytes = linear_params * (0.5 + 4 / NF4_BLOCK) if mode == "qlora" else linear_params * act
    head_dim = c.hidden_size // c.num_attention_heads
    biases = L * (c.hidden_size + 2 * c.num_key_value_heads * head_dim)
    embeds = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    norms = (2 * L + 1) * c.hidden_size
    vit_params, vit_ln = _vision_params(config)
    proj_params = _projector_params(config)
    lora_params = L * sum(r * (shapes[n][0] + shapes[n][1]) for n in targets)

    trainable_bytes = lora_params * _ADAPTER_BYTES + vit_ln * act + (proj_params * act if train_projector else 0)
    parts = {
        "weights: LLM linears (NF4)" if mode == "qlora" else "weights: LLM linears": int(lin_bytes),
        "weights: embeddings + LM head": int(embeds * act),
        "weights: LLM norms + biases": int((biases + norms) * act),
        "weights: vision tower": int(vit_params * act),
        "weights: projector": int(proj_params * act),
        "LoRA parameters (fp32)": int(lora_params * _ADAPTER_BYTES),
        "gradients": int(trainable_bytes),
        "optimizer states": int(trainable_bytes * OPTIMIZERS[optimizer]),
    }

    # ---- activations
    tokens = batch_size * seq_len
    patch_tokens = batch_size * tiles * v.grid ** 2
    llm_layer = llm_layer_activation_bytes(config, tokens, r, dropout, act, targets, device)
    vit_layer = vit_layer_activation_bytes(config, patch_tokens, act)
    proj_act = _projector_activation_bytes(config, batch_size * vis_tokens, patch_tokens, act, train_projector)
    acts, peak_phase = _activation_parts(config, batch_size, tiles, seq_len, answer_tokens, act, llm_layer, vit_layer,
                                         proj_act, gradient_checkpointing, tile_batch_size, loss_chunk_tokens)
    parts.update(acts)
    # the batch: fp32 tile pixels, int64 ids and labels
    parts["inputs"] = int(batch_size * (tiles * 3 * v.image_size ** 2 * 4 + 2 * 8 * seq_len))

    settings = {"model": config.name, "mode": mode, "r": r, "batch": batch_size, "seq_len": seq_len,
                "answer_tokens": answer_tokens, "tiles": tiles,
                "grad_ckpt": gradient_checkpointing, "train_projector": train_projector, "optimizer": optimizer,
                "dtype": str(dtype or config.model_dtype).replace("torch.", ""), "device": device,
                "peak_phase": peak_phase}
    return MemoryEstimate(parts, settings)


def estimate_for_finetune(config: NVILAConfig, ft: FinetuneConfig, seq_len: int | None = None,
                          answer_tokens: int | None = None, tiles: int | None = None, device: str = "cuda",
                          tile_batch_size: int | None = None) -> MemoryEstimate:
    """The estimate of the step ``finetune(config=ft)`` makes on ``device``: ``ft.micro_batch_size``
    examples per forward, images capped at ``ft.max_tiles``, weights in ``config.model_dtype`` on CUDA and
    fp32 on the CPU (as ``finetune`` loads them). ``seq_len`` / ``answer_tokens``: the longest example's
    (``finetune`` passes its data's), default the model's largest image + 512 text tokens, all supervised."""
    capped = tile_capped_config(config, ft.max_tiles)
    est = estimate_finetune_memory(capped, mode=ft.mode, r=ft.r, batch_size=ft.micro_batch_size, seq_len=seq_len,
                                   tiles=tiles, gradient_checkpointing=ft.gradient_checkpointing,
                                   train_projector=ft.train_projector, dropout=ft.dropout,
                                   dtype=config.model_dtype if device == "cuda" else "float32",
                                   target_modules=ft.target_modules, device=device, tile_batch_size=tile_batch_size,
                                   answer_tokens=answer_tokens)
    rest = {k: v for k, v in est.settings.items() if k not in ("model", "mode", "r", "batch")}
    est.settings = {"model": config.name, "mode": ft.mode, "r": ft.r, "batch": ft.batch_size,
                    "micro_batch": ft.micro_batch_size, "grad_accum": ft.gradient_accumulation_steps, **rest}
    return est


def available_memory(device: str = "cuda") -> int:
    """Bytes a fine-tune may use: the GPU's free memory (``torch.cuda.mem_get_info``), or the available RAM."""
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _fixes(config: NVILAConfig, ft: FinetuneConfig):
    """(flag, changed config, visual tokens it removes per example) for each single change that lowers the
    estimate, cheapest in quality first."""
    import dataclasses

    if ft.micro_batch_size > 1:
        yield "--micro-batch-size 1", dataclasses.replace(ft, micro_batch_size=1), 0
    if not ft.gradient_checkpointing:
        yield "gradient checkpointing (drop --no-gradient-checkpointing)", dataclasses.replace(ft, gradient_checkpointing=True), 0
    if ft.mode == "lora":
        yield "--mode qlora", dataclasses.replace(ft, mode="qlora"), 0
    now = tile_capped_config(config, ft.max_tiles)
    tiles = _max_tiles(now)
    for n in range(tiles - 1, 0, -1):
        try:
            capped = tile_capped_config(config, n)
        except ConfigError:  # below the least Dynamic-S2 takes
            break
        if _max_tiles(capped) < tiles:
            fewer = _visual_tokens(now, tiles) - _visual_tokens(capped, _max_tiles(capped))
            yield f"--max-tiles {n}", dataclasses.replace(ft, max_tiles=n), fewer
    r = ft.r // 2
    while r >= 4:
        yield f"--r {r}", dataclasses.replace(ft, r=r), 0
        r //= 2


def require_fit(config: NVILAConfig, ft: FinetuneConfig, limit: int, device: str = "cuda",
                seq_len: int | None = None, answer_tokens: int | None = None) -> MemoryEstimate:
    """``estimate_for_finetune``, or ``ResourceLimitError`` when its total exceeds ``limit`` bytes: the message
    holds the estimate table and the first single flag (micro-batch, checkpointing, QLoRA, the largest
    ``--max-tiles``, a smaller ``--r``) whose estimate fits."""
    est = estimate_for_finetune(config, ft, seq_len, answer_tokens, device=device)
    if est.total_bytes <= limit:
        return est
    where = "free on the GPU" if device == "cuda" else "of available RAM"
    advice = "no single flag makes it fit: use a GPU with more memory, or combine --max-tiles, --r and --mode qlora"
    for flag, changed, fewer in _fixes(config, ft):
        trial = estimate_for_finetune(config, changed, None if seq_len is None else max(1, seq_len - fewer),
                                      answer_tokens, device=device)
        if trial.total_bytes <= limit:
            advice = f"{flag} would make it fit (estimate {trial.total_gb:.2f} GB)"
            break
    raise ResourceLimitError(f"this fine-tune needs an estimated {est.total_gb:.2f} GB but {limit / GB:.2f} GB are "
                             f"{where}; {advice}. Nothing was loaded.\n{est.table()}")


# ---- full training (the recipe's stages) under DDP or FSDP -----------------------------------------------------------
FSDP_MODES = ("no", "full_shard", "shard_grad_op")


def _llm_params(config: NVILAConfig) -> tuple[int, int]:
    """(all Qwen2 parameters, those of its largest decoder layer)."""
    c = config.llm
    L = c.num_hidden_layers
    shapes = _llm_linear_shapes(config)
    head_dim = c.hidden_size // c.num_attention_heads
    layer = sum(i * o for i, o in shapes.values()) + c.hidden_size + 2 * c.num_key_value_heads * head_dim + 2 * c.hidden_size
    embeds = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return L * layer + embeds + c.hidden_size, layer


def estimate_training_memory(config: NVILAConfig, trains, batch_size: int = 1, world: int = 1, fsdp: str = "no",
                             seq_len: int | None = None, tiles: int | None = None, answer_tokens: int | None = None,
                             gradient_checkpointing: bool = False, device: str = "cuda", optimizer: str = "adamw",
                             tile_batch_size: int | None = None,
                             loss_chunk_tokens: int = CHUNK_TOKENS) -> MemoryEstimate:
    """Per-rank peak memory of one full-training step of a recipe stage (``trains``: the modules it trains) with
    ``batch_size`` examples on each rank, under DDP (``fsdp="no"``: every rank holds everything) or FSDP over
    ``world`` ranks (training/fsdp.py), by part, in bytes.

    Weights stay fp32 (the trainer loads them so; on a bf16 GPU the forward runs in bf16: DDP by autocast,
    FSDP by gathering bf16 copies): 4 bytes a parameter, a gradient of 4 and AdamW's two fp32 states per
    trainable parameter (16 bytes a parameter in all). FSDP divides all of it by ``world`` and adds what a
    step gathers: ``full_shard`` the root unit (embeddings, LM head, projector, norms) and two decoder layers
    (the one running and the next), ``shard_grad_op`` every unit from its forward to its backward, and the
    unsharded gradient of one layer before its reduce-scatter.

    Activations: as ``estimate_finetune_memory`` counts them (same per-layer terms, no LoRA), plus the inputs
    the trained linears keep (Qwen2: the two normalised inputs and the MLP product, ``(2·H + I)·act`` a token;
    SigLIP: ``(2·Hv + Iv)·act``). The tower keeps activations only when it trains, the projector when it or
    the tower trains; the LLM always (the loss flows back through it). Same defaults (``tiles``, ``seq_len``,
    ``answer_tokens``) and same exclusions (allocator caching, workspaces, CUDA context, data loader)."""
    if fsdp not in FSDP_MODES:
        raise ConfigError(f"fsdp must be one of {FSDP_MODES}, got {fsdp!r}")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    if batch_size < 1 or world < 1:
        raise ConfigError(f"batch_size and world must be >= 1, got {batch_size} and {world}")
    trains = tuple(trains)
    bf16 = device == "cuda" and config.model_dtype == "bfloat16"
    act = 2 if bf16 else 4
    tiles = _max_tiles(config) if tiles is None else int(tiles)
    vis_tokens = _visual_tokens(config, tiles) if tiles else 0
    seq_len = vis_tokens + 512 if seq_len is None else int(seq_len)
    answer_tokens = max(1, seq_len - vis_tokens) if answer_tokens is None else int(answer_tokens)
    c, v = config.llm, config.vision

    llm_all, llm_layer_params = _llm_params(config)
    vit_all, _ = _vision_params(config)
    proj = _projector_params(config)
    sizes = {"llm": llm_all, "vision_tower": vit_all, "mm_projector": proj}
    total = sum(sizes.values())
    trainable = sum(sizes[m] for m in trains)
    shards = world if fsdp != "no" else 1
    parts = {
        "weights (fp32)": int(total * 4 / shards),
        "gradients (fp32)": int(trainable * 4 / shards),
        "optimizer states": int(trainable * 4 * OPTIMIZERS[optimizer] / shards),
    }
    if fsdp != "no":
        gather = 2 if bf16 else 4
        vit_layer_params = (v.num_hidden_layers and (vit_all - 3 * v.patch_size ** 2 * v.hidden_size) // v.num_hidden_layers)
        unit = max(llm_layer_params, vit_layer_params)
        embeds = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        root = embeds + proj + c.hidden_size
        gathered = root + (2 * unit if fsdp == "full_shard" else total - root)
        parts["FSDP gathered weights"] = int(gathered * gather * (world - 1) / world)
        if trainable:
            parts["FSDP unsharded layer gradient"] = int(unit * gather)

    tokens = batch_size * seq_len
    patch_tokens = batch_size * tiles * v.grid ** 2
    llm_layer = llm_layer_activation_bytes(config, tokens, 1, 0.0, act, (), device)
    if "llm" in trains:  # the trained linears keep their inputs: two normalised hidden states, the MLP product
        llm_layer += tokens * (2 * c.hidden_size + c.intermediate_size) * act
    vision_trains = "vision_tower" in trains
    vit_layer = None
    if vision_trains:
        vit_layer = vit_layer_activation_bytes(config, patch_tokens, act) + patch_tokens * (2 * v.hidden_size + v.intermediate_size) * act
    proj_act = 0.0
    if vision_trains or "mm_projector" in trains:
        proj_act = _projector_activation_bytes(config, batch_size * vis_tokens, patch_tokens, act, "mm_projector" in trains)
    acts, _ = _activation_parts(config, batch_size, tiles, seq_len, answer_tokens, act, llm_layer, vit_layer, proj_act,
                                gradient_checkpointing, tile_batch_size, loss_chunk_tokens)
    parts.update(acts)
    parts["inputs"] = int(batch_size * (tiles * 3 * v.image_size ** 2 * 4 + 2 * 8 * seq_len))
    settings = {"model": config.name, "trains": "+".join(trains), "fsdp": fsdp, "world": world,
                "batch_per_rank": batch_size, "seq_len": seq_len, "tiles": tiles, "grad_ckpt": gradient_checkpointing,
                "device": device}
    return MemoryEstimate(parts, settings)


_MODE_NAMES = {"no": "DDP", "full_shard": "FSDP full_shard", "shard_grad_op": "FSDP shard_grad_op"}


def stage_estimates(config: NVILAConfig, recipe, gpus: int, stage: int | None = None,
                    device: str = "cuda") -> list[tuple[int, object, dict[str, MemoryEstimate]]]:
    """For each stage of ``recipe`` (or stage number ``stage``, 1-based): its per-GPU estimate under DDP (the
    stage's ``batch_size`` on every GPU, as the Trainer runs it) and under both FSDP modes at ``gpus`` GPUs
    (the global ``batch_size`` split over them, as training/fsdp.py runs it)."""
    n = len(recipe.stages)
    if stage is not None and not 1 <= stage <= n:
        raise ConfigError(f"--stage must be 1..{n} (recipe {recipe.name!r}: "
                          f"{', '.join(f'{i + 1}={s.name}' for i, s in enumerate(recipe.stages))}), got {stage}")
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    out = []
    for i, s in enumerate(recipe.stages):
        if stage is not None and i + 1 != stage:
            continue
        ests = {}
        for mode in FSDP_MODES:
            batch = s.batch_size if mode == "no" else max(1, math.ceil(s.batch_size / gpus))
            ests[mode] = estimate_training_memory(config, s.trains, batch_size=batch, world=gpus, fsdp=mode,
                                                  gradient_checkpointing=recipe.gradient_checkpointing, device=device)
        out.append((i + 1, s, ests))
    return out


def estimate_report(config: NVILAConfig, recipe, gpus: int, gpu_mem_gb: float = 80.0, stage: int | None = None,
                    device: str = "cuda") -> str:
    """``nvila-edge train --estimate``: per stage, each engine's per-GPU memory and whether it fits."""
    lines = [f"model={config.name}, gpus={gpus}, gpu_mem={gpu_mem_gb:g} GB, grad_ckpt={recipe.gradient_checkpointing}, "
             f"device={device} (GB per GPU; FSDP splits the stage's batch_size over the GPUs, DDP runs it on each)"]
    head = f"{'':20s} {'batch':>5s} {'weights+grads+optim':>19s} {'gathered':>9s} {'activations':>11s} {'total':>8s}"
    for number, s, ests in stage_estimates(config, recipe, gpus, stage, device):
        lines += ["", f"stage {number} {s.name} (trains {'+'.join(s.trains)}, batch_size {s.batch_size})", head]
        for mode, est in ests.items():
            p = est.parts
            state = sum(v for k, v in p.items() if k.startswith(("weights", "gradients", "optimizer")))
            gathered = sum(v for k, v in p.items() if k.startswith("FSDP"))
            acts = est.total_bytes - state - gathered
            fits = "fits" if est.total_bytes <= gpu_mem_gb * GB else "does not fit"
            lines.append(f"{_MODE_NAMES[mode]:20s} {est.settings['batch_per_rank']:>5d} {state / GB:>19.2f} "
                         f"{gathered / GB:>9.2f} {acts / GB:>11.2f} {est.total_gb:>8.2f}  {fits}")
    return "\n".join(lines)
