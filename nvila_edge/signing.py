"""Bundle signatures: Ed25519 over ``manifest.json`` (``cryptography``, the ``sign`` extra).

The manifest holds the sha256 of every file and a sha256 of itself (its config, targets and limits included), so
a signature over its bytes covers every byte the runtime reads. Hashes catch accidents (a flipped bit, a truncated
copy); only a signature catches a deliberate edit, by someone who can rewrite the hashes too::

    openssl genpkey -algorithm ed25519 -out key.pem && openssl pkey -in key.pem -pubout -out key.pub
    nvila-edge export CALIBRATED -o BUNDLE --sign key.pem     # writes BUNDLE/manifest.sig
    nvila-edge verify BUNDLE --key key.pub                     # exit 2 unless the signature matches

(OpenSSF ``model-signing`` 1.1.1 installs beside our dependencies but does not import without pyOpenSSL, which
nothing declares; one Ed25519 signature needs only ``cryptography``.)
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from .errors import BundleError

SIGNATURE = "manifest.sig"


def _crypto():
    from .optional import require

    require("cryptography", "sign", "signing / verifying bundles")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


def generate_key(path: str | os.PathLike) -> Path:
    """Write a new Ed25519 private key (PEM, PKCS#8) to ``path`` and its public key to ``path`` + ``.pub``."""
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    path = Path(path)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    Path(str(path) + ".pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def _load(path: str | os.PathLike, private: bool):
    serialization, ed25519 = _crypto()
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read the key {path}: {e.strerror}") from None
    try:
        if private:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            try:
                key = serialization.load_pem_public_key(data)
            except ValueError:  # a private key verifies too (its public half)
                key = serialization.load_pem_private_key(data, password=None).public_key()
    except (ValueError, TypeError) as e:
        raise BundleError(f"{path} is not an unencrypted PEM Ed25519 key ({e}); make one with "
                          "`openssl genpkey -algorithm ed25519 -out key.pem`") from None
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, want):
        raise BundleError(f"{path} is a {type(key).__name__}, not an Ed25519 key")
    return key


def sign_manifest(bundle_dir: str | os.PathLike, key_path: str | os.PathLike) -> Path:
    """Sign ``bundle_dir/manifest.json`` with the private key at ``key_path``; writes ``manifest.sig``."""
    from .io import atomic_write_bytes

    d = Path(bundle_dir)
    sig = _load(key_path, private=True).sign((d / "manifest.json").read_bytes())
    atomic_write_bytes(d / SIGNATURE, base64.b64encode(sig) + b"\n")
    return d / SIGNATURE


def verify_signature(bundle_dir: str | os.PathLike, key_path: str | os.PathLike) -> None:
    """Raise ``BundleError`` unless ``manifest.sig`` is a valid signature of ``manifest.json`` by ``key_path``."""
    from cryptography.exceptions import InvalidSignature

    key = _load(key_path, private=False)
    d = Path(bundle_dir)
    if not (d / SIGNATURE).is_file():
        raise BundleError(f"bundle {d} is not signed (no {SIGNATURE}); export it with --sign KEY")
    try:
        sig = base64.b64decode((d / SIGNATURE).read_bytes().strip(), validate=True)
        key.verify(sig, (d / "manifest.json").read_bytes())
    except (InvalidSignature, ValueError):
        raise BundleError(f"bundle {d}: the signature does not match manifest.json for the key {key_path} "
                          "(edited after signing, or signed by another key)") from None
