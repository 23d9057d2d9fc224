"""Generate the bad-input corpus (nothing is downloaded): broken / odd images and videos, hostile prompts and
bad camera frames, each with the outcome the SDK promises.

    python tests/corpus/make_corpus.py --out /tmp/corpus     # files + cases.json (the expected outcomes)

``build(out)`` returns the ``Case`` list used by ``tests/test_reliability.py``. An expected outcome is either
the name of a typed ``nvila_edge.errors`` class (whose message must match ``message``) or ``"handled"``: the
documented conversion (CMYK / 16-bit / palette / alpha → 8-bit RGB, EXIF orientation applied, ...), checked
by ``check`` on the decoded RGB image.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

HANDLED = "handled"


@dataclass
class Case:
    name: str
    kind: str  # "image" | "video" | "prompt" | "frame" | "request" (HTTP only)
    expect: str  # an nvila_edge.errors class name, or "handled"
    what: str  # one line: what is wrong with the input
    path: Path | None = None  # image / video file (kind image / video)
    prompt: Any = "What is in the image?"  # str, bytes (non-UTF-8) or a conversation
    images: list = field(default_factory=list)  # extra images of a prompt case
    frame: np.ndarray | None = None  # kind frame
    message: str = ""  # regex the error message must match (it says what was wrong)
    check: Callable | None = None  # handled image cases: check(PIL RGB image)
    server: int | None = None  # expected HTTP status when it differs from the typed-error rule (4xx / 200)
    body: Any = None  # kind request: the HTTP body (a dict sent as JSON, or raw bytes); "{media}" = the media folder
    param: str | None = None  # kind request, a 4xx: the field the error must name
    headers: dict = field(default_factory=dict)  # kind request: extra HTTP headers

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "expect": self.expect, "what": self.what, "message": self.message}
        if self.path is not None:
            d["path"] = self.path.name
        if self.server is not None:
            d["server"] = self.server
        if self.param is not None:
            d["param"] = self.param
        return d


# ---- helpers ------------------------------------------------------------------------------------------
def _rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(img, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring width x height (1e10 pixels) with a few bytes of data: decoding it would
    need ~30 GB; it must be refused from the header by the pixel limit."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def declare_frames(avi: bytes, n: int) -> bytes:
    """``avi`` with its main header's ``dwTotalFrames`` and its stream header's ``dwLength`` set to ``n``: a file
    that says it is far longer than it is (OpenCV trusts the count)."""
    b = bytearray(avi)
    at = b.find(b"avih")
    struct.pack_into("<I", b, at + 8 + 16, n)  # MainAVIHeader.dwTotalFrames
    at = b.find(b"strh")
    struct.pack_into("<I", b, at + 8 + 32, n)  # AVIStreamHeader.dwLength
    return bytes(b)


def write_video(path: Path, n: int = 8, size=(64, 48), fourcc: str = "MJPG", fps: float = 8.0) -> Path:
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    for i in range(n):
        frame = np.full((size[1], size[0], 3), (i * 30) % 256, np.uint8)
        cv2.rectangle(frame, (i * 4, 8), (i * 4 + 12, 20), (0, 0, 255), -1)
        w.write(frame)
    w.release()
    return path


def _size(w, h):
    def check(img):
        assert img.mode == "RGB" and img.size == (w, h), (img.mode, img.size)
    return check


def _grey_value(v):
    def check(img):
        a = np.asarray(img)
        assert img.mode == "RGB" and abs(int(a[0, 0, 0]) - v) <= 1, a[0, 0]
    return check


# ---- the corpus -----------------------------------------------------------------------------------------
def build(out: str | Path) -> list[Case]:
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def img(name, expect, what, data: bytes | None = None, pil=None, message="", check=None, server=None, **kw):
        p = out / name
        if pil is not None:
            _save(pil, p, **kw)
        else:
            p.write_bytes(data)
        cases.append(Case(name.replace(".", "_"), "image", expect, what, p, message=message, check=check, server=server))

    good = Image.fromarray(_rgb(64, 48))
    png = io.BytesIO()
    good.save(png, format="PNG")
    png = png.getvalue()
    jpg = io.BytesIO()
    good.save(jpg, format="JPEG", quality=90)
    jpg = jpg.getvalue()
    vid = write_video(out / "_good.avi").read_bytes()

    # decode failures
    img("img_zero_bytes.jpg", "MediaError", "0-byte file", b"", message=r"empty|0 bytes", server=400)
    img("img_garbage.png", "MediaError", "random bytes named .png",
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), message="cannot decode")
    img("img_truncated.png", "MediaError", "PNG cut at half its length", png[: len(png) // 2], message="cannot decode")
    img("img_truncated.jpg", "MediaError", "JPEG cut at half its length", jpg[: len(jpg) // 2], message="cannot decode")
    img("img_header_only.png", "MediaError", "PNG signature and nothing else", png[:8], message="cannot decode")
    img("img_text_as.png", "MediaError", "a text file named .png", b"hello, I am not an image\n" * 20,
        message="cannot decode")
    img("img_video_as.jpg", "MediaError", "an AVI video passed as an image", vid, message="cannot decode")
    img("img_bomb.png", "MediaError", "PNG header declaring 100000x100000 px (decompression bomb)", bomb_png(),
        message=r"pixels|too large")
    # documented conversions
    img("img_png_named.jpg", HANDLED, "PNG content with a .jpg extension (content decides)", png, check=_size(64, 48))
    img("img_cmyk.jpg", HANDLED, "CMYK JPEG → RGB", pil=good.convert("CMYK"), check=_size(64, 48))
    img("img_16bit.png", HANDLED, "16-bit greyscale PNG → 8-bit RGB (÷257)",
        pil=Image.fromarray(np.full((40, 30), 257 * 200, np.uint16)), check=_grey_value(200))
    img("img_float.tiff", HANDLED, "32-bit float TIFF (mode F) → min/max-scaled RGB",
        pil=Image.fromarray(np.linspace(0, 1, 1200, dtype=np.float32).reshape(30, 40)), check=_size(40, 30))
    img("img_palette.png", HANDLED, "palette (P) PNG → RGB", pil=good.convert("P"), check=_size(64, 48))
    pal = good.convert("P")
    pal.info["transparency"] = 0
    img("img_palette_transparency.png", HANDLED, "palette PNG with a transparent index → RGB", pil=pal,
        check=_size(64, 48))
    rgba = np.dstack([_rgb(64, 48), np.zeros((48, 64), np.uint8)])
    img("img_rgba_transparent.png", HANDLED, "fully transparent RGBA → RGB (alpha dropped, as the reference)",
        pil=Image.fromarray(rgba, "RGBA"), check=_size(64, 48))
    img("img_grey_alpha.png", HANDLED, "grey + alpha (LA) → RGB", pil=good.convert("LA"), check=_size(64, 48))
    img("img_1bit.png", HANDLED, "1-bit black/white → RGB", pil=good.convert("1"), check=_size(64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    img("img_exif_rotated.jpg", HANDLED, "EXIF orientation 6: stored 64x48, shown 48x64", pil=good,
        check=_size(48, 64), exif=exif.tobytes())
    img("img_exif_broken.jpg", HANDLED, "JPEG with a garbage EXIF block (ignored)", pil=good, check=_size(64, 48),
        exif=b"Exif\x00\x00" + b"\xff" * 40)
    img("img_strip_1x10000.png", HANDLED, "1x10000 px strip (extreme aspect ratio)",
        pil=Image.fromarray(_rgb(1, 10000)), check=_size(1, 10000))
    img("img_strip_10000x1.png", HANDLED, "10000x1 px strip", pil=Image.fromarray(_rgb(10000, 1)), check=_size(10000, 1))
    img("img_1x1.gif", HANDLED, "1x1 GIF", pil=Image.fromarray(_rgb(1, 1)), check=_size(1, 1))

    # videos
    def video(name, expect, what, data: bytes | None = None, message="", server=None, make=None):
        p = out / name
        if make is not None:
            make(p)
        else:
            p.write_bytes(data)
        cases.append(Case(name.replace(".", "_"), "video", expect, what, p, prompt="What happens in the video?",
                          message=message, server=server))

    video("vid_zero_bytes.mp4", "MediaError", "0-byte video file", b"", message=r"empty|0 bytes", server=400)
    video("vid_garbage.mp4", "MediaError", "random bytes named .mp4",
          np.random.default_rng(2).integers(0, 256, 8192, dtype=np.uint8).tobytes(), message="video")
    video("vid_text_as.mp4", "MediaError", "a text file named .mp4", b"not a video\n" * 100, message="video")
    video("vid_zero_frames.avi", "MediaError", "a valid AVI container with 0 frames",
          make=lambda p: write_video(p, n=0), message=r"no (decodable )?frames|cannot open")
    video("vid_truncated.avi", "MediaError", "AVI cut after its header (no frame data, no index)",
          vid[:600], message=r"video|frames")
    broken = bytearray(vid)
    at = broken.rfind(b"idx1")
    broken[at + 8:] = b"\xff" * (len(broken) - at - 8)  # garbage offsets in the index
    video("vid_broken_index.avi", HANDLED, "AVI whose idx1 index is garbage (frames re-found by scanning)",
          bytes(broken))
    video("vid_avi_named.mp4", HANDLED, "MJPG AVI content with a .mp4 extension", vid)
    video("vid_declares_2h.avi", HANDLED, "AVI whose headers declare 216 000 frames (2 h at 30 fps) but hold 8",
          declare_frames(vid, 216_000))
    video("vid_declares_2h_broken.avi", "MediaError", "AVI declaring 216 000 frames whose frame data is garbage",
          declare_frames(vid[:700] + b"\x00" * (len(vid) - 700), 216_000), message=r"video|frames")

    # prompts
    def prompt(name, expect, what, p, images=(), message="", server=None):
        cases.append(Case(name, "prompt", expect, what, prompt=p, images=list(images), message=message, server=server))

    small = _rgb(32, 32, 3)
    prompt("prompt_empty", HANDLED, "empty user text (the template still has a system turn)", "")
    prompt("prompt_whitespace", HANDLED, "only whitespace and newlines", " \n\t \n")
    prompt("prompt_nul_and_controls", HANDLED, "NUL and control characters in the text", "what\x00 is\x07 this\x1b[0m?")
    prompt("prompt_overlong", "ContextOverflowError", "a 60 000-word prompt (above the 8192-token context)",
           "red green blue " * 20_000, message="context limit")
    prompt("prompt_too_many_images", "ContextOverflowError", "40 images: 40 x 257 visual tokens above the context",
           "describe them", images=[_rgb(32, 32, i) for i in range(40)], message="visual tokens")
    prompt("prompt_non_utf8_bytes", "GenerationError", "the prompt is raw non-UTF-8 bytes (b'\\xff\\xfe\\x80')",
           b"\xff\xfe\x80 what?", message=r"UTF-8|text", server=400)
    prompt("prompt_lone_surrogate", "GenerationError", "a lone UTF-16 surrogate (\\ud800) in the text",
           "what is \ud800 this?", message=r"UTF-8|surrogate|encod", server=400)
    prompt("prompt_placeholder_mismatch", "MediaError", "two <image> placeholders but one image",
           "<image><image> compare", images=[small], message="placeholder", server=200)  # the server drops them
    prompt("prompt_bad_role", "GenerationError", "a conversation turn with an unknown role",
           [{"role": "robot", "content": "hi"}], message="role", server=400)
    prompt("prompt_not_text", "GenerationError", "the prompt is a number, not text or a conversation", 12345,
           message=r"conversation|str|text", server=400)

    # camera frames (numpy arrays from a camera driver)
    def frame(name, arr, what, message=""):
        cases.append(Case(name, "frame", "MediaError", what, frame=arr, message=message))

    nan = np.full((48, 64, 3), 0.5, np.float32)
    nan[3, 3, 1] = np.nan
    frame("frame_nan", nan, "float frame with a NaN pixel", message=r"NaN|finite|uint8")
    inf = np.full((48, 64, 3), 0.5, np.float32)
    inf[0, 0, 0] = np.inf
    frame("frame_inf", inf, "float frame with an infinite pixel", message=r"infinite|finite|uint8")
    frame("frame_5_channels", np.zeros((48, 64, 5), np.uint8), "HxWx5 frame", message="shape")
    frame("frame_1d", np.zeros(48 * 64 * 3, np.uint8), "flat 1-D buffer", message="shape")
    frame("frame_4d_batch", np.zeros((2, 48, 64, 3), np.uint8), "a batch of frames (4-D) instead of one",
          message="shape")
    frame("frame_empty", np.zeros((0, 64, 3), np.uint8), "0-row frame", message="shape")
    frame("frame_object_dtype", np.full((48, 64, 3), None, object), "object-dtype frame", message=r"dtype|uint8")
    frame("frame_complex", np.zeros((48, 64, 3), np.complex64), "complex-valued frame", message=r"dtype|uint8")
    cases += request_cases()
    return cases


def request_cases() -> list[Case]:
    """HTTP requests a client can send: every one ends 2xx or a 4xx naming its field (``param``), never 5xx."""
    cases: list[Case] = []

    def req(name, what, body, status, param=None, message="", headers=None):
        cases.append(Case(name, "request", "handled" if status < 400 else "RequestError", what, body=body,
                          server=status, param=param, message=message, headers=headers or {}))

    def chat(**kw):
        return {"messages": [{"role": "user", "content": "what color is the circle"}], "max_tokens": 3, **kw}

    def image(url):
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "what?"}]}], "max_tokens": 2}

    # 1. sampling values at the edges of what the schema admits: an answer (greedy is the limit of
    #    temperature → 0), or a 400 naming the field; streamed, no in-band error after the 200
    for v in (5e-324, 1e-300, 1e-12, 1e-5):
        req(f"req_temperature_{v:g}", f"temperature={v:g} (→ greedy)", chat(temperature=v), 200)
    req("req_temperature_1e308", "temperature=1e308 (→ uniform)", chat(temperature=1e308, seed=1), 200)
    req("req_temperature_tiny_stream", "temperature=1e-300, streamed", chat(temperature=1e-300, stream=True), 200)
    for v in (5e-324, 1e-300):
        req(f"req_top_p_{v:g}", f"top_p={v:g} with sampling (one token kept)", chat(temperature=1.0, top_p=v, seed=2),
            200)
    req("req_top_p_0", "top_p=0", chat(temperature=1.0, top_p=0), 400, "top_p")
    req("req_top_p_above_1", "top_p=1.0000001", chat(top_p=1.0000001), 400, "top_p")
    req("req_penalty_min", "repetition_penalty=0.01 (the lowest admitted)", chat(temperature=0.7, repetition_penalty=0.01,
                                                                                  seed=3), 200)
    req("req_penalty_max_stream", "repetition_penalty=100, streamed", chat(repetition_penalty=100, stream=True), 200)
    for v in (5e-324, 1e-300, 0.0, -1.0, 1e300):
        req(f"req_penalty_{v:g}", f"repetition_penalty={v:g}", chat(repetition_penalty=v), 400, "repetition_penalty")
    req("req_penalty_tiny_stream", "repetition_penalty=1e-300, streamed", chat(repetition_penalty=1e-300, stream=True),
        400, "repetition_penalty")
    req("req_top_k_huge", "top_k=10**30 (above the vocabulary: off)", chat(temperature=0.5, top_k=10**30, seed=4), 200)
    req("req_seed_int64_max", "seed=2**63-1", chat(temperature=0.5, seed=2**63 - 1), 200)
    req("req_seed_2_64", "seed=2**64 (beyond 64 bits)", chat(temperature=0.5, seed=2**64), 400, "seed")
    req("req_max_tokens_huge", "max_tokens=10**30 (the context bounds it)", chat(max_tokens=10**30, stop=["."]), 200)
    req("req_all_extremes_stream", "temperature 1e-300, top_p 1e-300, top_k 1, penalty 0.01, streamed",
        chat(temperature=1e-300, top_p=1e-300, top_k=1, repetition_penalty=0.01, stream=True), 200)
    req("req_temperature_nan", "temperature NaN (non-standard JSON)",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature")
    req("req_max_tokens_1e400", "max_tokens 1e400 (overflows to inf)",
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', 400, "max_tokens")
    req("req_seed_negative", "seed=-1", chat(seed=-1), 400, "seed")
    req("req_top_p_string", "top_p='high'", chat(top_p="high"), 400, "top_p")
    req("req_stop_number", "stop=3", chat(stop=3), 400, "stop")
    req("req_num_frames_huge", "num_frames=100000", chat(num_frames=100000), 400, "num_frames")
    # file URLs a filesystem cannot hold: NUL bytes, bad %-escapes, huge names, relative paths
    req("req_file_url_nul", "a NUL byte in a file URL", image("file://{media}/a\x00.png"), 400,
        "messages[0].content[0]", "NUL")
    req("req_file_url_nul_escaped", "%00 in a file URL", image("file://{media}/a%00.png"), 400,
        "messages[0].content[0]", "NUL")
    req("req_file_url_bad_escape", "%ff (not UTF-8) in a file URL", image("file://{media}/%ff%fe.png"), 400,
        "messages[0].content[0]", "UTF-8")
    req("req_file_url_long", "a 100 000-character file name", image("file://{media}/" + "a" * 100_000 + ".png"), 400,
        "messages[0].content[0]")
    req("req_file_url_relative", "file:a.png (no absolute path)", image("file:a.png"), 400, "messages[0].content[0]")
    req("req_file_url_folder", "a file URL naming the media folder itself", image("file://{media}/"), 400,
        "messages[0].content[0]", "no such file")
    # bodies of every wrong shape (were tests/test_server.py's list)
    for i, raw in enumerate([
        b'{"messages": [{"role": "user", "content": 7}]}',
        b'{"messages": [{"role": "user", "content": ["text"]}]}',
        b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]}',
        b'{"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]}',
        b'{"messages": {"role": "user"}}',
        b'{"messages": [{"role": "tool", "content": "x"}]}',
    ]):
        req(f"req_shape_{i}", f"wrong shape: {raw.decode()[:60]}", raw, 400, "messages")
    req("req_image_text_mime", "an image part with a text/plain data URI",
        image("data:text/plain;base64,AA=="), 400, "messages[0].content[0]")
    req("req_garbage_body", "binary garbage body", b"\xff\xfe garbage", 400)
    req("req_deep_json", "100 000 nested '['", b"[" * 100_000, 400)
    # 5. header limits
    req("req_header_100kb", "one 100 kB header", chat(), 431, headers={"X-Junk": "a" * 100_000})
    req("req_headers_200", "200 small headers", chat(), 431, headers={f"X-H{i}": "v" for i in range(200)})
    return cases


# ---- damaged bundles: (name, what, damage(bundle_dir), regex of the BundleError) ---------------------------
def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _manifest_edit(fn, rehash: bool = False):
    """Edit manifest.json; ``rehash``: and recompute its own sha256 (an edit made with intent, not by accident)."""
    def edit(root: Path) -> None:
        from nvila_edge.bundle import manifest_sha256

        m = json.loads((root / "manifest.json").read_text())
        fn(m)
        if rehash and isinstance(m, dict):
            m["sha256"] = manifest_sha256(m)
        (root / "manifest.json").write_text(json.dumps(m))
    return edit


def _add(rel: str, data: bytes):
    def add(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return add


def _config_set(key: str, value):
    return lambda m: m["config"]["llm"].update({key: value})


def bundle_cases() -> list[tuple[str, str, Callable, str]]:
    """Bundle damage ``nvila-edge verify`` and ``Runtime.load`` refuse with ``BundleError`` (exit 2)."""
    return [
        ("bundle_byte_flipped", "byte flipped in decoder.onnx", lambda r: _flip_byte(r / "cpu" / "decoder.onnx"),
         r"sha256 mismatch"),
        ("bundle_truncated", "vision.onnx truncated", lambda r: _truncate(r / "cpu" / "vision.onnx"), r"truncated"),
        ("bundle_file_deleted", "embeddings deleted", lambda r: (r / "cpu" / "embeddings.safetensors").unlink(),
         r"missing"),
        ("bundle_tokenizer_tampered", "tokenizer.json replaced",
         lambda r: (r / "tokenizer" / "tokenizer.json").write_text("{}"), r"size|sha256"),
        ("bundle_version_newer", "format version 99 (newer)", _manifest_edit(lambda m: m.update(format_version=99)),
         r"newer.*upgrade"),
        ("bundle_version_string", "format version is a string",
         _manifest_edit(lambda m: m.update(format_version="1")), r"positive integer.*damaged"),
        ("bundle_manifest_not_json", "manifest not JSON", lambda r: (r / "manifest.json").write_bytes(b"\xff{no"),
         r"not valid JSON"),
        ("bundle_manifest_missing", "manifest missing", lambda r: (r / "manifest.json").unlink(), r"no manifest.json"),
        ("bundle_path_escapes", "a listed path escapes the bundle",
         _manifest_edit(lambda m: m["files"].update({"../../etc/passwd": {"size": 1}})), r"escapes"),
        ("bundle_files_emptied", "hash list emptied", _manifest_edit(lambda m: m.update(files={})), r"lists no files"),
        # 3. every byte the runtime reads is covered: the config, extra files, a manifest of the wrong shape
        ("bundle_config_context_edited", "config.llm.context_length edited (hashes untouched)",
         _manifest_edit(_config_set("context_length", 65536)), r"edited after export"),
        ("bundle_limits_edited", "a target's limits edited", _manifest_edit(
            lambda m: m["targets"]["cpu"].update(limits={"context_length": 10**6})), r"edited after export"),
        ("bundle_self_hash_removed", "the manifest's own sha256 removed", _manifest_edit(lambda m: m.pop("sha256")),
         r"no sha256"),
        ("bundle_extra_py", "an extra .py module beside the graphs", _add("cpu/sitecustomize.py", b"import os\n"),
         r"not listed"),
        ("bundle_extra_onnx_data", "an extra .onnx.data file", _add("cpu/vision.onnx.data", b"\0" * 64),
         r"not listed"),
        ("bundle_extra_tokenizer_file", "an extra file in tokenizer/", _add("tokenizer/added_tokens.json", b"{}"),
         r"not listed"),
        ("bundle_files_list", "files is a list", _manifest_edit(lambda m: m.update(files=list(m["files"]))),
         r"malformed.*files must be dict"),
        ("bundle_file_entry_string", "a files entry is a string",
         _manifest_edit(lambda m: m["files"].update({k: "x" for k in list(m["files"])[:1]})), r"malformed.*files\["),
        ("bundle_size_string", "a file's size is a string", _manifest_edit(
            lambda m: next(iter(m["files"].values())).update(size="12")), r"malformed.*size must be int"),
        ("bundle_targets_list", "targets is a list", _manifest_edit(lambda m: m.update(targets=["cpu"])),
         r"malformed.*targets must be dict"),
        ("bundle_target_files_list", "a target's files is a list",
         _manifest_edit(lambda m: m["targets"]["cpu"].update(files=["cpu/vision.onnx"])),
         r"malformed.*targets\['cpu'\]\.files must be dict"),
        ("bundle_config_list", "config is a list", _manifest_edit(lambda m: m.update(config=[1, 2])),
         r"malformed.*config must be dict"),
        ("bundle_limits_string", "a target's limits is a string",
         _manifest_edit(lambda m: m["targets"]["cpu"].update(limits="none")), r"malformed.*limits must be dict"),
        ("bundle_config_wrong_type_rehashed", "config.llm is a list, manifest re-hashed",
         _manifest_edit(lambda m: m["config"].update(llm=[1]), rehash=True), r"not a valid model config"),
        ("bundle_manifest_list", "the manifest is a JSON list", lambda r: (r / "manifest.json").write_text("[1]"),
         r"lacks format_version"),
    ]


def write_manifest(cases: list[Case], out: Path) -> Path:
    """``cases.json`` plus the in-memory payloads as files (frames .npy, prompts .txt / .bin)."""
    rows = []
    for c in cases:
        d = c.to_dict()
        if c.frame is not None:
            np.save(out / f"{c.name}.npy", c.frame, allow_pickle=c.frame.dtype == object)
            d["path"] = f"{c.name}.npy"
        elif c.kind == "request":
            name = f"{c.name}.json" if isinstance(c.body, dict) else f"{c.name}.bin"
            raw = json.dumps(c.body).encode() if isinstance(c.body, dict) else c.body
            (out / name).write_bytes(raw)
            d["path"] = name
        elif c.kind == "prompt":
            name = f"{c.name}.{'bin' if isinstance(c.prompt, bytes) else 'txt'}"
            raw = c.prompt if isinstance(c.prompt, bytes) else json.dumps(c.prompt).encode()
            (out / name).write_bytes(raw)
            d["path"] = name
        rows.append(d)
    mf = out / "cases.json"
    mf.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return mf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder to write the corpus into")
    args = ap.parse_args(argv)
    out = Path(args.out)
    cases = build(out)
    write_manifest(cases, out)
    kinds = {k: sum(c.kind == k for c in cases) for k in ("image", "video", "prompt", "frame", "request")}
    print(f"{len(cases)} cases in {out} ({', '.join(f'{v} {k}' for k, v in kinds.items())}); see {out / 'cases.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
