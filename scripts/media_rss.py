"""Server RSS with huge media, on a tiny bundle (docs/RELIABILITY.md, "Huge media"): ``python scripts/media_rss.py [OUT]``.

Builds a tiny bundle (the tests' tiny model), a 13 000 x 13 000 PNG and JPEG and an AVI whose headers declare 216 000
frames in OUT (default /tmp/nvila-media-rss), then runs ``nvila-edge serve`` twice (defaults, ``--max-memory-mb 900``)
and prints each request's status and the server's peak RSS (VmHWM).
"""
import json, os, subprocess, sys, threading, time, http.client
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "corpus"))
import numpy as np
from PIL import Image

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/nvila-media-rss"); media = out / "media"
media.mkdir(parents=True, exist_ok=True)
bundle = out / "bundle"
if not bundle.exists():
    from conftest import _corpus, make_model, write_bundle
    from nvila_edge import NVILAConfig
    from nvila_edge.tokenizer import NVILATokenizer
    write_bundle(bundle, make_model(NVILAConfig.from_preset("tiny")), NVILATokenizer.train(_corpus()))
if not (media / "huge.png").exists():
    Image.new("RGB", (13000, 13000), (40, 90, 200)).save(media / "huge.png")
    Image.new("RGB", (13000, 13000), (40, 90, 200)).save(media / "huge.jpg", quality=50)
    from make_corpus import declare_frames, write_video
    (media / "long.avi").write_bytes(declare_frames(write_video(out / "v.avi").read_bytes(), 216_000))

def serve(port, extra):
    p = subprocess.Popen([sys.executable, "-m", "nvila_edge.cli", "serve", str(bundle), "--port", str(port),
                          "--media-dir", str(media), "--max-queue", "8", "--threads", "1", "--log-level", "warning", *extra])
    for _ in range(600):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2); c.request("GET", "/health"); c.getresponse().read(); return p
        except OSError:
            time.sleep(0.2)
    raise SystemExit("server did not start")

def post(port, body):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    c.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse(); data = json.loads(r.read()); return r.status, data

def image(name):
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{media}/{name}"}},
            {"type": "text", "text": "what?"}]}], "max_tokens": 1, "max_tiles": 1}

def status(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key):
            return int(line.split()[1]) // 1024

def run(port, extra, label):
    p = serve(port, extra)
    base = status(p.pid, "VmRSS")
    res = {}
    for name in ("huge.png", "huge.jpg"):
        for n in (1, 2):
            outs = [None] * n
            ts = [threading.Thread(target=lambda k=k: outs.__setitem__(k, post(port, image(name))[0])) for k in range(n)]
            [t.start() for t in ts]; [t.join() for t in ts]
            res[f"{name} x{n}"] = (outs, status(p.pid, "VmHWM"))
    # a one-token request behind the 2-hour video
    vid = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{media}/long.avi"}},
           {"type": "text", "text": "what?"}]}], "max_tokens": 1}
    t0 = time.time(); tv = threading.Thread(target=lambda: res.__setitem__("video", (post(port, vid)[0], round(time.time() - t0, 2)))); tv.start()
    time.sleep(0.05); t1 = time.time(); st = post(port, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})[0]
    res["one-token beside it"] = (st, round(time.time() - t1, 2)); tv.join()
    print(label, "baseline RSS", base, "MB", json.dumps(res), "peak (VmHWM)", status(p.pid, "VmHWM"), "MB", flush=True)
    p.terminate(); p.wait()

run(8791, [], "defaults:")
run(8792, ["--max-memory-mb", "900"], "--max-memory-mb 900:")
