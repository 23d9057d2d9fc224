"""A reference-layout checkpoint whose tokenizer is not the stock one (``<image>`` 486, "\\n" 300) goes
through every stage by path: calibrate → export → the bundle records the resolved ids → the runtime runs it."""

from __future__ import annotations

import json
import warnings

import pytest

from nvila_edge import NVILAConfig, NVILAProcessor
from nvila_edge.bundle import Bundle

from conftest import _corpus, random_image

try:
    import _checkpoint_helpers as C
except ImportError:  # tests/ is a package
    from tests import _checkpoint_helpers as C

pytest.importorskip("modelopt.torch.quantization")
pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore")


def _items(n: int):
    return [{"conversation": "<image>\nwhat color is the circle?", "images": [random_image(120 + 40 * i, 100, seed=i)]}
            for i in range(n)] + [{"conversation": "how many shapes"}]


def test_calibrate_export_run_with_non_stock_ids(tmp_path, one_thread):
    from nvila_edge.calibration import calibrate, load_calibrated
    from nvila_edge.export import export_bundle
    from nvila_edge.runtime import Runtime

    tok = C.retokenized(_corpus())
    config = NVILAConfig.from_preset("demo")
    ckpt = C.write_vila(tmp_path / "ckpt", C.make_parts(config, seed=4), config, tok)
    # the path as a user gives it: no processor, no config built by hand (this used to raise ConfigError)
    calibrate(str(ckpt), tmp_path / "cal", data=_items(4), num_samples=4, num_heldout=1, progress=False)
    cal = load_calibrated(tmp_path / "cal")
    assert (cal.config.image_token_id, cal.config.end_token_ids) == (C.RETOK_IMAGE, (C.RETOK_NEWLINE,))

    export_bundle(tmp_path / "cal", tmp_path / "bundle", "cpu", progress=False)
    b = Bundle.open(tmp_path / "bundle")
    assert (b.config.image_token_id, b.config.video_token_id, b.config.end_token_ids) == \
        (C.RETOK_IMAGE, C.RETOK_VIDEO, (C.RETOK_NEWLINE,))
    emb = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["config"]
    assert emb["image_token_id"] == C.RETOK_IMAGE

    rt = Runtime.load(tmp_path / "bundle", backend="onnxruntime", threads=1)
    image = random_image(300, 200, seed=9)
    want = NVILAProcessor.from_pretrained(ckpt)("what color is the circle?", images=[image])
    out = rt.generate("what color is the circle?", images=[image], max_new_tokens=3)
    assert out.usage.prompt_tokens == want.num_tokens and len(out.token_ids) >= 1
