"""The browser pages in a real headless Chromium (the system's ``chromium``, driven by Playwright; nothing is
downloaded): the chat page of ``serve --ui`` and the live camera page of ``camera --web``, on a tiny bundle
and a synthetic video. Also the security rules (API key, loopback default, CSP) and bad input from the page
showing the server's typed error.

Set ``NVILA_EDGE_SCREENSHOTS=1`` to write the README's screenshots (docs/web_chat.png, docs/web_camera.png);
otherwise they go to a temp folder (a test run leaves the checkout as it was)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import random_image

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from nvila_edge.apps.server import create_app  # noqa: E402
from nvila_edge.apps.server_cli import ServerThread  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
QUESTION = "What is in the image?"
# the closed network here: no background fetches, no sandbox (containers), fake camera for getUserMedia
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--use-fake-device-for-media-stream",
                 "--use-fake-ui-for-media-stream"]
TIMEOUT_MS = 60_000


def find_chromium() -> str | None:
    exe = os.environ.get("NVILA_EDGE_CHROMIUM")
    if exe:
        return exe if os.path.isfile(exe) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module (a fresh temp profile: Playwright's own)."""
    exe = find_chromium()
    required = os.environ.get("NVILA_EDGE_REQUIRE_BROWSER") == "1"  # .ci/run: installed, so they must run
    if exe is None:
        reason = "no Chromium found: `apt-get install chromium` (or set NVILA_EDGE_CHROMIUM=/path/to/chrome)"
        pytest.fail(reason) if required else pytest.skip(reason)
    try:
        from playwright import sync_api
    except ImportError:
        reason = "needs playwright (the [dev] extra: pip install -e '.[dev]')"
        pytest.fail(reason) if required else pytest.skip(reason)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    """A fresh page that fails the test on any script error or CSP violation it logs."""
    pg = browser.new_page(viewport={"width": 1000, "height": 760})
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and "status of 4" not in m.text else None)
    yield pg
    pg.close()
    assert not errors, errors


def expect():
    from playwright.sync_api import expect as _expect

    _expect.set_options(timeout=TIMEOUT_MS)  # its own default is 5 s: too short on 2 busy cores
    return _expect


def wait_js(page, expression: str, timeout_s: float = TIMEOUT_MS / 1000) -> None:
    """Poll ``expression`` until truthy (``page.wait_for_function`` evaluates strings, which the page's CSP
    rightly forbids; ``page.evaluate`` goes through the debugger protocol)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.05)


def screenshot_path(tmp_path: Path, name: str) -> Path:
    return DOCS / name if os.environ.get("NVILA_EDGE_SCREENSHOTS") == "1" else tmp_path / name


def png_file(path: Path, w=160, h=120, seed=0) -> Path:
    from PIL import Image

    Image.fromarray(random_image(w, h, seed)).save(path, format="PNG")
    return path


@pytest.fixture(scope="module")
def rt(tmp_path_factory, tiny_model, tokenizer):
    from conftest import write_bundle

    from nvila_edge.runtime import Runtime

    bundle = write_bundle(tmp_path_factory.mktemp("web") / "bundle", tiny_model, tokenizer)
    with Runtime.load(bundle, backend="onnxruntime", threads=1) as r:
        yield r


class Paced:
    """``rt`` with a pause before each event (so the page can press Stop mid-answer); records a close."""

    def __init__(self, rt, pause_s: float):
        self.rt, self.pause_s, self.closed = rt, pause_s, threading.Event()

    def __getattr__(self, name):
        return getattr(self.rt, name)

    def stream_planned(self, *args, **kwargs):
        events = self.rt.stream_planned(*args, **kwargs)  # the server plans first: media errors come before this

        def paced():
            try:
                for ev in events:
                    time.sleep(self.pause_s)
                    yield ev
            except GeneratorExit:
                self.closed.set()
                raise
            finally:
                events.close()

        return paced()


@pytest.fixture(scope="module")
def chat(rt):
    paced = Paced(rt, pause_s=0.0)
    app = create_app(paced, ui=True, max_request_bytes=300 << 10, max_images=4)
    with ServerThread(app) as srv:
        yield srv, paced


def get_json(url: str, path: str, headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def send(page, text: str = "", files=(), max_tokens: int = 6) -> None:
    page.fill("#max-tokens", str(max_tokens))
    if files:
        page.set_input_files("#file", [str(f) for f in files])
    page.fill("#prompt", text)
    page.click("#send")


# ---- the chat page ------------------------------------------------------------------------------------------
@pytest.mark.browser
def test_chat_page_answers_an_image_and_a_camera_frame(chat, rt, page, tmp_path, one_thread):
    srv, _ = chat
    img = png_file(tmp_path / "cat.png")
    ref = rt.generate(QUESTION, images=[img.read_bytes()], max_new_tokens=6)
    page.goto(srv.url + "/")
    expect()(page.locator("#model")).to_have_text(rt.config.name)
    send(page, QUESTION, files=[img])
    first = page.locator(".msg.assistant").nth(0)
    expect()(first.locator(".stats")).to_contain_text("visual tokens")  # streamed to its end
    assert first.locator(".text").inner_text() == ref.text  # the page shows the server's greedy answer
    assert page.locator(".msg.user img.thumb").count() == 1

    # the browser's own camera (Chromium's fake device): capture a frame, ask about it in the same chat
    page.click("#camera")
    wait_js(page, "document.getElementById('preview').videoWidth > 0")
    page.click("#capture")
    expect()(page.locator("#attachments img")).to_have_count(1)
    frame_url = page.locator("#attachments img").get_attribute("src")
    assert frame_url.startswith("data:image/jpeg;base64,")
    send(page, "And this one?")
    second = page.locator(".msg.assistant").nth(1)
    expect()(second.locator(".stats")).to_contain_text("visual tokens")
    page.click("#camera-off")
    # the second answer saw the whole history: the same multi-turn request through the API gives the same text
    frame = base64.b64decode(frame_url.split(",", 1)[1])
    conv = [{"role": "user", "content": "<image>" + QUESTION}, {"role": "assistant", "content": ref.text},
            {"role": "user", "content": "<image>And this one?"}]
    assert second.locator(".text").inner_text() == rt.generate(conv, images=[img.read_bytes(), frame],
                                                               max_new_tokens=6).text
    page.screenshot(path=str(screenshot_path(tmp_path, "web_chat.png")), full_page=True)


@pytest.mark.browser
def test_chat_stop_cancels_the_answer_on_the_server(chat, rt, page, one_thread):
    srv, paced = chat
    prompt = "what color is the circle"
    assert rt.generate(prompt, max_new_tokens=40, stop=()).usage.completion_tokens > 8  # long enough to cut
    paced.pause_s, paced.closed = 0.25, threading.Event()
    try:
        page.goto(srv.url + "/")
        send(page, prompt, max_tokens=40)
        answer = page.locator(".msg.assistant").nth(0)
        expect()(answer.locator(".text")).not_to_have_text("")  # streaming has begun
        page.click("#stop")
        expect()(answer.locator(".stats")).to_contain_text("stopped")
        assert paced.closed.wait(10)  # the server closed the answer's generator...
        deadline = time.monotonic() + 10
        while json.loads(get_json(srv.url, "/health")[2])["queue"]["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(get_json(srv.url, "/health")[2])["queue"]["active"] == 0  # ...and freed its slot
    finally:
        paced.pause_s = 0.0
    send(page, "next", max_tokens=3)  # the page and the server go on
    expect()(page.locator(".msg.assistant").nth(1).locator(".stats")).to_contain_text("tokens")


@pytest.mark.browser
def test_chat_bad_input_shows_the_servers_error(chat, page, tmp_path):
    srv, _ = chat
    page.goto(srv.url + "/")
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(6 << 20))  # far over the server's 300 KiB body limit (a real photo)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    for f, message in ((big, "larger than the limit"), (notes, "needs a image/* data URI, got 'text/plain'"),
                       (broken, "video")):
        send(page, "what is this?", files=[f])
        err = page.locator(".msg.error").last
        expect()(err).to_contain_text(message)
        expect()(page.locator("#attachments .attachment")).to_have_count(1)  # handed back, to remove
        page.click("#attachments .attachment button")
    assert page.locator(".msg.assistant").count() == 0 and page.locator(".msg.user").count() == 0  # turns taken back
    from _media_helpers import video_colours, write_video

    clip = write_video(tmp_path / "clip", video_colours(8))  # and a good video file is answered
    send(page, "What happens?", files=[clip], max_tokens=3)
    expect()(page.locator(".msg.assistant .stats")).to_contain_text("visual tokens")
    assert page.locator(".msg.user .dim").inner_text().startswith("[video: clip.")
    # the page's fetch reaches no file:// path the API refuses, and no file outside the static folder
    status = page.evaluate("""async () => (await fetch('/v1/chat/completions', {method: 'POST',
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify({messages: [{role: 'user',
        content: [{type: 'image_url', image_url: {url: 'file:///etc/passwd'}}]}]})})).status""")
    assert status == 403
    assert get_json(srv.url, "/static/../server.py")[0] == 404
    assert get_json(srv.url, "/static/%2e%2e/server.py")[0] == 404


@pytest.mark.browser
def test_api_key_page_asks_for_it_and_the_api_refuses_without(rt, page):
    status, headers, body = None, None, None
    with ServerThread(create_app(rt, ui=True, api_key="s3cret")) as srv:
        status, headers, body = get_json(srv.url, "/v1/models")
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert get_json(srv.url, "/v1/models", {"Authorization": "Bearer nope"})[0] == 401
        assert get_json(srv.url, "/v1/models", {"Authorization": "Bearer s3cret"})[0] == 200
        status, headers, _ = get_json(srv.url, "/")  # the page itself loads, then asks for the key
        csp = headers["content-security-policy"]
        assert status == 200 and "script-src 'self'" in csp and "default-src 'none'" in csp
        page.goto(srv.url + "/")
        expect()(page.locator("#keybar")).to_be_visible()
        page.fill("#key", "nope")
        page.click("#keyform button")
        expect()(page.locator("#keybar")).to_be_visible()  # a wrong key is refused too
        page.fill("#key", "s3cret")
        page.click("#keyform button")
        expect()(page.locator("#model")).to_have_text(rt.config.name)
        send(page, "hello", max_tokens=3)
        expect()(page.locator(".msg.assistant .stats")).to_contain_text("tokens")


def test_loopback_unless_a_key_is_set():
    from nvila_edge.apps.web.security import check_bind, is_loopback
    from nvila_edge.errors import ConfigError

    for host in ("127.0.0.1", "::1", "localhost", "[::1]"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "192.168.1.5", "camera.local"):
        with pytest.raises(ConfigError, match="--api-key"):
            check_bind(host, None)
        check_bind(host, "k")


def test_no_key_means_loopback_host_headers_and_same_origin_posts(chat):
    srv, _ = chat
    assert get_json(srv.url, "/health", {"Host": "evil.example:80"})[0] == 403  # DNS rebinding
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body=b"{}", headers={"Origin": "http://evil.example"})
        resp = conn.getresponse()
        assert resp.status == 403 and json.loads(resp.read())["error"]["code"] == "origin_refused"
    finally:
        conn.close()


# ---- the camera page ----------------------------------------------------------------------------------------
class SyntheticCapture:
    """A video "file" at 20 FPS whose frames the test controls: a moving dot until ``bad`` (one frame of the
    wrong size, which the source rejects) and ``end`` (end of file)."""

    def __init__(self):
        self.n, self.bad, self.end = 0, threading.Event(), threading.Event()

    def isOpened(self):
        return True

    def get(self, prop):
        return 20.0  # CAP_PROP_FPS: paced like a live camera

    def read(self):
        import numpy as np

        if self.end.is_set():
            return False, None
        if self.bad.is_set():
            self.bad.clear()
            return True, np.zeros((8, 8, 3), np.uint8)
        self.n += 1
        f = np.full((120, 160, 3), 40, np.uint8)
        x = 10 + (self.n * 3) % 140
        f[50:70, x:x + 20] = (0, 0, 255)  # BGR: red
        return True, f

    def release(self):
        pass


@pytest.mark.browser
def test_camera_page_streams_frames_and_answers(rt, browser, page, tmp_path, one_thread):
    from nvila_edge.apps.camera_app import CameraApp
    from nvila_edge.apps.web.camera_page import CameraHub, create_camera_app

    capture = SyntheticCapture()
    hub = CameraHub()
    cam = CameraApp(rt, "synthetic.mp4", "What colour is it?", every=0.3, max_new_tokens=6, on_update=hub.publish,
                    on_frame=hub.on_frame, log=io.StringIO(), capture_factory=lambda target, api: capture)
    loop = threading.Thread(target=cam.run, daemon=True)
    with ServerThread(create_camera_app(cam, hub)) as srv:
        page.goto(srv.url + "/")
        loop.start()
        second = browser.new_page()  # a second viewer sees the same stream
        second.set_default_timeout(TIMEOUT_MS)
        second.goto(srv.url + "/")
        for pg in (page, second):
            wait_js(pg, "Number(document.getElementById('frame').dataset.frames || 0) >= 3")
        wait_js(page, "document.querySelectorAll('#answers li').length >= 2")
        li = page.locator("#answers li").first
        for what in ("TTFT", "tok/s", "tiles"):
            expect()(li).to_contain_text(what)

        page.fill("#every", "-1")  # a bad value: the server's typed 400 shows under the form
        page.click("#settings button[type=submit]")
        expect()(page.locator("#settings-msg.error")).to_contain_text("every")
        page.fill("#every", "0.3")
        page.fill("#question", "Is it dark?")
        page.click("#settings button[type=submit]")
        expect()(page.locator("#settings-msg")).to_contain_text('applied: the next question is "Is it dark?"')
        for pg in (page, second):  # the next answer (on every viewer) is about the new question
            pg.wait_for_selector("#answers li[data-question='Is it dark?']")
        page.screenshot(path=str(screenshot_path(tmp_path, "web_camera.png")), full_page=True)

        capture.bad.set()  # a bad frame: a message, and the stream goes on
        expect()(page.locator("#frame-msg")).to_contain_text("bad frame skipped")
        capture.end.set()  # the source stops: the page says so and stays alive (last frame, answers, settings)
        expect()(page.locator("#frame-msg")).to_contain_text("the source ended")
        loop.join(30)
        assert not loop.is_alive() and len(cam.report.answers) >= 3 and cam.report.camera["rejected"] == 1
        page.click("#ask")
        expect()(page.locator("#settings-msg.error")).to_contain_text("nothing to ask about")
        second.close()


def test_camera_web_cli_refuses_an_open_host_without_a_key(tmp_path):
    import argparse

    from nvila_edge.apps.camera_app import add_parser
    from nvila_edge.errors import ConfigError

    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers(dest="verb"))
    a = p.parse_args(["camera", str(tmp_path / "no-bundle"), "--source", "0", "--web", "--host", "0.0.0.0"])
    assert (a.web, a.port, a.question) == (True, 8080, None)
    with pytest.raises(ConfigError, match="--api-key"):  # before any bundle is loaded
        a.func(a)
    a = p.parse_args(["camera", str(tmp_path / "no-bundle"), "--source", "0"])
    with pytest.raises(ConfigError, match="--question"):
        a.func(a)
