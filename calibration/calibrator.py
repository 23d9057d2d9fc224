"""Calibrate an NVILA checkpoint with NVIDIA ModelOpt and save the result for export.

The vision tower (and the projector when the recipe says so) and the Qwen2 LLM are quantized in two
ModelOpt passes with their own recipes; the LLM pass is calibrated on embeddings made by the already
quantized vision tower — what it will see when deployed.

A calibrated directory::

    CALIBRATED/
      nvila_config.json     the model config
      model.safetensors     every weight and quantizer buffer (amax, pre_quant_scale) after calibration
      modelopt_state.pt     ``mto.modelopt_state`` per part (plain containers; read with weights_only=True)
      recipe.json           the recipes used
      calibration.json      statistics: samples, tiles, tokens, times, amax ranges
      fidelity.json         quantized vs float on held-out prompts (see fidelity.py)
      tokenizer files
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from nvila_edge import NVILAConfig, NVILAModel, NVILAProcessor, ProcessedInputs
from nvila_edge.checkpoint import materialize_buffers
from nvila_edge.errors import CalibrationError, CheckpointError
from nvila_edge.io import atomic_directory

from .data import load_calibration_data
from .fidelity import FidelityReport, compare, reference
from .recipes import QuantRecipe, get_recipe

CONFIG_FILE = "nvila_config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "modelopt_state.pt"
RECIPE_FILE = "recipe.json"
STATS_FILE = "calibration.json"
FIDELITY_FILE = "fidelity.json"
PART_MODULES = {"vision": "vision_tower", "llm": "llm"}


@dataclass
class CalibrationResult:
    path: Path | None
    model: NVILAModel
    recipes: dict[str, QuantRecipe]
    stats: dict
    fidelity: FidelityReport | None


def _mtq():
    from .recipes import _mtq as get

    return get()


@contextlib.contextmanager
def _quiet():
    """ModelOpt prints progress lines ("Inserted 97 quantizers", KV-cache probing) to stdout: keep our
    output readable (tqdm bars go to stderr and stay)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def is_calibrated(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / RECIPE_FILE).is_file() and (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def _vision_config(recipe: QuantRecipe, model: NVILAModel) -> dict:
    cfg = recipe.modelopt_config()
    # layers past hidden_states[select_layer] never run: leave them uncalibrated and off
    layers = len(model.vision_tower.encoder.layers)
    keep = model.config.vision.select_layer % (layers + 1)
    cfg["quant_cfg"] += [{"quantizer_name": f"*encoder.layers.{i}.*", "enable": False} for i in range(keep, layers)]
    return cfg


def _quantize_vision(model: NVILAModel, recipe: QuantRecipe, samples: Sequence[ProcessedInputs], progress: bool) -> dict:
    mtq = _mtq()
    tiles = [torch.as_tensor(s.pixel_values) for s in samples if s.media]
    if not tiles:
        raise CalibrationError("the vision recipe needs calibration images or videos, but the data has none")
    pixels = torch.cat(tiles)
    chunks = pixels.split(model.tile_batch_size)

    def tower_loop(_):
        for chunk in tqdm(chunks, desc=f"calibrate vision ({recipe.name})", disable=not progress, leave=False):
            model.encode_tiles(chunk)

    with _quiet():
        mtq.quantize(model.vision_tower, _vision_config(recipe, model), tower_loop)
    if recipe.quantize_projector:  # second pass: the projector sees the quantized tower's features
        def projector_loop(_):
            for chunk in tqdm(chunks, desc="calibrate projector", disable=not progress, leave=False):
                model.mm_projector(model._repeat_scales(model.encode_tiles(chunk)))

        with _quiet():
            mtq.quantize(model.mm_projector, recipe.modelopt_config(), projector_loop)
    return {"tiles": int(pixels.shape[0])}


def _quantize_llm(model: NVILAModel, recipe: QuantRecipe, samples: Sequence[ProcessedInputs], progress: bool) -> dict:
    mtq = _mtq()
    with torch.inference_mode():
        embeds = [model.build_inputs_embeds(s).clone() for s in samples]

    def loop(_):
        for x in tqdm(embeds, desc=f"calibrate llm ({recipe.name})", disable=not progress, leave=False):
            model.llm(inputs_embeds=x, use_cache=False, logits_to_keep=1)

    with _quiet():
        mtq.quantize(model.llm, recipe.modelopt_config(), loop)
    return {"prompts": len(embeds), "tokens": int(sum(x.shape[1] for x in embeds))}


def quantizer_summary(model: NVILAModel) -> dict:
    """Count enabled weight / input quantizers per part and the amax range (tests and stats use it)."""
    out = {}
    for part, attr in (("vision", "vision_tower"), ("projector", "mm_projector"), ("llm", "llm")):
        linears = [m for m in getattr(model, attr).modules() if isinstance(m, torch.nn.Linear)]
        w = [m for m in linears if getattr(m, "weight_quantizer", None) is not None and m.weight_quantizer.is_enabled]
        a = [m for m in linears if getattr(m, "input_quantizer", None) is not None and m.input_quantizer.is_enabled]
        amax = [m.weight_quantizer.amax for m in w if m.weight_quantizer.amax is not None]
        out[part] = {"linears": len(linears), "weight_quantized": len(w), "input_quantized": len(a),
                     "weight_amax_min": float(min(x.min() for x in amax)) if amax else None,
                     "weight_amax_max": float(max(x.max() for x in amax)) if amax else None}
    return out


def quantize_model(model: NVILAModel, samples: Sequence[ProcessedInputs], vision: str | QuantRecipe = "w8a8-smoothquant",
                   llm: str | QuantRecipe = "w4a16-awq", progress: bool = True) -> tuple[dict, dict]:
    """Quantize ``model`` in place (fake quantization); return (recipes, stats)."""
    recipes = {"vision": vision if isinstance(vision, QuantRecipe) else get_recipe(vision, "vision"),
               "llm": llm if isinstance(llm, QuantRecipe) else get_recipe(llm, "llm")}
    for r in recipes.values():
        r.check(model.config)
    if not samples:
        raise CalibrationError("the calibration data is empty; pass at least one image, video or prompt")
    model.eval()
    stats: dict = {"samples": len(samples)}
    t0 = time.perf_counter()
    if recipes["vision"].quantized:
        stats["vision"] = _quantize_vision(model, recipes["vision"], samples, progress)
    t1 = time.perf_counter()
    if recipes["llm"].quantized:
        stats["llm"] = _quantize_llm(model, recipes["llm"], samples, progress)
    stats["seconds"] = {"vision": round(t1 - t0, 2), "llm": round(time.perf_counter() - t1, 2)}
    stats["quantizers"] = quantizer_summary(model)
    return recipes, stats


def _modelopt_states(model: NVILAModel, recipes: dict[str, QuantRecipe]) -> dict:
    import modelopt.torch.opt as mto

    states = {}
    if recipes["vision"].quantized:
        states["vision_tower"] = mto.modelopt_state(model.vision_tower)
        if recipes["vision"].quantize_projector:
            states["mm_projector"] = mto.modelopt_state(model.mm_projector)
    if recipes["llm"].quantized:
        states["llm"] = mto.modelopt_state(model.llm)
    return states


def save_calibrated(model: NVILAModel, path: str | os.PathLike, recipes: dict[str, QuantRecipe], stats: dict,
                    fidelity: FidelityReport | None = None, tokenizer=None) -> Path:
    """Write the calibrated directory atomically."""
    from safetensors.torch import save_model

    path = Path(path)
    with atomic_directory(path) as tmp:
        (tmp / CONFIG_FILE).write_text(model.config.to_json(), encoding="utf-8")
        save_model(model, str(tmp / WEIGHTS_FILE))  # handles the tied embedding / lm_head
        torch.save(_modelopt_states(model, recipes), tmp / STATE_FILE)
        (tmp / RECIPE_FILE).write_text(json.dumps({k: r.to_dict() for k, r in recipes.items()}, indent=2), encoding="utf-8")
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2), encoding="utf-8")
        if fidelity is not None:
            (tmp / FIDELITY_FILE).write_text(json.dumps(fidelity.to_dict(), indent=2), encoding="utf-8")
        tok = tokenizer or model.tokenizer
        if tok is not None:
            tok.save_pretrained(tmp)
    return path


def read_recipes(path: str | os.PathLike) -> dict[str, QuantRecipe]:
    path = Path(path)
    if not is_calibrated(path):
        raise CheckpointError(f"{path} is not a calibrated directory (no {RECIPE_FILE}/{WEIGHTS_FILE}); "
                              f"make one with `nvila-edge calibrate CHECKPOINT -o {path}`")
    spec = json.loads((path / RECIPE_FILE).read_text(encoding="utf-8"))
    return {part: get_recipe(spec[part]["name"], part) for part in ("vision", "llm")}


def load_calibrated(path: str | os.PathLike, device: str | torch.device = "cpu") -> NVILAModel:
    """Rebuild the quantized model: ModelOpt state restored on a meta model, then the saved tensors assigned."""
    import modelopt.torch.opt as mto
    from safetensors.torch import load_file

    path = Path(path)
    read_recipes(path)
    config = NVILAConfig.from_dict(json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")))
    with torch.device("meta"):
        model = NVILAModel(config)
    try:
        states = torch.load(path / STATE_FILE, weights_only=True)  # plain containers only: no code runs
    except Exception as e:  # a damaged or tampered file (e.g. a pickle that would run code): refused
        raise CheckpointError(f"{path / STATE_FILE} is not a plain ModelOpt state ({type(e).__name__}); it is damaged or "
                              "was tampered with: re-run `nvila-edge calibrate` (never load it with weights_only=False)") from None
    with _quiet():
        for target, state in states.items():
            mto.restore_from_modelopt_state(getattr(model, target), state)
    sd = load_file(str(path / WEIGHTS_FILE), device=str(device))
    expected = set(model.state_dict())
    if config.llm.tie_word_embeddings:  # safetensors keeps one name of a shared tensor: either may be there
        emb, head = "llm.model.embed_tokens.weight", "llm.lm_head.weight"
        if emb not in sd and head in sd:
            sd[emb] = sd[head]
        sd.pop(head, None)
        expected.discard(head)
    missing = expected - set(sd)
    unexpected = set(sd) - expected
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS_FILE} does not match the saved ModelOpt state: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(sd, strict=False, assign=True)
    if config.llm.tie_word_embeddings:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight
    materialize_buffers(model, device)
    from nvila_edge.checkpoint import _maybe_tokenizer

    model.tokenizer = _maybe_tokenizer(path)
    return model.eval()


def calibrate(model: NVILAModel | str | os.PathLike, output: str | os.PathLike | None = None, *,
              vision: str = "w8a8-smoothquant", llm: str = "w4a16-awq", data=None, num_samples: int = 64,
              heldout=None, num_heldout: int = 8, eval_records=None, processor: NVILAProcessor | None = None,
              seed: int = 0, progress: bool = True) -> CalibrationResult:
    """Calibrate, measure fidelity on held-out prompts, and save (when ``output`` is given).

    ``data`` / ``heldout``: a directory, a JSONL file or a list of processed inputs. ``eval_records``:
    training ``Record``s whose exact-match accuracy is measured before and after (the demo model)."""
    if not isinstance(model, NVILAModel):
        model = NVILAModel.from_pretrained(model)
    tokenizer = model.tokenizer
    if processor is None:
        if tokenizer is None:
            raise CalibrationError("the checkpoint has no tokenizer; pass processor=NVILAProcessor(config, tokenizer)")
        processor = NVILAProcessor(model.config, tokenizer)
    for part, name in (("vision", vision), ("llm", llm)):
        get_recipe(name, part).check(model.config)  # fail before any data work
    if data is None:
        raise CalibrationError("no calibration data: pass data=DIR_OR_JSONL (the synthetic set from `nvila-edge make-data` works)")
    if isinstance(data, list) and data and isinstance(data[0], ProcessedInputs):
        samples = data
    else:  # one read; without an explicit held-out set the last prompts are held out (never calibrated on)
        extra = num_heldout if heldout is None else 0
        samples = load_calibration_data(data, processor, num_samples + extra, seed=seed, progress=progress)
        if extra and len(samples) > 1:
            samples, heldout = _split_heldout(samples, min(extra, len(samples) // 2))
    if heldout is None:
        heldout = samples
    held = heldout if isinstance(heldout, list) else \
        load_calibration_data(heldout, processor, num_heldout, seed=seed + 1, progress=False)
    held = held[:num_heldout]
    refs = reference(model, held, progress=progress)
    acc_before = _accuracy(model, processor, eval_records, progress)
    recipes, stats = quantize_model(model, samples, vision, llm, progress)
    fid = compare(model, held, refs, progress=progress)
    fid.accuracy_before, fid.accuracy_after = acc_before, _accuracy(model, processor, eval_records, progress)
    path = save_calibrated(model, output, recipes, stats, fid, tokenizer) if output is not None else None
    return CalibrationResult(path, model, recipes, stats, fid)


def _split_heldout(samples: list, k: int) -> tuple[list, list]:
    """Hold out ``k`` prompts, media and text-only in proportion, never every media prompt (the vision
    recipe needs at least one to calibrate on)."""
    media = [s for s in samples if s.media]
    text = [s for s in samples if not s.media]
    km = min(max(len(media) - 1, 0), round(k * len(media) / len(samples)))
    kt = min(len(text), k - km)
    km = min(max(len(media) - 1, 0), k - kt)
    held = media[len(media) - km:] + text[len(text) - kt:]
    return media[:len(media) - km] + text[:len(text) - kt], held


def _accuracy(model, processor, records, progress) -> float | None:
    if not records:
        return None
    from nvila_edge.training.evaluate import evaluate

    return evaluate(model, processor, records, progress=progress).accuracy
