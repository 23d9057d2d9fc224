"""``import nvila_edge`` and preprocessing stay free of torch / transformers; the model loads them lazily."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import nvila_edge
from nvila_edge import NVILAProcessor, NVILAConfig, NVILATokenizer
from nvila_edge.cli import main
import _media_helpers as H

result = {}
tok = NVILATokenizer.train(H.make_corpus())
for preset in ("tiny", "tiny-lite"):
    proc = NVILAProcessor(NVILAConfig.from_preset(preset), tok)
    out = proc("What?", images=[np.zeros((300, 700, 3), np.uint8)], videos=[[np.zeros((8, 8, 3), np.uint8)] * 8])
    result[preset] = int(out.pixel_values.shape[0])
main(["plan", "1920x1080", "--json"])
result["before"] = {m: m in sys.modules for m in ("torch", "transformers")}
model_cls = nvila_edge.NVILAModel
result["after"] = {m: m in sys.modules for m in ("torch", "transformers")}
result["model_cls"] = model_cls.__name__
try:
    nvila_edge.NoSuchThing
    result["attr_error"] = False
except AttributeError:
    result["attr_error"] = True
print("RESULT " + json.dumps(result))
"""


def test_import_and_preprocessing_do_not_load_torch():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(TESTS)],
        capture_output=True, text=True, timeout=120, cwd=str(TESTS.parent), env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r["tiny"] == 15 + 8 and r["tiny-lite"] == 11 + 8  # the work really ran
    assert r["before"] == {"torch": False, "transformers": False}
    assert r["after"]["torch"] is True
    assert r["model_cls"] == "NVILAModel"
    assert r["attr_error"] is True
