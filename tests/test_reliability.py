"""Reliability: every case of the generated bad-input corpus (``tests/corpus/make_corpus.py``) through the
processor, the runtime (tiny bundle, ONNX Runtime), the live-frame paths (camera frame validation, video
stream) and the OpenAI server: a typed ``nvila_edge.errors`` error with a useful message or the documented
handling, 4xx (never 5xx) over HTTP, and the process answers a normal request right after each bad one.

Also the faults: backend unavailable at load, a too-large request refused by the memory guard before any
tile is encoded, a cancelled streaming answer that frees the runtime, camera disconnect / reconnect.
Artifacts (safetensors only, tampered bundles, kill -9 mid-save) are in test_reliability_artifacts.py, the
server soak in test_reliability_soak.py."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from _reliability_helpers import (SANITY, data_uri, error_message, make_corpus, png, post, report, server_paths_in,
                                  table)
from conftest import random_image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from nvila_edge import errors  # noqa: E402
from nvila_edge.runtime import Runtime  # noqa: E402

MAX_NEW = 2


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model, tokenizer):
    from _reliability_helpers import write_bundle

    return write_bundle(tmp_path_factory.mktemp("rel") / "bundle", tiny_model, tokenizer)


@pytest.fixture(scope="module")
def rt(bundle):
    return Runtime.load(bundle, backend="onnxruntime", threads=1)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return make_corpus.build(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def server(rt, tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from nvila_edge.apps.server import create_app
    from nvila_edge.apps.server_cli import ServerThread

    media = tmp_path_factory.mktemp("media")
    (media / "a.png").write_bytes(png(random_image(40, 30, seed=1)))
    srv = ServerThread(create_app(rt, media_dir=media, max_images=64, max_queue=32)).start()
    srv.media = media
    yield srv
    srv.stop()


def outcome(fn) -> tuple[str, BaseException | None]:
    try:
        fn()
        return "handled", None
    except errors.NVILAEdgeError as e:
        return type(e).__name__, e
    except Exception as e:  # noqa: BLE001 - an untyped error is exactly what this test looks for
        return f"UNTYPED {type(e).__name__}", e


def test_corpus_has_at_least_30_cases_of_every_kind(cases, tmp_path):
    assert len(cases) >= 30 and len({c.name for c in cases}) == len(cases)
    assert {c.kind for c in cases} == {"image", "video", "prompt", "frame", "request"}
    for c in cases:
        if c.kind == "request":  # HTTP only: the status and the field are the outcome
            assert c.server and (c.server < 400 or c.expect == "RequestError"), c.name
            continue
        assert c.expect == make_corpus.HANDLED or issubclass(getattr(errors, c.expect), errors.NVILAEdgeError), c.name
    # the CLI writes the same corpus with a manifest
    assert make_corpus.main(["--out", str(tmp_path)]) == 0
    import json

    rows = json.loads((tmp_path / "cases.json").read_text())
    assert [r["name"] for r in rows] == [c.name for c in cases]
    assert all((tmp_path / r["path"]).is_file() for r in rows if "path" in r)


def _run_layers(c, rt) -> dict:
    """The case through the processor and the runtime (and for frames the camera / stream paths)."""
    if c.kind == "image":
        args = {"images": [c.path]}
    elif c.kind == "video":
        args = {"videos": [c.path]}
    elif c.kind == "prompt":
        args = {"images": c.images or None}
    else:
        args = {"images": [c.frame]}
    prompt = "what is this?" if c.kind == "frame" else c.prompt
    out = {
        "processor": outcome(lambda: rt.processor(prompt, **args)),
        "runtime": outcome(lambda: rt.generate(prompt, **args, max_new_tokens=MAX_NEW)),
    }
    if c.kind == "frame":
        from nvila_edge.apps.camera import validate_frame

        out["camera"] = outcome(lambda: validate_frame(c.frame))
        out["stream"] = outcome(lambda: rt.video_stream(fps=1).push(c.frame, 0.0))
    return out


def _server_body(c, media=None) -> dict | bytes | None:
    if c.kind == "frame":
        return None
    if c.kind == "request":
        if isinstance(c.body, dict):
            import json

            return json.dumps(c.body).replace("{media}", str(media)).encode()
        return c.body
    if c.kind in ("image", "video"):
        raw = c.path.read_bytes()
        kind = c.kind
        url = f"data:{kind}/{'png' if kind == 'image' else 'mp4'};base64," + data_uri(raw).split(",", 1)[1]
        parts = [{"type": f"{kind}_url", f"{kind}_url": {"url": url}}, {"type": "text", "text": c.prompt}]
        return {"messages": [{"role": "user", "content": parts}], "max_tokens": MAX_NEW}
    if isinstance(c.prompt, bytes):  # a JSON body whose text is not UTF-8
        return b'{"messages": [{"role": "user", "content": "' + c.prompt + b'"}], "max_tokens": 2}'
    if isinstance(c.prompt, list):
        return {"messages": c.prompt, "max_tokens": MAX_NEW}
    parts = [{"type": "image_url", "image_url": {"url": data_uri(png(im))}} for im in c.images]
    return {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": c.prompt}]}],
            "max_tokens": MAX_NEW}


def test_corpus_every_case_typed_or_handled_and_process_stays_usable(rt, cases, server, capsys, tmp_path_factory):
    ref = rt.generate(SANITY, max_new_tokens=3).text
    status, body = post(server.url, {"messages": [{"role": "user", "content": SANITY}], "max_tokens": 3})
    assert status == 200 and body["choices"][0]["message"]["content"] == ref
    rows, problems = [], []
    t_all = time.perf_counter()
    for c in cases:
        t0 = time.perf_counter()
        got = {} if c.kind == "request" else _run_layers(c, rt)
        for layer, (name, err) in got.items():
            want = c.expect
            if layer == "camera" and c.name == "frame_complex":
                want = "handled"  # validate_frame keeps the real part (camera.py); see docs/RELIABILITY.md
            if name != want:
                problems.append(f"{c.name} [{layer}]: expected {want}, got {name}: {err}")
            elif err is not None and layer != "camera" and not re.search(c.message, str(err), re.I):
                problems.append(f"{c.name} [{layer}]: message {str(err)!r:.200} does not match {c.message!r}")
            if c.check is not None and layer == "processor" and name == "handled":
                from nvila_edge.media.image import load_image

                c.check(load_image(c.path))
        # the runtime still answers, identically
        if got and rt.generate(SANITY, max_new_tokens=3).text != ref:
            problems.append(f"{c.name}: the runtime answers differently after this case")
        http = "-"
        body = _server_body(c, server.media)
        if body is not None:
            status, payload = post(server.url, body, headers=c.headers)
            want = c.server or (200 if c.expect == "handled" else 400)
            http = str(status)
            message = error_message(payload)
            if status >= 500 or status != want:
                problems.append(f"{c.name} [server]: HTTP {status} (want {want}): {message:.200}")
            elif status >= 400 and not re.search(c.message, message, re.I):
                problems.append(f"{c.name} [server]: message {message!r:.200} does not match {c.message!r}")
            elif status >= 400 and c.param and not str(payload["error"]["param"]).startswith(c.param):
                problems.append(f"{c.name} [server]: error names {payload['error']['param']!r}, not {c.param!r}")
            elif status == 200 and isinstance(payload, str) and ('"error"' in payload
                                                                 or not payload.rstrip().endswith("[DONE]")):
                problems.append(f"{c.name} [server]: the stream reports an error after its 200: {payload[-200:]}")
            leaks = server_paths_in(message, server.media, c.path.parent if c.path else "")
            if status >= 400 and leaks:
                problems.append(f"{c.name} [server]: the error shows server paths {leaks}: {message:.200}")
            s2, p2 = post(server.url, {"messages": [{"role": "user", "content": SANITY}], "max_tokens": 3})
            if s2 != 200 or p2["choices"][0]["message"]["content"] != ref:
                problems.append(f"{c.name}: the server does not answer normally after this case ({s2})")
        cells = [got[k][0] if k in got else "-" for k in ("processor", "runtime", "camera", "stream")]
        rows.append([c.name, c.kind, c.expect, *cells, http, f"{(time.perf_counter() - t0) * 1000:.0f}",
                     c.what])
    header = ["case", "kind", "expected", "processor", "runtime", "camera", "stream", "HTTP", "ms", "input"]
    n_typed = sum(c.expect != "handled" for c in cases)
    text = (f"bad-input corpus: {len(cases)} cases ({n_typed} typed errors, {len(cases) - n_typed} handled), "
            f"{time.perf_counter() - t_all:.1f} s; a normal request succeeded after every case\n"
            + table(rows, header))
    report("corpus_table.md", text, capsys, tmp_path_factory.getbasetemp())
    assert not problems, "\n".join(problems)


# ---- faults ---------------------------------------------------------------------------------------------
def test_backend_unavailable_at_load_names_the_extra(bundle, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorrt(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.split(".")[0] == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)  # also when tensorrt happens to be installed
    with pytest.raises(errors.BackendUnavailable, match=r"tensorrt.*pip install 'nvila-edge\[gpu\]'") as e:
        Runtime.load(bundle, backend="tensorrt")
    assert isinstance(e.value, ImportError) and e.value.extra == "gpu"
    with pytest.raises(errors.BundleError, match="unknown backend"):
        Runtime.load(bundle, backend="cuda-magic")


def test_too_large_request_is_refused_before_allocation(rt, server, monkeypatch):
    from nvila_edge.runtime.planner import MediaPlanner, estimate_activation_bytes

    img = random_image(640, 480)
    plan = rt.processor.plan_image(img.shape[1::-1])  # Dynamic-S2: several scales of tiles
    need = estimate_activation_bytes(rt.config, plan.num_tiles, plan.num_tokens)
    assert plan.num_tiles > 4 and need > 4 * estimate_activation_bytes(rt.config, 1, plan.num_tokens // plan.num_tiles)
    encoded = []
    real = rt.backend.encode_tiles
    monkeypatch.setattr(rt.backend, "encode_tiles", lambda px: encoded.append(px.shape[0]) or real(px))
    monkeypatch.setattr(rt.planner, "max_activation_bytes", need // 4)  # e.g. a device with little free memory
    with pytest.raises(errors.ResourceLimitError,
                       match=rf"estimated \d+ MiB.*\({plan.num_tiles} tiles.*NVILA_EDGE_MAX_ACTIVATION_MB"):
        rt.generate("what is here?", images=[img], max_new_tokens=2)
    assert isinstance(errors.ResourceLimitError("x"), MemoryError) and encoded == []  # nothing was encoded
    status, body = post(server.url, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(png(img))}}, {"type": "text", "text": "what?"}]}]})
    assert status == 400 and "activations" in error_message(body) and encoded == []
    # a request within the limit still works (two tokens: the length ends it, or an end token); the limit can
    # also come from the environment
    ok = rt.generate(SANITY, max_new_tokens=2)
    assert ok.finish_reason in ("length", "stop") and 1 <= ok.usage.completion_tokens <= 2
    monkeypatch.setattr(rt.planner, "max_activation_bytes", need)
    ok = rt.generate("what is here?", images=[img], max_new_tokens=2)
    assert ok.finish_reason in ("length", "stop") and ok.usage.visual_tokens == plan.num_tokens and encoded
    monkeypatch.setenv("NVILA_EDGE_MAX_ACTIVATION_MB", "1.5")
    assert MediaPlanner(rt.config, rt.tokenizer).max_activation_bytes == int(1.5 * 2**20)


def test_cancelled_stream_frees_the_runtime(rt):
    img = random_image(320, 200, seed=7)
    ref = rt.generate("What is in the image?", images=[img], max_new_tokens=12)
    for _ in range(3):
        gen = rt.stream("What is in the image?", images=[img], max_new_tokens=12)
        events = [next(gen) for _ in range(3)]  # the plan and two tokens, then the client goes away
        assert events[0].type == "plan"
        gen.close()
    again = rt.generate("What is in the image?", images=[img], max_new_tokens=12)
    assert again.text == ref.text and again.token_ids == ref.token_ids
    # a session turn cancelled mid-answer is not kept: the next turn answers as on a fresh session
    s = rt.session()
    gen = s.stream("What is in the image?", images=[img], max_new_tokens=12)
    next(gen), next(gen), next(gen)
    gen.close()
    assert s.generate("What is in the image?", images=[img], max_new_tokens=12).text == ref.text


def test_camera_disconnect_reconnect_keeps_the_video_stream_answering(rt):
    camera = pytest.importorskip("nvila_edge.apps.camera")
    sanity = rt.generate(SANITY, max_new_tokens=3).text
    good = [np.full((48, 64, 3), v, np.uint8) for v in (20, 90, 160, 230)]
    bad = np.full((48, 64, 3), np.nan, np.float32)
    scripts = [[good[0], good[1], None], [bad, good[2], good[3]]]  # lost after two frames; one NaN frame later
    opens = []

    from conftest import FakeCapture as Cap  # one scripted capture for the camera tests

    def factory(target, api):
        opens.append(target)
        if len(opens) == 2:
            return None  # the first reconnect attempt fails (camera still unplugged)
        return Cap(scripts.pop(0)) if scripts else None

    events = []
    cam = camera.CameraSource("rtsp://robot/cam", capture_factory=factory, queue_size=16, backoff_s=0.01,
                              max_retries=2, on_event=events.append).start()
    vs = rt.video_stream(fps=1, window_s=8)
    frames = list(cam)
    for i, f in enumerate(frames):
        vs.push(f.rgb, float(i))
    kinds = [e.kind for e in events]
    assert len(frames) == 4 and cam.stats.reconnects == 1 and cam.stats.rejected == 1 and cam.stats.open_failures >= 1
    assert "lost" in kinds and "retry" in kinds and "reconnected" in kinds
    r = vs.generate("what happens?", max_new_tokens=3)
    assert r.finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1 and r.plan.visual_tokens > 0
    # and the runtime serves other requests, with the answer it gave before the camera ran
    assert rt.generate(SANITY, max_new_tokens=3).text == sanity
