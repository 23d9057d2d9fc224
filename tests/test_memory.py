"""Fine-tuning memory: the analytic estimate (nvila-8b QLoRA + ViT-LN fits 24 GB; its weight counts equal the
real modules') and its agreement with a measured training step on small models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nvila_edge import NVILAConfig, NVILAModel, NVILAProcessor
from nvila_edge.errors import ConfigError
from nvila_edge.training.memory import MemoryEstimate, estimate_finetune_memory

from conftest import make_model

pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run faster on one thread


def test_nvila_8b_qlora_vit_ln_fits_24gb():
    config = NVILAConfig.from_preset("nvila-8b")
    est = estimate_finetune_memory(config)
    assert isinstance(est, MemoryEstimate)
    assert est.settings["tiles"] == 1 + 4 + 12 and est.settings["seq_len"] == 12 * 256 + 1 + 512
    assert 10e9 < est.total_bytes < 24e9  # the paper reports ~10-20 GB
    text = est.table()
    assert "weights: LLM linears (NF4)" in text and text.splitlines()[-1].startswith("total")
    assert f"{est.total_bytes / 1e9:.3f} GB" in text
    # LoRA r=64 on all seven linears of 28 layers, fp32
    assert est.parts["LoRA parameters (fp32)"] == 28 * 64 * (2 * 3584 + 2 * (3584 + 512) + 2 * 3584 + 3 * (3584 + 18944)) * 4
    # the knobs move the total the right way
    assert estimate_finetune_memory(config, mode="lora").total_bytes > est.total_bytes
    assert estimate_finetune_memory(config, gradient_checkpointing=False).total_bytes > est.total_bytes
    assert estimate_finetune_memory(config, batch_size=2).total_bytes > est.total_bytes
    assert estimate_finetune_memory(config, train_projector=True).total_bytes > est.total_bytes
    assert estimate_finetune_memory(config, r=16).total_bytes < est.total_bytes


@pytest.mark.parametrize("preset", ["nvila-8b", "nvila-lite-2b", "tiny"])
def test_weight_parts_count_the_real_modules(preset):
    config = NVILAConfig.from_preset(preset)
    with torch.device("meta"):
        model = NVILAModel(config)
    act = 2 if config.model_dtype == "bfloat16" else 4
    params = {id(p): p for p in model.parameters()}  # tied embeddings count once
    est = estimate_finetune_memory(config, mode="lora")
    weights = sum(v for k, v in est.parts.items() if k.startswith("weights"))
    assert weights == sum(p.numel() for p in params.values()) * act
    assert est.parts["weights: vision tower"] == sum(p.numel() for p in model.vision_tower.parameters()) * act
    assert est.parts["weights: projector"] == sum(p.numel() for p in model.mm_projector.parameters()) * act


def test_bad_arguments():
    config = NVILAConfig.from_preset("tiny")
    for kw in ({"mode": "full"}, {"optimizer": "lion"}, {"r": 0}, {"device": "tpu"}, {"dtype": "int8"}):
        with pytest.raises(ConfigError):
            estimate_finetune_memory(config, **kw)
    with pytest.raises(ConfigError):
        estimate_finetune_memory(config).table(unit="KB")


# ---- estimate vs measurement ----------------------------------------------------------------------------------
def _batch(config, tokenizer, batch_size, size):
    from nvila_edge.training.data import NVILACollator

    proc = NVILAProcessor(config, tokenizer)
    rng = np.random.default_rng(0)
    conv = [{"from": "human", "value": "<image>\nwhat color is the circle?"}, {"from": "gpt", "value": "red, on the left"}]
    examples = [proc(conv, images=[rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)],
                     add_generation_prompt=False, return_labels=True) for _ in range(batch_size)]
    return NVILACollator()(examples)


@pytest.mark.parametrize("preset,mode,ckpt,batch_size,dropout,train_projector", [
    ("tiny", "lora", False, 1, 0.05, False),  # 17 tiles of 448: the vision tower dominates
    ("tiny", "qlora", True, 1, 0.05, False),  # peak: an LLM layer's recompute
    ("tiny-lite", "lora", True, 1, 0.05, True),  # peak: a ViT layer's recompute; 3x3 projector trained
    ("demo", "lora", False, 2, 0.05, False),
    ("demo", "lora", True, 1, 0.0, True),
    ("demo", "qlora", False, 2, 0.05, False),
    ("demo", "qlora", True, 2, 0.05, False),
])
def test_estimate_matches_measured_peak(preset, mode, ckpt, batch_size, dropout, train_projector, tokenizer):
    from nvila_edge.training.finetune import FinetuneConfig, param_groups, prepare_model, set_gradient_checkpointing
    from nvila_edge.training.memory import estimate_for_batch, measure_finetune_peak

    config = NVILAConfig.from_preset(preset)
    model = make_model(config)
    cfg = FinetuneConfig(mode=mode, r=8, dropout=dropout, train_projector=train_projector)
    optimizer = torch.optim.AdamW(param_groups(prepare_model(model, cfg), cfg))
    if ckpt:
        set_gradient_checkpointing(model, True)
    batch = _batch(config, tokenizer, batch_size, (300, 200))
    measured = measure_finetune_peak(model, batch, optimizer)
    assert measured.baseline["parameters"] == sum({p.untyped_storage()._cdata: p.untyped_storage().nbytes()
                                                   for p in model.parameters()}.values())
    assert measured.baseline["optimizer_states"] > 0 and measured.step_bytes > 0
    est = estimate_for_batch(config, batch, mode=mode, r=8, gradient_checkpointing=ckpt, dropout=dropout, device="cpu",
                             train_projector=train_projector, tile_batch_size=model.tile_batch_size)
    assert est.settings["batch"] == batch_size
    ratio = est.total_bytes / measured.peak_bytes
    print(f"{preset} {mode} ckpt={ckpt}: estimate {est.total_bytes / 1e6:.1f} MB, measured {measured.peak_bytes / 1e6:.1f} MB")
    assert 0.75 <= ratio <= 1.25, f"estimate {est.total_bytes / 1e6:.1f} MB vs measured {measured.peak_bytes / 1e6:.1f} MB\n" \
                                  + est.table(unit="MB")
