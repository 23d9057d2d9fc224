"""LoRA / QLoRA + ViT-LayerNorm fine-tuning (nvila_edge.training.finetune).

A tiny model is taught a new fact — pictures of a robot answered "what is the robot's name?" → "zorbo" —
and must answer it afterwards (LoRA and QLoRA); only the intended parameters may move; the ViT LayerNorm
group runs at the LLM learning rate / ratio; merge and load_finetuned reproduce the fine-tuned model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from nvila_edge import NVILAConfig, NVILAModel, NVILAProcessor
from nvila_edge.errors import CheckpointError, ConfigError

from conftest import make_model

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from nvila_edge.training.finetune import (finetune, load_finetuned, merge, param_groups, prepare_model,  # noqa: E402
                                          vit_layernorm_parameters)
from nvila_edge.training.finetune_config import FinetuneConfig  # noqa: E402

QUESTION = "<image>\nwhat is the robot's name?"
ANSWER = "zorbo"
LR = 5e-3
STEPS = 30


def small_config(**llm) -> NVILAConfig:
    """The tiny preset at 112-pixel tiles, one tile per image: a training step takes milliseconds."""
    return NVILAConfig.from_preset("tiny", vision={"image_size": 112}, llm=llm,
                                   preprocessing={"image_aspect_ratio": "resize", "s2_scales": (112,)})


def robot(seed: int) -> Image.Image:
    """A boxy robot (head, eyes, antenna, body) at a seed-dependent place on a seed-dependent background."""
    bg = (200 + 7 * (seed % 5), 215 + 5 * (seed % 4), 230 - 6 * (seed % 3))
    im = Image.new("RGB", (112, 112), bg)
    d = ImageDraw.Draw(im)
    x, y = 20 + 6 * (seed % 4), 14 + 5 * (seed % 3)
    d.line([x + 30, y, x + 30, y + 12], fill=(40, 40, 40), width=3)
    d.rectangle([x + 10, y + 12, x + 50, y + 42], fill=(120, 120, 135))
    d.ellipse([x + 17, y + 20, x + 27, y + 30], fill=(250, 60, 40))
    d.ellipse([x + 33, y + 20, x + 43, y + 30], fill=(250, 60, 40))
    d.rectangle([x + 4, y + 46, x + 56, y + 86], fill=(90, 90, 110))
    return im


def ask(model: NVILAModel, processor: NVILAProcessor, image: Image.Image) -> str:
    inputs = processor([{"from": "human", "value": QUESTION}], images=[image])
    return model.generate(**inputs, tokenizer=processor.tokenizer, max_new_tokens=6).text.strip()


@torch.no_grad()
def logits(model: NVILAModel, processor: NVILAProcessor, image: Image.Image) -> torch.Tensor:
    inputs = processor([{"from": "human", "value": QUESTION}], images=[image])
    return model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, media=inputs.media).logits[0]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices run faster on one thread


@pytest.fixture(scope="module")
def work(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("finetune")
    cfg = small_config()
    base = make_model(cfg)
    base.save_pretrained(root / "base", tokenizer=tokenizer)
    rows = []
    for i in range(4):
        robot(i).save(root / f"robot{i}.png")
        rows.append({"id": f"r{i}", "image": f"robot{i}.png",
                     "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "base": root / "base", "data": root / "data.jsonl",
            "processor": NVILAProcessor(cfg, tokenizer), "heldout": robot(7)}


def _config(mode: str, **kw) -> FinetuneConfig:
    # the whole batch in one forward: the LoRA dropout masks (and so the learning curve) stay those these
    # tests were tuned with; micro-batching is the same training up to dropout (test_micro_batches_...)
    kw = {"r": 8, "alpha": 16, "learning_rate": LR, "max_steps": STEPS, "batch_size": 4, "micro_batch_size": 4,
          "scheduler": "constant", "warmup_ratio": 0.0, **kw}
    return FinetuneConfig(mode=mode, **kw)


def nf4_state(model: NVILAModel) -> dict[str, dict[str, torch.Tensor]]:
    """The NF4 codes and scales of every quantized linear, as stored (canonical layout)."""
    return {name: {k: v.clone() for k, v in m.state_dict().items()}
            for name, m in model.llm.get_base_model().named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.fixture(scope="module")
def runs(work):
    out = {}
    for mode in ("lora", "qlora"):
        out[mode] = finetune(work["base"], work["data"], work["root"] / f"ft-{mode}", _config(mode), progress=False)
        # right after training: bnb repacks NF4 weights for CPU inference (absmax to bf16) on the first eval
        # forward, so the "base weights unchanged" check must look before any inference
        out[mode].nf4_after_training = nf4_state(out[mode].model)
    return out


@pytest.fixture(scope="module")
def projector_run(work):
    return finetune(work["base"], work["data"], work["root"] / "ft-proj",
                    _config("lora", max_steps=3, train_projector=True, projector_lr=1e-3), progress=False)


@pytest.fixture(scope="module")
def base_model(work):
    return NVILAModel.from_pretrained(work["base"])


# ---- learning ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_new_fact_is_learned(mode, runs, work, base_model):
    proc = work["processor"]
    assert ask(base_model, proc, work["heldout"]) != ANSWER  # the base model does not know the name
    result = runs[mode]
    losses = result.metrics["loss_history"]
    assert len(losses) == STEPS and losses[-1] < 0.05 * losses[0]
    assert ask(result.model, proc, work["heldout"]) == ANSWER  # an image it was not trained on


def test_qlora_base_weights_are_nf4(runs):
    for mode, cls in (("qlora", bnb.nn.Linear4bit), ("lora", torch.nn.Linear)):
        layers = runs[mode].model.llm.get_base_model().model.layers
        for layer in layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                assert type(getattr(layer.self_attn, name).base_layer) is cls
            for name in ("gate_proj", "up_proj", "down_proj"):
                assert type(getattr(layer.mlp, name).base_layer) is cls
    w = runs["qlora"].model.llm.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight
    assert w.dtype == torch.uint8 and w.quant_state.quant_type == "nf4"
    assert w.numel() * 2 == 128 * 256  # two 4-bit weights per byte


# ---- what moved ---------------------------------------------------------------------------------------------
def _llm_base_unchanged(result, base: NVILAModel) -> None:
    trained = result.model
    base_params = dict(base.llm.named_parameters())
    for name, got in getattr(result, "nf4_after_training", {}).items():
        ref = base_params[name.replace(".base_layer", "") + ".weight"]
        fresh = bnb.nn.Linear4bit(ref.shape[1], ref.shape[0], bias=False, compute_dtype=torch.float32, quant_type="nf4")
        fresh.weight = bnb.nn.Params4bit(ref.detach().clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=False).to("cpu")
        want = fresh.state_dict()
        assert torch.equal(got["weight"], want["weight"]), name  # the packed NF4 codes
        assert torch.equal(got["weight.absmax"], want["weight.absmax"]), name  # the fp32 block scales
    for name, p in trained.llm.get_base_model().named_parameters():
        if "lora_" in name or isinstance(p, bnb.nn.Params4bit):
            continue
        assert torch.equal(p, base_params[name.replace(".base_layer", "")]), name
    lora_b = [p for n, p in trained.llm.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: every adapter trained


@pytest.mark.parametrize("mode", ["lora", "qlora", "projector"])
def test_only_intended_parameters_change(mode, runs, projector_run, base_model, work):
    result = projector_run if mode == "projector" else runs[mode]
    trained = result.model
    _llm_base_unchanged(result, base_model)
    if mode == "qlora":
        assert len(result.nf4_after_training) == 7 * trained.config.llm.num_hidden_layers
    base_params = dict(base_model.named_parameters())
    ln = set(vit_layernorm_parameters(trained))
    layers = trained.config.vision.num_hidden_layers
    used = layers + 1 + trained.config.vision.select_layer  # the last layer and post_layernorm see no gradient
    for name, p in trained.vision_tower.named_parameters():
        key = f"vision_tower.{name}"
        if key not in ln:
            assert torch.equal(p, base_params[key]), key
        elif any(f"layers.{i}." in key for i in range(used)):
            assert not torch.equal(p, base_params[key]), key
    proj_same = [torch.equal(p, base_params[f"mm_projector.{n}"]) for n, p in trained.mm_projector.named_parameters()]
    if mode == "projector":
        assert not any(proj_same)
    else:
        assert all(proj_same)

    from safetensors.torch import load_file

    deltas = load_file(str(result.output_dir / "deltas.safetensors"))
    expected = ln | ({f"mm_projector.{n}" for n, _ in trained.mm_projector.named_parameters()} if mode == "projector" else set())
    assert set(deltas) == expected
    trained_params = dict(trained.named_parameters())
    assert all(torch.equal(v, trained_params[k]) for k, v in deltas.items())
    c = trained.config
    assert result.trainable["vision_layernorm"] == 4 * c.vision.hidden_size * layers + 2 * c.vision.hidden_size
    shapes = {"q": (128, 128), "k": (128, 64), "v": (128, 64), "o": (128, 128), "gate": (128, 256), "up": (128, 256),
              "down": (256, 128)}
    assert result.trainable["llm_lora"] == c.llm.num_hidden_layers * sum(8 * (i + o) for i, o in shapes.values())
    assert result.trainable["projector"] == (sum(p.numel() for p in trained.mm_projector.parameters())
                                             if mode == "projector" else 0)


def test_finetune_dir_layout(runs):
    out = runs["qlora"].output_dir
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    info = json.loads((out / "finetune.json").read_text())
    assert info["config"]["mode"] == "qlora" and info["config"]["r"] == 8
    assert Path(info["base_checkpoint"]).name == "base"
    assert info["metrics"]["steps"] == STEPS and info["versions"]["peft"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16 and set(adapter["target_modules"]) == set(FinetuneConfig().target_modules)


# ---- learning rates -------------------------------------------------------------------------------------------
def test_vit_layernorm_group_lr_is_llm_lr_over_ratio(runs, projector_run):
    assert runs["lora"].metrics["learning_rates"] == {"llm_lora": LR, "vision_layernorm": pytest.approx(LR / 10)}
    assert projector_run.metrics["learning_rates"]["projector"] == 1e-3


@pytest.mark.parametrize("ratio", [5, 25, 50])
def test_param_groups_follow_the_ratio(ratio):
    model = make_model(small_config())
    cfg = FinetuneConfig(mode="lora", r=4, learning_rate=3e-4, vit_lr_ratio=ratio)
    groups = {g["name"]: g for g in param_groups(prepare_model(model, cfg), cfg)}
    assert set(groups) == {"llm_lora", "vision_layernorm"}
    assert groups["llm_lora"]["lr"] == 3e-4
    assert groups["vision_layernorm"]["lr"] == pytest.approx(3e-4 / ratio)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups.values() for p in g["params"]}


@pytest.mark.parametrize("ratio", [0, 1, 4.99, 50.01, 100])
def test_vit_lr_ratio_outside_5_to_50_is_rejected(ratio, work):
    with pytest.raises(ConfigError, match="vit_lr_ratio"):
        FinetuneConfig(vit_lr_ratio=ratio)
    cfg = FinetuneConfig()
    cfg.vit_lr_ratio = ratio  # changed after construction: finetune checks again, before any work
    with pytest.raises(ConfigError, match="vit_lr_ratio"):
        finetune(work["base"], work["data"], work["root"] / "never", cfg, progress=False)
    assert not (work["root"] / "never").exists()


def test_other_bad_configs_are_rejected():
    for kw in ({"mode": "full"}, {"r": 0}, {"dropout": 1.0}, {"target_modules": ()}, {"learning_rate": 0}):
        with pytest.raises(ConfigError):
            FinetuneConfig(**kw)


# ---- reload and merge -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_load_finetuned_reproduces_the_trained_model(mode, runs, work):
    reloaded = load_finetuned(work["base"], runs[mode].output_dir)
    proc = work["processor"]
    torch.testing.assert_close(logits(reloaded, proc, work["heldout"]), logits(runs[mode].model, proc, work["heldout"]),
                               rtol=0, atol=1e-5)


def test_merge_lora_answers_like_the_finetuned_model(runs, work):
    out = merge(work["base"], runs["lora"].output_dir, work["root"] / "merged-lora")
    assert all((out / d).is_dir() for d in ("llm", "vision_tower", "mm_projector")) and (out / "finetune.json").is_file()
    merged = NVILAModel.from_pretrained(out)
    assert merged.tokenizer is not None and not any("lora" in k for k in merged.state_dict())
    proc = work["processor"]
    for image in (work["heldout"], robot(1), robot(11)):
        assert ask(merged, proc, image) == ask(runs["lora"].model, proc, image) == ANSWER
    torch.testing.assert_close(logits(merged, proc, work["heldout"]), logits(runs["lora"].model, proc, work["heldout"]),
                               rtol=1e-4, atol=1e-4)


def test_merge_qlora_into_the_full_precision_base(runs, work):
    # the adapter was trained against NF4-rounded weights; merged into the fp32 originals the logits move
    # a little (not bit-exact), the taught answer stays
    merged = NVILAModel.from_pretrained(merge(work["base"], runs["qlora"].output_dir, work["root"] / "merged-qlora"))
    proc = work["processor"]
    for image in (work["heldout"], robot(1), robot(11)):
        assert ask(merged, proc, image) == ask(runs["qlora"].model, proc, image) == ANSWER
    diff = (logits(merged, proc, work["heldout"]) - logits(runs["qlora"].model, proc, work["heldout"])).abs().max()
    assert 0 < diff


def test_merge_rejects_bad_inputs(runs, work, tokenizer, tmp_path):
    ft = runs["lora"].output_dir
    with pytest.raises(CheckpointError, match="not found"):
        merge(work["base"], tmp_path / "nope", tmp_path / "out")
    broken = tmp_path / "no-adapter"
    shutil.copytree(ft, broken)
    shutil.rmtree(broken / "adapter")
    with pytest.raises(CheckpointError, match="adapter"):
        merge(work["base"], broken, tmp_path / "out")
    other = tmp_path / "other-base"
    make_model(small_config(intermediate_size=384)).save_pretrained(other, tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match=r"different architecture.*llm\.intermediate_size: 256 \(fine-tune\) vs 384"):
        merge(other, ft, tmp_path / "out")
    lying = tmp_path / "lying"  # claims the other base: the adapter's shapes still do not fit
    shutil.copytree(ft, lying)
    info = json.loads((lying / "finetune.json").read_text())
    info["base_config"] = small_config(intermediate_size=384).to_dict()
    (lying / "finetune.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="does not fit"):
        merge(other, lying, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gradient_checkpointing_trains_the_same(work):
    # non-reentrant checkpointing replays the dropout RNG: the same losses, less memory (see test_memory.py)
    losses = {}
    for ckpt in (False, True):
        result = finetune(work["base"], work["data"], work["root"] / f"ft-ckpt-{ckpt}",
                          _config("lora", max_steps=3, gradient_checkpointing=ckpt), progress=False)
        losses[ckpt] = result.metrics["loss_history"]
        flags = {m.gradient_checkpointing for m in result.model.modules() if hasattr(m, "gradient_checkpointing")}
        assert flags == {False}  # switched off again after training
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_micro_batches_accumulate_to_the_effective_batch(work):
    """--batch-size 4 as 4 micro-batches of 1 (the default) trains exactly like one batch of 4: the loss of each
    micro-batch is summed over its answer tokens and divided by the whole batch's (dropout 0: same masks)."""
    losses = {}
    for micro in (4, 1):
        result = finetune(work["base"], work["data"], work["root"] / f"ft-micro-{micro}",
                          _config("lora", max_steps=3, dropout=0.0, micro_batch_size=micro), progress=False)
        losses[micro] = result.metrics["loss_history"]
        assert result.metrics["gradient_accumulation_steps"] == 4 // micro and result.metrics["steps"] == 3
    assert len(losses[1]) == 3 and losses[1] == pytest.approx(losses[4], rel=1e-5)


def test_finetune_defaults_fit_a_small_card():
    cfg = FinetuneConfig()
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (4, 1, 4)
    assert cfg.gradient_checkpointing is True and cfg.max_tiles is None
    with pytest.raises(ConfigError, match="micro_batch_size"):
        FinetuneConfig(micro_batch_size=0)
