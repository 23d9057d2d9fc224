"""``nvila-edge serve``: a real uvicorn server on localhost, driven by the official ``openai`` client.

Answers equal ``Runtime.generate`` (greedy), streaming as OpenAI chunks with usage, typed errors as 4xx
(never a 500 for bad input), a bounded queue (429), a body limit (413), no path traversal, and a streaming
client that disconnects frees the runtime for the next request."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time

import pytest

from conftest import random_image

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from nvila_edge.apps.server import create_app, parse_chat_request  # noqa: E402
from nvila_edge.apps.server_cli import ServerThread  # noqa: E402

QUESTION = "What is in the image?"


def png_bytes(w=320, h=200, seed=0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(random_image(w, h, seed)).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_message(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="session")
def rt(tmp_path_factory, tiny_model, tokenizer):
    from conftest import write_bundle

    from nvila_edge.runtime import Runtime

    bundle = write_bundle(tmp_path_factory.mktemp("serve") / "bundle", tiny_model, tokenizer)
    return Runtime.load(bundle, backend="onnxruntime", threads=1)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "a.png").write_bytes(png_bytes(seed=3))
    (d.parent / "secret.png").write_bytes(png_bytes(seed=4))  # outside the media folder
    return d


@pytest.fixture(scope="session")
def server(rt, media_dir):
    srv = ServerThread(create_app(rt, media_dir=media_dir, max_request_bytes=256 << 10, max_images=2)).start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def raw_post(url: str, body: bytes, path="/v1/chat/completions", headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def test_models_and_health(client, server, rt):
    assert [m.id for m in client.models.list().data] == [rt.config.name]
    assert client.models.retrieve(rt.config.name).id == rt.config.name
    import urllib.request

    health = json.loads(urllib.request.urlopen(server.url + "/health", timeout=10).read())
    assert health["status"] == "ok" and health["model"] == rt.config.name
    assert health["queue"] == {"active": 0, "max": 8} and health["backend"]["context_length"] == rt.context_length


def test_chat_equals_generate(client, rt, one_thread):
    img = png_bytes()
    ref = rt.generate(QUESTION, images=[img], max_new_tokens=6)
    r = client.chat.completions.create(model=rt.config.name, messages=image_message(data_uri(img)), max_tokens=6)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.usage.prompt_tokens and r.usage.completion_tokens == ref.usage.completion_tokens
    assert r.usage.total_tokens == ref.usage.prompt_tokens + ref.usage.completion_tokens
    assert r.usage.model_extra["visual_tokens"] == ref.usage.visual_tokens > 0
    # max_completion_tokens is the newer spelling of max_tokens; a plain string content works too
    r2 = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hello"}],
                                        max_completion_tokens=3)
    assert r2.usage.completion_tokens <= 3 and r2.usage.model_extra["visual_tokens"] == 0


def test_streaming_chunks_and_usage(client, rt, one_thread):
    img = png_bytes(seed=1)
    ref = rt.generate(QUESTION, images=[img], max_new_tokens=8)
    stream = client.chat.completions.create(model=rt.config.name, messages=image_message(data_uri(img)), max_tokens=8,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_concurrent_requests_each_get_their_own_answer(client, rt, one_thread):
    """Several clients at once: each answers on its own KV cache, each gets its one-at-a-time greedy answer."""
    prompts = [("what color is the circle", None), (QUESTION, png_bytes(seed=5)), ("how many shapes", None)]
    refs = [rt.generate(p, images=[i] if i else None, max_new_tokens=5).text for p, i in prompts]
    out = [None] * len(prompts)

    def ask(k):
        p, img = prompts[k]
        msgs = image_message(data_uri(img), p) if img else [{"role": "user", "content": p}]
        out[k] = client.chat.completions.create(model="m", messages=msgs, max_tokens=5).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == refs


def test_file_urls_inside_media_dir_only(client, rt, media_dir, one_thread):
    ref = rt.generate(QUESTION, images=[str(media_dir / "a.png")], max_new_tokens=4)
    r = client.chat.completions.create(model="m", messages=image_message(f"file://{media_dir}/a.png"), max_tokens=4)
    assert r.choices[0].message.content == ref.text
    for url in (f"file://{media_dir}/../secret.png", f"file://{media_dir}/%2e%2e/secret.png", "file:///etc/passwd"):
        with pytest.raises(openai.PermissionDeniedError, match="outside"):
            client.chat.completions.create(model="m", messages=image_message(url), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="no such file"):
        client.chat.completions.create(model="m", messages=image_message(f"file://{media_dir}/nope.png"), max_tokens=2)


@pytest.mark.parametrize("case, match", [
    ("broken_image", "image"), ("unknown_part", "unsupported content part type 'input_audio'"),
    ("http_url", "remote URLs"), ("not_base64", "base64"), ("too_many_images", "at most 2"),
    ("bad_role", "role"), ("bad_max_tokens", "max_tokens"), ("n2", "n=2"), ("no_messages", "messages"),
])
def test_bad_requests_are_400(client, case, match):
    msgs = {
        "broken_image": image_message(data_uri(b"\x89PNG\r\n\x1a\nnot really a png")),
        "unknown_part": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}],
        "http_url": image_message("https://example.com/a.png"),
        "not_base64": image_message("data:image/png;base64,@@@"),
        "too_many_images": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png_bytes(32, 32))}}] * 3}],
        "bad_role": [{"role": "robot", "content": "hi"}],
    }.get(case, [{"role": "user", "content": "hi"}])
    extra = {"bad_max_tokens": {"max_tokens": 0}, "n2": {"n": 2}, "no_messages": {}}.get(case, {"max_tokens": 2})
    if case == "no_messages":
        msgs = []
    with pytest.raises(openai.BadRequestError, match=match) as e:
        client.chat.completions.create(model="m", messages=msgs, **extra)
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"


def test_context_overflow_is_400(client, rt):
    long = "what color is the circle " * (rt.context_length // 2)
    with pytest.raises(openai.BadRequestError, match="context limit") as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": long}], max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context limit"):  # and before any answer is streamed
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": long}], stream=True)


def test_raw_http_errors_and_keeps_serving(server, client):
    status, body = raw_post(server.url, b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = raw_post(server.url, b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (300 << 10)}]}).encode()
    status, body = raw_post(server.url, big)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as e:  # the same through the client
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "y" * (300 << 10)}])
    assert e.value.status_code == 413
    status, body = raw_post(server.url, b"", path="/v1/nothing")
    assert status == 404 and "error" in body
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "still there?"}], max_tokens=2)
    assert r.choices[0].message.content is not None


def test_video_data_uri(client, rt, tmp_path, one_thread):
    from _media_helpers import video_colours, write_video

    path = write_video(tmp_path / "clip", video_colours(16))
    mime = "video/mp4" if path.endswith(".mp4") else "video/x-msvideo"
    msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_uri(open(path, "rb").read(), mime)}},
                                         {"type": "text", "text": "What happens?"}]}]
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=4)
    ref = rt.generate("What happens?", video=path, max_new_tokens=4)
    assert r.choices[0].message.content == ref.text and r.usage.model_extra["visual_tokens"] == ref.usage.visual_tokens


def test_parts_become_placeholders_in_order():
    req = parse_chat_request({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare <image>"},
                                     {"type": "image_url", "image_url": {"url": data_uri(b"a")}},
                                     {"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": {"url": data_uri(b"b")}}]},
        {"role": "assistant", "content": None}], "stop": "\n", "seed": 3, "temperature": 0.5})
    # a literal "<image>" in client text is dropped: only parts carry media
    assert req.conversation[1]["content"] == "Compare <image>and<image>"
    assert req.images == [b"a", b"b"] and req.conversation[2] == {"role": "assistant", "content": ""}
    assert req.sampling["stop"] == ("\n",) and req.sampling["seed"] == 3 and req.sampling["temperature"] == 0.5


class SlowRuntime:
    """The real runtime with a delay per event; records when a stream starts and whether it was closed early."""

    def __init__(self, rt, delay: float):
        self.rt, self.delay = rt, delay
        self.started, self.done = threading.Event(), threading.Event()
        self.closed_early = False
        self.events = 0

    def __getattr__(self, name):
        return getattr(self.rt, name)

    def stream_planned(self, *args, **kwargs):
        return self._slow(self.rt.stream_planned(*args, **kwargs))

    def _slow(self, gen):
        self.started.set()
        try:
            for ev in gen:
                time.sleep(self.delay)
                self.events += 1
                yield ev
        except GeneratorExit:
            self.closed_early = True
            raise
        finally:
            gen.close()
            self.done.set()


@pytest.fixture()
def slow_server(rt):
    slow = SlowRuntime(rt, delay=0.15)
    with ServerThread(create_app(slow, max_queue=1)) as srv:
        yield srv, slow, openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_two_streams_interleave(rt, one_thread):
    """B's first token arrives before A's last (both on their own caches, step by step on the compute thread),
    and each stream equals its one-at-a-time answer."""
    prompts = ["what color is the circle", "how many shapes are there"]
    refs = [rt.generate(p, max_new_tokens=12, stop=()).text for p in prompts]
    slow = SlowRuntime(rt, delay=0.05)
    arrivals: dict[int, list[float]] = {0: [], 1: []}
    texts = ["", ""]
    with ServerThread(create_app(slow, max_queue=4)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)

        def ask(k):
            for c in client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompts[k]}],
                                                    max_tokens=12, stop=None, stream=True):
                if c.choices and c.choices[0].delta.content:
                    arrivals[k].append(time.monotonic())
                    texts[k] += c.choices[0].delta.content

        a = threading.Thread(target=ask, args=(0,))
        a.start()
        t0 = time.monotonic()
        while not arrivals[0] and time.monotonic() - t0 < 30:  # A is streaming
            time.sleep(0.01)
        b = threading.Thread(target=ask, args=(1,))
        b.start()
        a.join(60)
        b.join(60)
    assert texts == refs
    assert len(arrivals[0]) > 3 and arrivals[1] and arrivals[1][0] < arrivals[0][-1], arrivals


def test_queue_full_is_429(slow_server, one_thread):
    srv, slow, client = slow_server
    results = []
    t = threading.Thread(target=lambda: results.append(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=4)))
    t.start()
    assert slow.started.wait(30)
    with pytest.raises(openai.RateLimitError, match="busy") as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "me too"}], max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    t.join(60)
    assert results and results[0].usage.completion_tokens >= 1  # the request in flight was not disturbed
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "now?"}], max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_client_disconnect_stops_generation(slow_server, rt, one_thread):
    srv, slow, client = slow_server
    prompt = "what color is the circle"
    assert rt.generate(prompt, max_new_tokens=40, stop=()).usage.completion_tokens > 6  # long enough to cut
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=40, stream=True)
    it = iter(stream)
    for _ in range(3):
        next(it)
    stream.close()  # the client goes away mid-answer
    assert slow.done.wait(30) and slow.closed_early and slow.events < 40
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "next"}], max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_serve_cli(rt, monkeypatch, tmp_path):
    import argparse

    import uvicorn

    from nvila_edge.apps.server_cli import add_parser

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="verb"))
    a = p.parse_args(["serve", str(rt.bundle.path), "--port", "9000", "--media-dir", str(tmp_path), "--max-queue", "2",
                      "--max-request-mb", "1", "--threads", "1"])
    assert (a.host, a.port, a.max_queue, a.max_request_mb) == ("127.0.0.1", 9000, 2, 1.0)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert a.func(a) == 0  # loads the bundle and hands the app to uvicorn
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 9000) and seen["app"].state.engine.max_queue == 2
    paths = {r.path for r in seen["app"].routes}
    assert {"/v1/chat/completions", "/v1/models", "/health"} <= paths


def test_missing_fastapi_is_backend_unavailable(rt, monkeypatch):
    from nvila_edge.errors import BackendUnavailable

    monkeypatch.setitem(__import__("sys").modules, "fastapi", None)  # makes `import fastapi` fail
    with pytest.raises(BackendUnavailable, match=r"nvila-edge\[server\]"):
        create_app(rt)


def test_media_options_are_runtime_keywords():
    """The request's media options (declared once, chat_schema.MediaOptions) are Runtime.stream keywords."""
    import inspect

    from nvila_edge.apps.chat_schema import MediaOptions
    from nvila_edge.runtime import Runtime

    stream = inspect.signature(Runtime.stream).parameters
    assert set(MediaOptions.model_fields) <= set(stream)
    req = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "max_tiles": 3, "overflow": "drop_frames"})
    assert req.options == {"max_tiles": 3, "overflow": "drop_frames"}


def test_create_app_passes_the_vision_engine(monkeypatch, tmp_path):
    """``nvila-edge serve --vision-engine openvino`` reaches ``Runtime.load``."""
    from nvila_edge.apps.server_cli import add_parser
    from nvila_edge.runtime import Runtime

    seen = {}

    def fake_load(cls, bundle, **kw):
        seen.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(Runtime, "load", classmethod(fake_load))
    with pytest.raises(RuntimeError, match="stop here"):
        create_app(str(tmp_path), vision_engine="openvino")
    assert seen["vision_engine"] == "openvino"
    import argparse

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="verb"))
    assert p.parse_args(["serve", "B", "--vision-engine", "openvino"]).vision_engine == "openvino"
    assert p.parse_args(["serve", "B"]).vision_engine is None


def test_agent_and_server_share_one_runtime(rt, one_thread):
    """The Agent's worker thread and the server's compute thread drive one Runtime at once: ``Runtime.lock``
    keeps the backend to one call at a time, and both get their one-at-a-time answers."""
    from nvila_edge.apps.agent import Agent

    img = random_image(64, 48, seed=9)
    ref_agent = rt.generate("what is here?", images=[img], max_new_tokens=10, stop=()).text
    ref_http = rt.generate("what color is the circle", max_new_tokens=10, stop=()).text
    inside, most = [0], [0]
    guard = threading.Lock()
    real_prefill, real_decode = rt.backend.prefill, rt.backend.decode_step

    def counted(fn):
        def call(*a, **kw):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            try:
                time.sleep(0.002)  # widen the window in which an unserialised second caller would enter
                return fn(*a, **kw)
            finally:
                with guard:
                    inside[0] -= 1
        return call

    rt.backend.prefill, rt.backend.decode_step = counted(real_prefill), counted(real_decode)
    try:
        with ServerThread(create_app(rt, max_queue=4)) as srv, Agent(rt, cancel_previous=False) as agent:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
            futures = [agent.ask(img, "what is here?", max_new_tokens=10, stop=()) for _ in range(3)]
            answers = [client.chat.completions.create(model="m", messages=[{"role": "user", "content":
                       "what color is the circle"}], max_tokens=10).choices[0].message.content for _ in range(3)]
            agent_answers = [f.result(60).text for f in futures]
    finally:
        del rt.backend.prefill, rt.backend.decode_step
    assert answers == [ref_http] * 3 and agent_answers == [ref_agent] * 3
    assert most[0] == 1  # never two backend calls at once


def test_video_probe_is_bounded_by_seeks(tmp_path):
    """A container that declares 216 000 frames but holds 8: the loader finds the real count in O(log n) seeks
    (it used to walk back one frame per seek), and the deadline bounds the rest."""
    import sys
    from pathlib import Path

    import cv2

    sys.path.insert(0, str(Path(__file__).parent / "corpus"))
    from make_corpus import declare_frames, write_video

    from nvila_edge.media import video as vmod

    path = tmp_path / "long.avi"
    path.write_bytes(declare_frames(write_video(tmp_path / "v.avi").read_bytes(), 216_000))
    assert int(cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FRAME_COUNT)) == 216_000  # OpenCV believes it
    seeks = []
    real = vmod._check_deadline
    vmod._check_deadline = lambda d, w: seeks.append(1) or real(d, w)
    try:
        clip = vmod.load_video(str(path), 8)
    finally:
        vmod._check_deadline = real
    assert clip.frame_count == 8 and len(seeks) <= 2 * 18 + 8 + 2  # 2 log2(216 000) probes + 8 frames
    from nvila_edge.errors import MediaError

    old = vmod.DECODE_TIMEOUT_S
    vmod.DECODE_TIMEOUT_S = 0.0
    try:
        with pytest.raises(MediaError, match="took more than"):
            vmod.load_video(str(path), 8)
    finally:
        vmod.DECODE_TIMEOUT_S = old


def test_images_decode_within_the_pixel_budget(rt):
    """A large JPEG decodes downscaled (DCT scaling: never the full bitmap), a large PNG is reduced right after;
    both keep at least the budget; smaller images are untouched."""
    from PIL import Image

    from nvila_edge.media.image import load_image
    from nvila_edge.runtime.planner import decode_pixel_budget

    budget = decode_pixel_budget(rt.config)
    side = int((budget * 5) ** 0.5)
    big = Image.new("RGB", (side, side), (10, 200, 30))
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        big.save(buf, format=fmt)
        got = load_image(buf.getvalue(), budget_pixels=budget)
        assert budget <= got.size[0] * got.size[1] <= 4 * budget and got.mode == "RGB", (fmt, got.size)
        assert abs(got.size[0] - got.size[1]) <= 1
    assert load_image(png_bytes(), budget_pixels=budget).size == (320, 200)
    with pytest.raises(Exception, match="above the limit"):
        load_image(buf.getvalue(), max_pixels=side * side - 1)
