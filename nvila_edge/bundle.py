"""The deployment bundle: one directory, self-described by ``manifest.json``; the only thing the runtime reads.

Layout::

    BUNDLE/
      manifest.json          format version, model config, recipes, producer versions, targets, file hashes
      tokenizer/             NVILATokenizer files (AutoTokenizer-compatible)
      cpu/                   vision.onnx, projector.onnx, decoder.onnx (+ .data), embeddings.safetensors
      tensorrt/              vision.plan, trtllm/ … (GPU target)
      torch/                 a VILA checkpoint for the torch backend

``BundleWriter`` assembles it in a temp directory and renames it into place (atomic); ``Bundle.open``
re-hashes every file, checks the manifest's own ``sha256`` (which covers its config, targets and limits), refuses
files the manifest does not list, types every malformed manifest as ``BundleError``, and with ``key=`` checks
the Ed25519 signature ``manifest.sig`` (``nvila_edge.signing``). Torch-free: the runtime imports this.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import NVILAConfig
from .errors import BundleError
from .io import atomic_directory, sha256_file
from .resources import package_versions

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
TOKENIZER_DIR = "tokenizer"
PRODUCER_PACKAGES = ("nvila-edge", "torch", "transformers", "nvidia-modelopt", "onnx", "onnxruntime",
                     "onnxruntime-genai", "tensorrt", "tensorrt-llm")


def producer_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape an artifact (None when not installed)."""
    return {"python": platform.python_version(), **package_versions(PRODUCER_PACKAGES)}


@dataclass
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict
    config: NVILAConfig

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True, key: str | os.PathLike | None = None) -> "Bundle":
        """Read and (``verify``) check a bundle; ``key``: an Ed25519 public key whose signature it must carry."""
        path = Path(path)
        manifest = read_manifest(path)
        if verify:
            problems = verify_bundle(path, manifest)
            if problems:
                raise BundleError(f"bundle {path} failed verification: " + "; ".join(problems[:5])
                                  + ("" if len(problems) <= 5 else f" (+{len(problems) - 5} more)")
                                  + "; re-export it with `nvila-edge export`")
        if key is not None:
            from .signing import verify_signature

            verify_signature(path, key)
        try:
            config = NVILAConfig.from_dict(manifest["config"])
        except Exception as e:  # noqa: BLE001 - any malformed config is a damaged bundle
            raise BundleError(f"bundle {path}: the manifest's config is not a valid model config "
                              f"({type(e).__name__}: {e}); re-export it") from None
        return cls(path, manifest, config)

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def targets(self) -> list[str]:
        return sorted(self.manifest.get("targets", {}))

    def target(self, name: str) -> dict:
        try:
            return self.manifest["targets"][name]
        except KeyError:
            raise BundleError(f"bundle {self.path} has no '{name}' target (it has: {', '.join(self.targets) or 'none'}); "
                              f"export it with `nvila-edge export ... --target {name}`") from None

    def has(self, role: str, target: str = "cpu") -> bool:
        return role in self.manifest.get("targets", {}).get(target, {}).get("files", {})

    def file(self, role: str, target: str = "cpu") -> Path:
        files = self.target(target).get("files", {})
        if role not in files:
            raise BundleError(f"bundle {self.path}: target '{target}' has no '{role}' file (it has: {', '.join(files)})")
        return self.path / files[role]

    @property
    def quantization(self) -> dict:
        return self.manifest.get("quantization", {})


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path} is not a bundle directory; make one with `nvila-edge export CALIBRATED_DIR -o {path}`")
    if not mf.is_file():
        raise BundleError(f"{path} has no {MANIFEST}: not an nvila-edge bundle (or an interrupted export)")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mf} is not valid JSON ({e}); the bundle is damaged: re-export it") from e
    if not isinstance(manifest, dict) or "format_version" not in manifest or "config" not in manifest:
        raise BundleError(f"{mf} lacks format_version/config: not an nvila-edge bundle manifest")
    shape = manifest_shape_problems(manifest)
    if shape:
        raise BundleError(f"{mf} is malformed: " + "; ".join(shape[:5]) + "; the bundle is damaged: re-export it")
    version = manifest["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{mf}: format_version must be a positive integer, got {version!r}; the manifest is damaged")
    if version > FORMAT_VERSION:
        raise BundleError(f"bundle format version {version!r} is newer than this nvila-edge reads ({FORMAT_VERSION}); "
                          "upgrade nvila-edge (pip install -U nvila-edge) or re-export with this version")
    return manifest


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``sha256`` field: config, targets, limits,
    quantization and every file hash."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_shape_problems(m: dict) -> list[str]:
    """What is of the wrong type in a manifest (every field the runtime reads); empty = well-formed."""
    out = []

    def want(value, types, what):
        if not isinstance(value, types) or isinstance(value, bool):
            out.append(f"{what} must be {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}")
            return False
        return True

    want(m.get("config"), (dict,), "config")
    if "quantization" in m:
        want(m["quantization"], (dict,), "quantization")
    if m.get("tokenizer") is not None:
        want(m["tokenizer"], (str,), "tokenizer")
    if want(m.get("files", {}), (dict,), "files"):
        for rel, info in m.get("files", {}).items():
            if want(info, (dict,), f"files[{rel!r}]"):  # a missing size / hash is a mismatch (verify_bundle)
                for k, t in (("size", int), ("sha256", str)):
                    if k in info:
                        want(info[k], (t,), f"files[{rel!r}].{k}")
    if want(m.get("targets", {}), (dict,), "targets"):
        for name, spec in m.get("targets", {}).items():
            if want(spec, (dict,), f"targets[{name!r}]") and want(spec.get("files", {}), (dict,),
                                                                   f"targets[{name!r}].files"):
                for role, rel in spec.get("files", {}).items():
                    want(rel, (str,), f"targets[{name!r}].files[{role!r}]")
                if spec.get("limits") is not None:
                    want(spec["limits"], (dict,), f"targets[{name!r}].limits")
    if "sha256" in m:
        want(m["sha256"], (str,), "sha256")
    return out


def verify_bundle(path: str | os.PathLike, manifest: dict | None = None) -> list[str]:
    """Check the manifest's own hash, re-hash every file it lists and look for files it does not list; return
    the problems found (empty = OK)."""
    path = Path(path)
    manifest = manifest if manifest is not None else read_manifest(path)
    problems = []
    if "sha256" not in manifest:
        problems.append("the manifest carries no sha256 of itself (exported by an older nvila-edge, or edited)")
    elif manifest["sha256"] != manifest_sha256(manifest):
        problems.append("the manifest was edited after export (its config, targets or hashes do not match its "
                        "sha256)")
    files = manifest.get("files", {})
    if not files:
        problems.append("the manifest lists no files")
    root = path.resolve()
    for rel, info in sorted(files.items()):
        f = (path / rel).resolve()
        if root not in f.parents:
            problems.append(f"{rel}: path escapes the bundle directory")
            continue
        if not f.is_file():
            problems.append(f"{rel}: missing")
            continue
        if f.stat().st_size != info.get("size"):
            problems.append(f"{rel}: size {f.stat().st_size} != {info.get('size')} in the manifest (truncated or replaced)")
            continue
        if sha256_file(f) != info.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch (modified after export)")
    listed = set(files) | {MANIFEST}
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if (f.is_file() or f.is_symlink()) and rel not in listed and rel != SIGNATURE:
            problems.append(f"{rel}: not listed in the manifest (added after export); remove it")
    for t, spec in manifest.get("targets", {}).items():
        for role, rel in spec.get("files", {}).items():
            if rel not in listed and not (path / rel).is_dir():
                problems.append(f"target {t} role {role}: {rel} is not a hashed file")
    return problems


@dataclass
class BundleWriter:
    """Write a bundle atomically::

        with BundleWriter(out, config, tokenizer) as w:
            p = w.path_for("cpu/vision.onnx")         # write the file there
            w.add_target("cpu", precision="int8/int4", files={"vision": "cpu/vision.onnx", ...}, io={...})

    Files are hashed when the block exits; the directory appears in one rename, or not at all.
    """

    out: str | os.PathLike
    config: NVILAConfig
    tokenizer: Any = None
    quantization: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    overwrite: bool = True
    sign_key: str | os.PathLike | None = None  # an Ed25519 private key: also write manifest.sig

    def __post_init__(self):
        self._ctx = None
        self.root: Path | None = None
        self.targets: dict[str, dict] = {}
        self.roles: dict[str, str] = {}

    def __enter__(self) -> "BundleWriter":
        self._ctx = atomic_directory(self.out, overwrite=self.overwrite)
        self.root = self._ctx.__enter__()
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(self.root / TOKENIZER_DIR)
        return self

    def path_for(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add_target(self, name: str, *, files: dict[str, str], precision: str | dict, **meta: Any) -> None:
        for role, rel in files.items():
            if not (self.root / rel).exists():
                raise BundleError(f"target {name}: the {role} file {rel} was not written")
        self.targets[name] = {"files": dict(files), "precision": precision, **meta}

    def _manifest(self) -> dict:
        files = {}
        for f in sorted(p for p in self.root.rglob("*") if p.is_file()):
            rel = f.relative_to(self.root).as_posix()
            if rel == MANIFEST:
                continue
            files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f), "role": self._role(rel)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "quantization": self.quantization,
            "producer": producer_versions(),
            "targets": self.targets,
            "tokenizer": TOKENIZER_DIR if (self.root / TOKENIZER_DIR).is_dir() else None,
            "files": files,
            **self.extra,
        }
        manifest["sha256"] = manifest_sha256(manifest)
        return manifest

    def _role(self, rel: str) -> str:
        for spec in self.targets.values():
            for role, r in spec["files"].items():
                if rel == r or rel.startswith(r.rstrip("/") + "/") or rel == r + ".data":
                    return role
        return "tokenizer" if rel.startswith(TOKENIZER_DIR + "/") else "other"

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                if not self.targets:
                    raise BundleError("no target was added to the bundle")
                text = json.dumps(self._manifest(), indent=2, sort_keys=True)
                (self.root / MANIFEST).write_text(text, encoding="utf-8")
                if self.sign_key is not None:
                    from .signing import sign_manifest

                    sign_manifest(self.root, self.sign_key)
        except BaseException as e:
            self._ctx.__exit__(type(e), e, e.__traceback__)
            raise
        return self._ctx.__exit__(exc_type, exc, tb)
