"""Shared pieces of the reliability tests: the corpus module, HTTP helpers, RSS, and table output."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent / "corpus"))
import make_corpus  # noqa: E402

SANITY = "what color is the circle"


def png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def post(url: str, body, path: str = "/v1/chat/completions", timeout: float = 120,
         headers: dict | None = None) -> tuple[int, dict | str]:
    """POST ``body`` (a dict → JSON, or raw bytes); returns (status, parsed JSON, the SSE text, or the raw text of
    a response that is neither)."""
    raw = body if isinstance(body, (bytes, bytearray)) else json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        if resp.getheader("content-type", "").startswith("text/event-stream"):
            return resp.status, data.decode()
        try:
            return resp.status, json.loads(data or b"{}")
        except ValueError:
            return resp.status, data.decode(errors="replace")
    finally:
        conn.close()


def error_message(payload) -> str:
    return payload.get("error", {}).get("message", "") if isinstance(payload, dict) else str(payload)


def server_paths_in(message: str, *roots) -> list[str]:
    """The server-side folders (temp, the Python install, the working folder, home, ``roots``) or traceback
    markers that ``message`` leaks."""
    import sys
    import tempfile

    found = [r for r in (tempfile.gettempdir(), sys.prefix, os.getcwd(), os.path.expanduser("~"), *map(str, roots))
             if r and r != "/" and r in message]
    return found + [m for m in ("Traceback", 'File "', "nvila-serve-") if m in message]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def report(name: str, text: str, capsys=None, base: Path | None = None) -> Path | None:
    """Show ``text`` in the test output even without ``-s`` and keep a copy: under ``base`` and, when
    ``NVILA_EDGE_RELIABILITY_OUT`` names a folder, there too (docs/RELIABILITY.md figures)."""
    if capsys is not None:
        with capsys.disabled():
            print("\n" + text)
    else:
        print("\n" + text)
    out = None
    for folder in (base, os.environ.get("NVILA_EDGE_RELIABILITY_OUT")):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            out = Path(folder) / name
            out.write_text(text + "\n", encoding="utf-8")
    return out


def write_bundle(path: Path, model, tokenizer) -> Path:
    from conftest import write_bundle as _write

    return _write(path, model, tokenizer)
