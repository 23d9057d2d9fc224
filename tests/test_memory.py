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


def test_nvila_8b_fits_24gb_at_the_finetune_defaults():
    """What `nvila-edge finetune --estimate --preset nvila-8b` prints with no other flag: the run's own
    step (micro-batch 1 of an effective 4, 17 tiles, 3 585 tokens, answer-only logits) is under 24 GB."""
    from nvila_edge.cli import main
    from nvila_edge.training.finetune_config import FinetuneConfig
    from nvila_edge.training.memory import estimate_for_finetune

    config = NVILAConfig.from_preset("nvila-8b")
    est = estimate_for_finetune(config, FinetuneConfig())
    assert est.settings["batch"] == 4 and est.settings["micro_batch"] == 1 and est.settings["grad_accum"] == 4
    assert est.settings["tiles"] == 17 and est.settings["seq_len"] == 3585 and est.settings["grad_ckpt"] is True
    assert est.total_bytes < 24e9
    # all four examples in one forward would not fit: the micro-batch is what makes it
    assert estimate_finetune_memory(config, batch_size=4).total_bytes > 24e9
    # the logits of the answers only, one chunk: far below every position's (3 585 x 151 936 x 12 bytes)
    peak = est.parts[next(k for k in est.parts if k.startswith("activations: peak"))]
    assert peak < 3585 * 151936 * 12 / 3
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["finetune", "--estimate", "--preset", "nvila-8b"]) == 0
    assert out.getvalue().strip() == est.table()
    with contextlib.redirect_stdout(out := io.StringIO()):  # any flags: the table of the run with those flags
        assert main(["finetune", "--estimate", "--preset", "nvila-8b", "--micro-batch-size", "2", "--max-tiles", "14",
                     "--mode", "lora"]) == 0
    want = estimate_for_finetune(config, FinetuneConfig(mode="lora", micro_batch_size=2, max_tiles=14))
    assert out.getvalue().strip() == want.table() and want.settings["tiles"] == 14


def test_max_tiles_caps_the_tiling():
    from nvila_edge.media.tiling import plan_image
    from nvila_edge.training.finetune_config import FinetuneConfig, tile_capped_config

    s2 = NVILAConfig.from_preset("nvila-8b")
    assert plan_image((4000, 3000), tile_capped_config(s2, 14)).num_tiles == 14  # 1 + 4 + 9
    assert tile_capped_config(s2, None) is s2 and tile_capped_config(s2, 99).preprocessing.max_tiles == 12
    with pytest.raises(ConfigError, match="at least 14"):
        tile_capped_config(s2, 13)
    lite = NVILAConfig.from_preset("nvila-lite-2b")
    assert plan_image((4000, 3000), tile_capped_config(lite, 7)).num_tiles <= 7
    assert plan_image((4000, 3000), tile_capped_config(lite, 1)).num_tiles == 1
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        FinetuneConfig(batch_size=4, micro_batch_size=3)


def test_a_run_that_cannot_fit_stops_before_loading_weights(tmp_path, monkeypatch, tokenizer):
    from nvila_edge.errors import ResourceLimitError
    from nvila_edge.training.finetune import finetune
    from nvila_edge.training.finetune_config import FinetuneConfig
    from nvila_edge.training.memory import require_fit

    config = NVILAConfig.from_preset("nvila-8b")
    # the 8B defaults (13.1 GB) with 12.5 GB free: the table and the flag that fits (fewer tiles first)
    with pytest.raises(ResourceLimitError) as e:
        require_fit(config, FinetuneConfig(), int(12.5e9))
    msg = str(e.value)
    assert "--max-tiles 14 would make it fit" in msg and "12.50 GB are free on the GPU" in msg
    assert msg.splitlines()[-1].startswith("total")
    with pytest.raises(ResourceLimitError, match="--r 32 would make it fit"):  # 14 tiles are not enough at 12 GB
        require_fit(config, FinetuneConfig(), int(12e9))
    assert require_fit(config, FinetuneConfig(), int(24e9)).total_bytes < 24e9
    with pytest.raises(ResourceLimitError, match="--micro-batch-size 1"):
        require_fit(config, FinetuneConfig(micro_batch_size=4), int(24e9))
    with pytest.raises(ResourceLimitError, match="gradient checkpointing"):
        require_fit(config, FinetuneConfig(gradient_checkpointing=False), int(24e9))
    with pytest.raises(ResourceLimitError, match="no single flag"):
        require_fit(config, FinetuneConfig(), int(4e9))

    # the real entry point: refused before NVILAModel.from_pretrained runs
    import json

    from nvila_edge import NVILAModel

    small = NVILAConfig.from_preset("tiny", vision={"image_size": 112},
                                    preprocessing={"image_aspect_ratio": "resize", "s2_scales": (112,)})
    make_model(small).save_pretrained(tmp_path / "base", tokenizer=tokenizer)
    rec = {"conversations": [{"from": "human", "value": "hi?"}, {"from": "gpt", "value": "yes"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")

    def never(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(NVILAModel, "from_pretrained", classmethod(never))
    with pytest.raises(ResourceLimitError, match="needs an estimated") as e:
        finetune(tmp_path / "base", tmp_path / "d.jsonl", tmp_path / "out", FinetuneConfig(r=4), memory_limit=10_000,
                 progress=False)
    assert "of available RAM" in str(e.value) and not (tmp_path / "out").exists()


def test_data_with_no_answer_tokens_is_a_data_error_naming_the_lines(tmp_path, tokenizer):
    import json

    from nvila_edge.training.data import DataError, read_jsonl
    from nvila_edge.training.finetune import check_examples

    small = NVILAConfig.from_preset("tiny", vision={"image_size": 112},
                                    preprocessing={"image_aspect_ratio": "resize", "s2_scales": (112,)})
    proc = NVILAProcessor(small, tokenizer)
    ok = {"conversations": [{"from": "human", "value": "hi?"}, {"from": "gpt", "value": "yes"}]}
    long = {"conversations": [{"from": "human", "value": "red " * small.llm.context_length}, {"from": "gpt", "value": "no"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ok) + "\n" + json.dumps(long) + "\n")
    records = read_jsonl(path)
    issues = []
    kept, lengths, answers = check_examples(records, proc, issues=issues)
    assert len(kept) == 1 and answers[0] >= 2 and lengths[0] > answers[0]
    assert [i.line for i in issues] == [2] and "context" in issues[0].reason
    with pytest.raises(DataError, match=r"d\.jsonl:2"):
        check_examples(records, proc, on_error="raise")
    path.write_text(json.dumps(long) + "\n" + json.dumps(long) + "\n")
    with pytest.raises(DataError, match=r"no answer tokens.*d\.jsonl:1, .*d\.jsonl:2"):
        check_examples(read_jsonl(path), proc)


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
    from nvila_edge.training.finetune import param_groups, prepare_model, set_gradient_checkpointing
    from nvila_edge.training.finetune_config import FinetuneConfig
    from nvila_edge.training.memory_measure import estimate_for_batch, measure_finetune_peak

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


def test_preset_measurement_cpu_path():
    """``measure_preset_peak`` (the GPU check's code) on the CPU: the tiny preset at the fine-tune defaults."""
    from nvila_edge.training.memory_measure import measure_preset_peak

    est, measured = measure_preset_peak("tiny", "cpu", steps=2)
    assert measured.device_peak_bytes is None and est.settings["micro_batch"] == 1 and est.settings["tiles"] == 17
    assert est.settings["answer_tokens"] > 90 and est.settings["device"] == "cpu"
    ratio = est.total_bytes / measured.peak_bytes
    print(f"tiny defaults: estimate {est.total_bytes / 1e6:.1f} MB, measured {measured.peak_bytes / 1e6:.1f} MB")
    assert 0.75 <= ratio <= 1.25, est.table(unit="MB")


@pytest.mark.gpu
def test_gpu_lite_2b_qlora_peak_matches_estimate():
    """docs/BENCHMARKS.md: NVILA-Lite-2B at real size, random weights, 3 QLoRA steps at the fine-tune defaults;
    ``torch.cuda.max_memory_allocated`` within 15 % of the estimate. Run: ``pytest -m gpu tests/test_memory.py -s``."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("bitsandbytes")
    from nvila_edge.training.memory_measure import measure_preset_peak

    est, measured = measure_preset_peak("nvila-lite-2b", "cuda", steps=3)
    peak = measured.device_peak_bytes
    print(f"\n{torch.cuda.get_device_name()}: nvila-lite-2b QLoRA defaults: estimate {est.total_gb:.3f} GB, "
          f"max_memory_allocated {peak / 1e9:.3f} GB (live tensors {measured.peak_bytes / 1e9:.3f} GB), "
          f"ratio {est.total_bytes / peak:.3f}\n{est.table()}")
    assert 0.85 <= est.total_bytes / peak <= 1.15
