"""The light install answers from a bundle without torch (run by .ci/run; not a pytest module).

    python tests/light_install_check.py write  DIR   # the full venv: a tiny random-weight bundle + an image in DIR
    python tests/light_install_check.py answer DIR   # the light venv (base + [runtime]): answer from it, no torch
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "peft", "modelopt")


def write(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import _corpus, make_model, random_image, write_bundle
    from PIL import Image

    from nvila_edge import NVILAConfig, NVILATokenizer

    write_bundle(out / "bundle", make_model(NVILAConfig.from_preset("tiny")), NVILATokenizer.train(_corpus()))
    Image.fromarray(random_image(300, 200)).save(out / "image.png")
    print(f"light install check: tiny bundle written to {out / 'bundle'}")


def answer(out: Path) -> None:
    missing = [m for m in HEAVY if importlib.util.find_spec(m) is None]
    assert missing == list(HEAVY), f"the light install has {sorted(set(HEAVY) - set(missing))} installed"
    from nvila_edge.cli import main
    from nvila_edge.runtime import Runtime

    rt = Runtime.load(out / "bundle")  # auto: ONNX Runtime, the only backend installed
    res = rt.generate("What is in the image?", images=[str(out / "image.png")], max_new_tokens=4)
    assert rt.describe()["backend"] == "onnxruntime" and len(res.token_ids) >= 1, res
    rt.close()
    with contextlib.redirect_stdout(io.StringIO()) as cli_out:  # the command line too, and every verb's --help
        rc = main(["run", str(out / "bundle"), "--image", str(out / "image.png"), "--max-new-tokens", "4", "--json",
                   "What is it?"])
    assert rc == 0, cli_out.getvalue()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(["--help"])
    from nvila_edge.apps.agent import parse_json_answer  # the robot's structured answers: pydantic is in [runtime]

    assert parse_json_answer('go: {"action": "left", "p": 1}', {"action": {"left", "right"}, "p": float})["p"] == 1
    loaded = [m for m in HEAVY if m in sys.modules]
    assert loaded == [], f"answering imported {loaded}"
    print("light install check: answered " + json.dumps({"text": res.text, "tokens": len(res.token_ids),
                                                          "cli": json.loads(cli_out.getvalue())["finish_reason"]}))


if __name__ == "__main__":
    {"write": write, "answer": answer}[sys.argv[1]](Path(sys.argv[2]))
