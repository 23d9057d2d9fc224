"""Checkpoint I/O for every published NVILA layout, safetensors only (no pickle anywhere).

- **VILA directory layout** (``llava_llama`` / ``LlavaLlamaModel``) and the remote-code **``-hf-preview``**
  layout (``vila`` / ``VILAForCausalLM``): top ``config.json`` and sub-folders ``llm/`` (HF Qwen2 +
  tokenizer), ``vision_tower/`` (HF ``SiglipVisionModel``, keys ``vision_model.*``) and ``mm_projector/``
  (keys ``layers.N.*``). Both read as layout "vila".
- **``-hf`` layout** (``nvila`` / ``nvila_lite``): one folder, ``text_config`` + ``vision_config``, keys
  ``llm.*``, ``vision_tower.*``, ``mm_projector.layers.*``. Layout "hf".

Any folder may be sharded (``model.safetensors.index.json``). Media / end token ids follow the reference:
the checkpoint's tokenizer gives them unless ``config.json`` states them, and a stated id must agree with
the tokenizer (``NVILAConfig.from_vila_dict``); ``read_checkpoint`` is the one reader that applies it.

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

from . import vila_format
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
    """"vila" (VILA directory or ``-hf-preview`` layout) or "hf"; anything else raises ``CheckpointError``."""
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


def tokenizer_file(path: str | os.PathLike) -> Path | None:
    """The checkpoint's ``tokenizer.json`` (in the folder itself or in ``llm/``), or None."""
    for folder in (Path(path), Path(path) / "llm"):
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    return None


def read_tokenizer(path: str | os.PathLike, required: bool = False):
    """The checkpoint's ``NVILATokenizer``; None when it has none (``required``: ``TokenizerError``).

    A tokenizer that is there but unusable (lacks ``<image>`` / ``<vila/video>``, bad JSON) is a
    ``CheckpointError`` naming the file: its ids decide how media are placed, so it is never skipped."""
    from .errors import TokenizerError
    from .tokenizer import NVILATokenizer

    f = tokenizer_file(path)
    if f is None:
        return NVILATokenizer.from_pretrained(path) if required else None  # raises the "no tokenizer" error
    try:
        return NVILATokenizer.from_pretrained(f.parent)
    except TokenizerError as e:
        raise CheckpointError(f"{f}: {e}") from e


def _config_from(path: Path, top: dict, subs: dict, tokenizer) -> NVILAConfig:
    try:
        return NVILAConfig.from_vila_dict(top, subs.get("llm"), subs.get("vision_tower"), subs.get("mm_projector"),
                                          tokenizer=tokenizer)
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path / 'config.json'} has an invalid NVILA config: {e}") from e


def read_checkpoint(path: str | os.PathLike) -> tuple[NVILAConfig, str, object]:
    """(config, layout, tokenizer or None) of a checkpoint folder; no weights are read.

    The config's ``image_token_id`` / ``video_token_id`` / ``end_token_ids`` are the tokenizer's unless
    ``config.json`` states them (then they must agree), as the reference resolves them."""
    path = Path(path)
    layout = detect_layout(path)
    top = _read_json(path / "config.json")
    subs = {}
    if layout == "vila":
        for comp in COMPONENTS:
            f = path / comp / "config.json"
            subs[comp] = _read_json(f) if f.is_file() else None
    tokenizer = read_tokenizer(path)
    return _config_from(path, top, subs, tokenizer), layout, tokenizer


def read_config(path: str | os.PathLike) -> tuple[NVILAConfig, str]:
    """The ``NVILAConfig`` of a checkpoint folder and its layout (JSON + tokenizer, no torch)."""
    config, layout, _ = read_checkpoint(path)
    return config, layout


def read_processor_files(path: str | os.PathLike) -> tuple[NVILAConfig, object]:
    """(config, tokenizer) of a checkpoint or of a processor-only folder (``NVILAProcessor.save_pretrained``:
    ``config.json`` with inline sub-configs + ``llm/`` tokenizer, no weights)."""
    path = Path(path)
    try:
        config, _, tokenizer = read_checkpoint(path)
    except CheckpointError:
        if not (path / "config.json").is_file() or any(path.rglob("*.safetensors")):
            raise  # a real checkpoint with a real problem
        tokenizer = read_tokenizer(path, required=True)
        config = _config_from(path, _read_json(path / "config.json"), {}, tokenizer)
    if tokenizer is None:
        tokenizer = read_tokenizer(path, required=True)
    return config, tokenizer


# ---- weight files ---------------------------------------------------------------------------------------
def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The folder's safetensors files and its index's key → shard map ({} when it has no index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map; re-save the checkpoint")
        for key, shard in weight_map.items():
            if not (folder / shard).is_file():
                raise CheckpointError(f"{index} maps key {key!r} to the shard {folder / shard}, which is missing; "
                                      "download the whole checkpoint again")
        return [folder / s for s in sorted(set(weight_map.values()))], weight_map
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files, {}
    pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES] if folder.is_dir() else []
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights {pickles}; nvila-edge loads safetensors only (pickle can run code). "
            "Convert them once with safetensors.torch.save_file in a trusted environment."
        )
    raise CheckpointError(f"no *.safetensors weights in {folder}")


def _iter_headers(path: Path, layout: str) -> Iterator[tuple[Path, str, str, tuple[int, ...]]]:
    """(file, key in file, canonical key, shape) of every tensor, from the safetensors headers only."""
    from safetensors import safe_open

    folders = [(path / c, c + ".") for c in COMPONENTS] if layout == "vila" else [(path, "")]
    for folder, prefix in folders:
        files, index = _weight_files(folder)  # every listed shard exists before any header is read
        for f in files:
            try:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from e
            listed = [k for k, shard in index.items() if (folder / shard) == f and k not in shapes]
            if listed:
                raise CheckpointError(f"{folder / 'model.safetensors.index.json'} puts key {listed[0]!r} in {f}, "
                                      "but that shard lacks it; the shard is damaged or from another checkpoint")
            for k, shape in shapes.items():
                yield f, k, canonical_key(prefix + k), shape


def plan_weights(path: Path, layout: str, config: NVILAConfig, shapes: dict[str, tuple[int, ...]]
                 ) -> dict[Path, list[tuple[str, str]]]:
    """Check every checkpoint tensor against the model's ``shapes`` from the headers alone (nothing is
    allocated yet) and return {file: [(key in file, model key)]}: the reading plan, shard by shard."""
    expected = {canonical_key(k): k for k in shapes}
    tied = config.llm.tie_word_embeddings
    plan: dict[Path, list[tuple[str, str]]] = {}
    seen: dict[str, Path] = {}
    for f, key, canon, shape in _iter_headers(path, layout):
        if canon not in expected:
            if tied and canon == "llm.lm_head.weight":
                continue
            raise CheckpointError(f"{f}: unexpected key {key!r} (no such weight in a {config.name} NVILA model)")
        want = shapes[expected[canon]]
        if shape != want:
            raise CheckpointError(f"{f}: key {key!r} has shape {shape} but the config expects {want}")
        if canon in seen:
            raise CheckpointError(f"{f}: key {key!r} is also in {seen[canon]}; the checkpoint mixes two saves")
        seen[canon] = f
        plan.setdefault(f, []).append((key, expected[canon]))
    missing = [k for c, k in expected.items() if c not in seen and not (tied and c == "llm.lm_head.weight")]
    if missing:
        raise CheckpointError(f"{path}: weights missing from the checkpoint: {missing[:8]}{' …' if len(missing) > 8 else ''}")
    return plan


def read_weights(plan: dict[Path, list[tuple[str, str]]], dtype=None, device="cpu") -> dict:
    """Read the planned tensors one shard at a time, each cast / moved as it is read, so peak memory
    stays near one copy of the model (plus one tensor)."""
    from safetensors import safe_open

    state = {}
    for f, keys in plan.items():
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for key, target in keys:
                    tensor = st.get_tensor(key)
                    state[target] = tensor.to(device=device, dtype=dtype or tensor.dtype)
        except CheckpointError:
            raise
        except Exception as e:  # truncated data after a valid header
            raise CheckpointError(f"{f} could not be read ({e}); the file is truncated or damaged") from e
    return state


# ---- load ------------------------------------------------------------------------------------------------
_HF_LOAD_KWARGS = ("trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "local_files_only", "revision")


def load_options(config: NVILAConfig, dtype=None, device="cpu", *, torch_dtype=None, device_map=None,
                 **hf_kwargs) -> tuple[object, str]:
    """transformers-style ``from_pretrained`` arguments → (torch dtype or None, device string).

    ``torch_dtype`` is ``dtype``'s transformers alias; "auto" is the checkpoint's own dtype.
    ``device_map``: "cpu", "cuda", "cuda:N", "auto" (CUDA when there is one) or {"": device};
    the model is never split over devices."""
    import torch

    unknown = set(hf_kwargs) - set(_HF_LOAD_KWARGS)
    if unknown:
        raise ConfigError(f"unknown from_pretrained argument(s) {sorted(unknown)}; accepted besides dtype/device: "
                          f"torch_dtype, device_map, {', '.join(_HF_LOAD_KWARGS)}")
    if torch_dtype is not None:
        dtype = torch_dtype
    if dtype == "auto":
        dtype = config.model_dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype):
            raise ConfigError(f"unknown dtype {dtype!r}; use e.g. torch.float16, 'bfloat16', 'float32' or 'auto'")
        dtype = resolved
    if device_map is not None:
        if isinstance(device_map, dict):
            places = set(map(str, device_map.values()))
            if len(places) != 1:
                raise ConfigError(f"device_map {device_map} splits the model over devices; nvila-edge loads it on "
                                  "one device: pass device_map='cpu', 'cuda' or 'cuda:N'")
            device_map = places.pop()
        if isinstance(device_map, int):
            device_map = f"cuda:{device_map}"
        device_map = str(device_map)
        if device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        device = device_map
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but torch sees no CUDA GPU; use device_map='cpu'")
    if not (device == "cpu" or device.startswith(("cuda", "mps", "xpu"))):
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return dtype, device


def load_model(cls, path: str | os.PathLike, dtype=None, device="cpu", attn_implementation: str | None = None, **kwargs):
    """Build ``cls(config)`` on the meta device and fill it from the checkpoint, shard by shard.

    Config, tokenizer, every shard's header and every shape are checked before any weight is read."""
    import torch

    path = Path(path)
    config, layout, tokenizer = read_checkpoint(path)
    dtype, device = load_options(config, dtype, device, **kwargs)
    with torch.device("meta"):
        model = cls(config) if attn_implementation is None else cls(config, attn_implementation=attn_implementation)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = plan_weights(path, layout, config, shapes)
    model.load_state_dict(read_weights(plan, dtype, device), strict=False, assign=True)
    if config.llm.tie_word_embeddings:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight
    materialize_buffers(model, device)
    model.eval()
    model.tokenizer = tokenizer
    return model


def materialize_buffers(model, device) -> None:
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
            _write_json(tmp / "config.json", vila_format.to_vila_dict(config))
            _write_json(tmp / "llm" / "config.json", vila_format.llm_hf_config(config))
            _write_json(tmp / "vision_tower" / "config.json", vila_format.vision_hf_config(config))
            _write_json(tmp / "mm_projector" / "config.json", vila_format.projector_hf_config(config))
            for folder, tensors in groups.items():
                save_file(tensors, str(tmp / folder / "model.safetensors"), metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "llm")
        else:
            top = vila_format.to_vila_dict(config)
            lite = config.projector.downsample == 3
            top["architectures"] = ["NVILALiteForConditionalGeneration" if lite else "NVILAForConditionalGeneration"]
            top["model_type"] = "nvila_lite" if lite else "nvila"
            # the published -hf naming: text_config / vision_config, media ids stated at the top
            top["text_config"], top["vision_config"] = top.pop("llm_cfg"), top.pop("vision_tower_cfg")
            top.pop("mm_projector_cfg")
            top.update(image_token_id=config.image_token_id, video_token_id=config.video_token_id)
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
