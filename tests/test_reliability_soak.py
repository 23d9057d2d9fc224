"""Server soak on localhost: 200 requests, 8 at a time, valid and invalid mixed (tiny bundle, ONNX Runtime).
Valid requests all get 200 (greedy answers equal ``Runtime.generate``), invalid ones their 4xx, never a 5xx;
``file://`` parts cannot read outside the media folder (``..``, %-encoded ``..``, symlinks, absolute paths);
the RSS before / after is reported and must stay flat; the queue is empty afterwards."""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from _reliability_helpers import SANITY, data_uri, error_message, png, post, report, rss_mb, table
from conftest import random_image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from nvila_edge.runtime import Runtime  # noqa: E402

N_REQUESTS = int(os.environ.get("NVILA_EDGE_SOAK_REQUESTS", 200))  # a longer soak: set it higher
CONCURRENCY, WARMUP = 8, 25  # warm-up: one pass of the mix
RSS_GROWTH_LIMIT_MB = 200


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

    app = create_app(rt, media_dir=media, max_queue=32, max_images=4, max_request_bytes=1 << 20)
    srv = ServerThread(app).start()
    yield srv
    srv.stop()


def _user(parts_or_text, **kw) -> dict:
    return {"messages": [{"role": "user", "content": parts_or_text}], "max_tokens": 4, **kw}


def _image(url: str, text: str = "what is this?") -> list:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


def request_mix(media) -> list[tuple[str, object, int]]:
    """(name, body (dict or raw bytes), expected status): 9 valid and 16 invalid kinds."""
    small = data_uri(png(random_image(96, 64, seed=1)))
    secret = media.parent / "secret.png"
    return [
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
        ("invalid: body > 1 MiB", _user("x" * (2 << 20)), 413),
        ("invalid: no messages", {"messages": []}, 400),
        ("invalid: non-UTF-8 body", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ]


def _send(url: str, spec) -> tuple[str, int, int, float, str]:
    name, body, want = spec
    t0 = time.perf_counter()
    try:
        status, payload = post(url, body)
    except Exception as e:  # noqa: BLE001 - a dropped connection is a failure to report, not to raise here
        return name, -1, want, time.perf_counter() - t0, f"{type(e).__name__}: {e}"
    ms = (time.perf_counter() - t0) * 1000
    if status == 200 and isinstance(payload, str):  # SSE
        detail = "" if payload.rstrip().endswith("data: [DONE]") else "stream did not end with [DONE]"
    elif status == 200:
        detail = "" if payload["choices"][0]["message"]["content"] is not None else "no content"
    else:
        detail = error_message(payload)
    return name, status, want, ms, detail


def test_soak_200_requests_8_concurrent(rt, server, media, capsys, tmp_path_factory):
    ref = rt.generate(SANITY, max_new_tokens=4).text
    mix = request_mix(media)
    specs = [mix[i % len(mix)] for i in range(N_REQUESTS)]
    with ThreadPoolExecutor(CONCURRENCY) as pool:  # warm-up: imports, ORT arenas, allocator pools
        list(pool.map(lambda s: _send(server.url, s), [mix[i % len(mix)] for i in range(WARMUP)]))
    gc.collect()
    rss_before = rss_mb()
    t0 = time.perf_counter()
    results, rss_series = [], []
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for i in range(0, N_REQUESTS, 50):  # RSS every 50 requests: growth that keeps going would show here
            results += list(pool.map(lambda s: _send(server.url, s), specs[i:i + 50]))
            rss_series.append(round(rss_mb()))
    wall = time.perf_counter() - t0
    gc.collect()
    rss_after = rss_mb()

    wrong = [r for r in results if r[1] != r[2] or (r[1] == 200 and r[4])]
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
               f"requests: {rss_series} MB); "
               f"queue after: {health['queue']}")
    report("soak.md", figures + "\n" + table(rows, ["request", "expected", "got (status×count)"]), capsys,
           tmp_path_factory.getbasetemp())
    assert not five, five[:5]
    assert not wrong, wrong[:5]
    assert health["queue"]["active"] == 0
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB, (rss_before, rss_after)
