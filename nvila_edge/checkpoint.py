"""Checkpoint I/O for both real NVILA layouts, safetensors only (no pickle anywhere).

- **VILA directory layout**: top ``config.json`` (``LlavaLlamaModel``) and sub-folders ``llm/`` (HF Qwen2 +
  tokenizer), ``vision_tower/`` (HF ``SiglipVisionModel``, keys ``vision_model.*``) and ``mm_projector/``
  (keys ``layers.N.*``).
- **``-hf`` layout**: one folder, ``model_type`` ``nvila`` / ``nvila_lite``, keys ``llm.*``,
  ``vision_tower.*``, ``mm_projector.layers.*``.

The one weight-name map: our module names equal the ``-hf`` prefixes. A checkpoint key is made canonical
(``vision_tower.vision_model.X`` → ``vision_tower.X``, VILA sub-folder → prefix) and matched against the
canonical form of our own keys, so either transformers naming of SigLIP (with or without the
``vision_model`` wrapper) loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from .config import NVILAConfig
from .errors import CheckpointError, ConfigError
from .io import atomic_directory

COMPONENTS = ("llm", "vision_tower", "mm_projector")
HF_MODEL_TYPES = ("nvila", "nvila_lite")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---- the weight-name map -------------------------------------------------------------------------------
def canonical_key(key: str) -> str:
    """Checkpoint or model key → canonical key (``-hf`` prefixes, SigLIP without ``vision_model.``)."""
    for prefix in ("vision_tower.vision_tower.vision_model.", "vision_tower.vision_model.", "vision_tower.vision_tower."):
        if key.startswith(prefix):
            return "vision_tower." + key[len(prefix):]
    return key


def checkpoint_key(canonical: str, layout: str) -> tuple[str, str]:
    """Canonical key → (sub-folder, key in that folder's safetensors) in the reference naming."""
    comp, rest = canonical.split(".", 1)
    if comp == "vision_tower":
        rest = "vision_model." + rest
    if layout == "vila":
        return comp, rest
    return "", f"{comp}.{rest}"


# ---- layout detection and config -----------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def detect_layout(path: str | os.PathLike) -> str:
    """"vila" or "hf"; anything else raises ``CheckpointError``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    top = _read_json(path / "config.json")
    subdirs = [c for c in COMPONENTS if (path / c).is_dir()]
    if subdirs:
        missing = [c for c in COMPONENTS if c not in subdirs]
        if missing:
            raise CheckpointError(f"VILA-layout checkpoint {path} lacks the sub-folder(s) {missing}")
        return "vila"
    if top.get("model_type") in HF_MODEL_TYPES or any(k in top for k in ("llm_cfg", "text_config")):
        return "hf"
    raise CheckpointError(
        f"{path} is neither a VILA-layout checkpoint (config.json + llm/, vision_tower/, mm_projector/) nor an "
        f"NVILA -hf checkpoint (model_type {HF_MODEL_TYPES}); its model_type is {top.get('model_type')!r}"
    )


def read_config(path: str | os.PathLike) -> tuple[NVILAConfig, str]:
    """The ``NVILAConfig`` of a checkpoint folder and its layout, from JSON only (no torch)."""
    path = Path(path)
    layout = detect_layout(path)
    top = _read_json(path / "config.json")
    subs = {}
    if layout == "vila":
        for comp in COMPONENTS:
            f = path / comp / "config.json"
            subs[comp] = _read_json(f) if f.is_file() else None
    try:
        cfg = NVILAConfig.from_vila_dict(top, subs.get("llm"), subs.get("vision_tower"), subs.get("mm_projector"))
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path / 'config.json'} has an invalid NVILA config: {e}") from e
    return cfg, layout


# ---- weight files ---------------------------------------------------------------------------------------
def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [folder / s for s in shards]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"missing shard {f} listed in {index}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES] if folder.is_dir() else []
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights {pickles}; nvila-edge loads safetensors only (pickle can run code). "
            "Convert them once with safetensors.torch.save_file in a trusted environment."
        )
    raise CheckpointError(f"no *.safetensors weights in {folder}")


def _iter_checkpoint(path: Path, layout: str) -> Iterator[tuple[Path, object, str, str]]:
    """(file, open safetensors handle, key in file, canonical key) for every tensor of the checkpoint;
    each file is opened once and stays open while its keys are consumed."""
    from safetensors import safe_open

    folders = [(path / c, c + ".") for c in COMPONENTS] if layout == "vila" else [(path, "")]
    for folder, prefix in folders:
        for f in _weight_files(folder):
            try:
                st = safe_open(str(f), framework="pt", device="cpu")
                keys = list(st.keys())
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from e
            for k in keys:
                yield f, st, k, canonical_key(prefix + k)


# ---- load ------------------------------------------------------------------------------------------------
def load_model(cls, path: str | os.PathLike, dtype=None, device="cpu"):
    """Build ``cls(config)`` on the meta device and fill it from the checkpoint (no double allocation)."""
    import torch

    path = Path(path)
    config, layout = read_config(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = cls(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {canonical_key(k): k for k in shapes}
    tied = config.llm.tie_word_embeddings
    state: dict[str, torch.Tensor] = {}
    for f, st, key, canon in _iter_checkpoint(path, layout):
        if canon not in expected:
            if tied and canon == "llm.lm_head.weight":
                continue
            raise CheckpointError(f"{f}: unexpected key {key!r} (no such weight in a {config.name} NVILA model)")
        tensor = st.get_tensor(key)
        want = shapes[expected[canon]]
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{f}: key {key!r} has shape {tuple(tensor.shape)} but the config expects {want}")
        state[expected[canon]] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    missing = [k for c, k in expected.items() if k not in state and not (tied and c == "llm.lm_head.weight")]
    if missing:
        raise CheckpointError(f"{path}: weights missing from the checkpoint: {missing[:8]}{' …' if len(missing) > 8 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight
    _materialize_buffers(model, device)
    model.eval()
    model.tokenizer = _maybe_tokenizer(path)
    return model


def _materialize_buffers(model, device) -> None:
    """Recreate the non-persistent buffers (rotary frequencies, SigLIP position ids) left on meta."""
    import torch

    for name, module in model.named_modules():
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf is None or buf.device.type != "meta":
                continue
            if bname in ("inv_freq", "original_inv_freq"):
                with torch.device(device):
                    fresh = type(module)(module.config)
                module.register_buffer(bname, getattr(fresh, bname).to(device), persistent=False)
            elif bname == "position_ids":
                module.register_buffer(bname, torch.arange(buf.shape[-1], device=device).expand((1, -1)), persistent=False)
            else:
                raise CheckpointError(f"internal: buffer {name}.{bname} was not restored; please report this")


def _maybe_tokenizer(path: Path):
    from .errors import TokenizerError
    from .tokenizer import NVILATokenizer

    try:
        return NVILATokenizer.from_pretrained(path)
    except TokenizerError:
        return None


# ---- save ------------------------------------------------------------------------------------------------
def save_model(model, path: str | os.PathLike, layout: str = "vila", tokenizer=None,
               extra_files: dict[str, str] | None = None) -> None:
    """Write ``model`` in the VILA directory layout (default) or the ``-hf`` layout, atomically.

    ``extra_files`` ({relative name: text}, e.g. the training recipe and metrics) land in the same
    atomic write."""
    from safetensors.torch import save_file

    if layout not in ("vila", "hf"):
        raise CheckpointError(f"unknown layout {layout!r}; use 'vila' or 'hf'")
    config: NVILAConfig = model.config
    groups: dict[str, dict] = {}
    for k, v in model.state_dict().items():
        canon = canonical_key(k)
        if config.llm.tie_word_embeddings and canon == "llm.lm_head.weight":
            continue  # tied to the embeddings; safetensors refuses shared storage
        folder, key = checkpoint_key(canon, layout)
        groups.setdefault(folder, {})[key] = v.detach().to("cpu").contiguous()
    with atomic_directory(path) as tmp:
        if layout == "vila":
            _write_json(tmp / "config.json", config.to_vila_dict())
            _write_json(tmp / "llm" / "config.json", config.llm_hf_config())
            _write_json(tmp / "vision_tower" / "config.json", config.vision_hf_config())
            _write_json(tmp / "mm_projector" / "config.json", config.projector_hf_config())
            for folder, tensors in groups.items():
                save_file(tensors, str(tmp / folder / "model.safetensors"), metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "llm")
        else:
            top = config.to_vila_dict()
            top["architectures"] = ["NVILAForConditionalGeneration"]
            top["model_type"] = "nvila_lite" if config.projector.downsample == 3 else "nvila"
            _write_json(tmp / "config.json", top)
            save_file(groups[""], str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
