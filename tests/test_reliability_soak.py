"""Server soak on localhost at its queue limit: 200 requests, 8 clients, ``max_queue=8``, valid and hostile mixed
(tiny bundle, ONNX Runtime). Valid requests all get 200 with the answer they get one at a time, invalid ones their
4xx, never a 5xx (a 429 is retried, as a client does); ``file://`` parts cannot read outside the media folder;
the server runs under ``max_memory_mb`` and its peak RSS, sampled every 20 ms, stays under it; the RSS before /
after must stay flat; the queue and the memory reservations are empty afterwards."""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from _reliability_helpers import SANITY, data_uri, error_message, png, post, report, rss_mb, table
from conftest import random_image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from nvila_edge.runtime import Runtime  # noqa: E402

N_REQUESTS = int(os.environ.get("NVILA_EDGE_SOAK_REQUESTS", 200))  # a longer soak: set it higher
CONCURRENCY = 8
RSS_GROWTH_LIMIT_MB = 200
# max_memory_mb = the RSS after loading + this: the figure the peak must stay under. The test's clients share the
# process (their bodies, threads and allocator arenas count too); the server's share is the reservations.
HEADROOM_MB = 1536


@pytest.fixture(scope="module")
def rt(tmp_path_factory, tiny_model, tokenizer):
    from _reliability_helpers import write_bundle

    bundle = write_bundle(tmp_path_factory.mktemp("soak") / "bundle", tiny_model, tokenizer)
    return Runtime.load(bundle, backend="onnxruntime", threads=1)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("soak-media")
    inside = root / "media"
    inside.mkdir()
    (inside / "a.png").write_bytes(png(random_image(96, 64, seed=3)))
    (root / "secret.png").write_bytes(png(random_image(96, 64, seed=4)))  # outside the media folder

    os.symlink(root / "secret.png", inside / "link.png")  # a symlink inside that points outside
    return inside


@pytest.fixture(scope="module")
def server(rt, media):
    from nvila_edge.apps.server import create_app
    from nvila_edge.apps.server_cli import ServerThread

    from nvila_edge.apps.server import rss_bytes

    limit_mb = rss_bytes() / 2**20 + HEADROOM_MB
    app = create_app(rt, media_dir=media, max_queue=CONCURRENCY, max_images=4, max_request_bytes=4 << 20,
                     max_memory_mb=limit_mb)
    srv = ServerThread(app).start()
    srv.limit_mb = limit_mb
    yield srv
    srv.stop()


def _user(parts_or_text, **kw) -> dict:
    return {"messages": [{"role": "user", "content": parts_or_text}], "max_tokens": 4, **kw}


def _image(url: str, text: str = "what is this?") -> list:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


def _big_jpeg(side: int) -> str:
    import io

    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    buf = io.BytesIO()
    Image.fromarray(np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], -1).astype(np.uint8)).save(
        buf, format="JPEG", quality=40)
    return data_uri(buf.getvalue(), "image/jpeg")


def request_mix(media) -> list[tuple[str, object, int]]:
    """(name, body (dict or raw bytes), expected status): 12 valid and 20 invalid kinds. (The video that
    declares two hours is in the corpus, not here: OpenCV's demuxer keeps ~15 MB per open of it.)"""
    small = data_uri(png(random_image(96, 64, seed=1)))
    secret = media.parent / "secret.png"
    return [
        ("valid: temperature 1e-300 (greedy)", _user(SANITY, temperature=1e-300), 200),
        ("valid: all sampling extremes, stream", _user(SANITY, temperature=1e-300, top_p=1e-300, top_k=1,
                                                       repetition_penalty=0.01, stream=True), 200),
        ("valid: 6000x6000 JPEG", _user(_image(_big_jpeg(6000)), max_tiles=1), 200),
        ("invalid: NUL in a file URL", _user(_image(f"file://{media}/a\x00.png")), 400),
        ("invalid: penalty 1e-300", _user(SANITY, repetition_penalty=1e-300), 400),
        ("invalid: broken video data URI", _user([{"type": "video_url", "video_url": {"url": data_uri(
            b"RIFF" + b"\x00" * 600, "video/x-msvideo")}}, {"type": "text", "text": "what?"}]), 400),
        ("valid: text", _user(SANITY), 200),
        ("valid: image, 1 tile", _user(_image(small), max_tiles=1), 200),
        ("valid: image, Dynamic-S2", _user(_image(small)), 200),
        ("valid: stream", _user(SANITY, stream=True, stream_options={"include_usage": True}), 200),
        ("valid: file:// in media dir", _user(_image(f"file://{media}/a.png"), max_tiles=1), 200),
        ("valid: system + 2 turns", {"messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "how many shapes"},
                                                  {"role": "assistant", "content": "two"},
                                                  {"role": "user", "content": "what color"}], "max_tokens": 4}, 200),
        ("valid: sampling + seed", _user(SANITY, temperature=0.8, top_p=0.9, seed=7), 200),
        ("valid: stop string", _user(SANITY, stop=["\n"]), 200),
        ("valid: empty text", _user(""), 200),
        ("invalid: body not JSON", b"{not json", 400),
        ("invalid: garbage image", _user(_image(data_uri(b"\x00garbage" * 50))), 400),
        ("invalid: traversal ..", _user(_image(f"file://{media}/../secret.png")), 403),
        ("invalid: traversal %2e%2e", _user(_image(f"file://{media}/%2e%2e/secret.png")), 403),
        ("invalid: symlink out", _user(_image(f"file://{media}/link.png")), 403),
        ("invalid: absolute outside", _user(_image(f"file://{secret}")), 403),
        ("invalid: /etc/passwd", _user(_image("file:///etc/passwd")), 403),
        ("invalid: file://host/", _user(_image("file://evil.example/etc/passwd")), 400),
        ("invalid: http URL", _user(_image("http://127.0.0.1:1/x.png")), 400),
        ("invalid: NaN temperature", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
        ("invalid: 5 images (max 4)", _user([p for _ in range(5) for p in _image(small)][::2]), 400),
        ("invalid: unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, 400),
        ("invalid: over the context", _user("red green blue " * 20_000), 400),
        ("invalid: body > 4 MiB", _user("x" * (5 << 20)), 413),
        ("invalid: no messages", {"messages": []}, 400),
        ("invalid: non-UTF-8 body", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ]


def _answer(payload) -> str:
    if isinstance(payload, str):  # SSE: the streamed text
        chunks = [json.loads(line[6:]) for line in payload.splitlines() if line.startswith("data: {")]
        return "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))
    return payload["choices"][0]["message"]["content"]


def _send(url: str, spec, refs: dict | None = None) -> tuple[str, int, int, float, str]:
    """One request, retried on 429 (queue or memory full) as a client would; the detail is what went wrong."""
    name, body, want = spec
    t0 = time.perf_counter()
    retries = 0
    while True:
        try:
            status, payload = post(url, body)
        except Exception as e:  # noqa: BLE001 - a dropped connection is a failure to report, not to raise here
            return name, -1, want, time.perf_counter() - t0, f"{type(e).__name__}: {e}", retries
        if status != 429 or retries >= 200:
            break
        retries += 1
        time.sleep(0.05)
    ms = (time.perf_counter() - t0) * 1000
    if status == 200 and isinstance(payload, str) and (not payload.rstrip().endswith("data: [DONE]")
                                                       or '"error"' in payload):
        detail = "stream did not end cleanly with [DONE]"
    elif status == 200:
        answer = _answer(payload)
        detail = "" if refs is None or refs.get(name) == answer else f"answer {answer!r} != alone {refs.get(name)!r}"
    else:
        detail = error_message(payload)
        detail = "" if status == want else detail
    return name, status, want, ms, detail, retries


def test_soak_200_requests_8_concurrent_at_the_queue_limit(rt, server, media, capsys, tmp_path_factory):
    import threading

    ref = rt.generate(SANITY, max_new_tokens=4).text
    mix = request_mix(media)
    specs = [mix[i % len(mix)] for i in range(N_REQUESTS)]
    refs = {}
    for spec in mix:  # one at a time (also the warm-up: imports, ORT arenas, allocator pools)
        status, payload = post(server.url, spec[1])
        assert status == spec[2], (spec[0], status, error_message(payload))
        if status == 200:
            refs[spec[0]] = _answer(payload)
    with ThreadPoolExecutor(CONCURRENCY) as pool:  # and two concurrent passes: the threads' allocator arenas
        list(pool.map(lambda s: _send(server.url, s), mix + mix))
    gc.collect()
    rss_before = rss_mb()
    peak, stop = [rss_before], threading.Event()

    def sample():
        while not stop.wait(0.02):
            peak[0] = max(peak[0], rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    results, rss_series = [], []
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for i in range(0, N_REQUESTS, 50):  # RSS every 50 requests: growth that keeps going would show here
            results += list(pool.map(lambda s: _send(server.url, s, refs), specs[i:i + 50]))
            rss_series.append(round(rss_mb()))
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    gc.collect()
    rss_after = rss_mb()

    wrong = [r for r in results if r[1] != r[2] or r[4]]
    five = [r for r in results if r[1] >= 500 or r[1] < 0]
    valid = [r for r in results if r[2] == 200]
    lat = sorted(r[3] for r in valid)
    status, body = post(server.url, _user(SANITY))
    assert status == 200 and body["choices"][0]["message"]["content"] == ref  # same greedy answer after the soak
    health = json.loads(urllib.request.urlopen(server.url + "/health", timeout=10).read())

    by_kind = Counter((r[0], r[1]) for r in results)
    rows = [[name, str(want), ", ".join(f"{s}×{n}" for (k, s), n in sorted(by_kind.items()) if k == name)]
            for name, _, want in mix]
    figures = (f"server soak: {N_REQUESTS} requests, {CONCURRENCY} concurrent, {len(valid)} valid / "
               f"{N_REQUESTS - len(valid)} invalid, {wall:.1f} s ({N_REQUESTS / wall:.1f} req/s); "
               f"5xx: {len(five)}; unexpected status: {len(wrong)}; valid latency p50 "
               f"{statistics.median(lat):.0f} ms, p95 {lat[int(0.95 * (len(lat) - 1))]:.0f} ms; "
               f"RSS before {rss_before:.0f} MB, after {rss_after:.0f} MB ({rss_after - rss_before:+.0f} MB; every 50 "
               f"requests: {rss_series} MB), peak {peak[0]:.0f} MB under the enforced limit {server.limit_mb:.0f} MB; "
               f"429s retried: {sum(r[5] for r in results)}; answers equal to one-at-a-time: "
               f"{sum(1 for r in valid if r[1] == 200 and not r[4])}/{len(valid)}; "
               f"queue after: {health['queue']}, reserved after: {health['memory']['reserved_mb']} MB")
    report("soak.md", figures + "\n" + table(rows, ["request", "expected", "got (status×count)"]), capsys,
           tmp_path_factory.getbasetemp())
    assert not five, five[:5]
    assert not wrong, wrong[:5]
    assert health["queue"]["active"] == 0 and health["memory"]["reserved_mb"] == 0
    assert peak[0] < server.limit_mb, (peak[0], server.limit_mb)
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB, (rss_before, rss_after)
