"""load_image (every input kind, every failure → MediaError), to_pixel_values, and pixel parity of the
processor's tiles with an independent reference preprocessing and with transformers' SigLIP processor."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from nvila_edge import NVILAConfig, NVILAProcessor
from nvila_edge.errors import MediaError
from nvila_edge.media.image import load_image, to_pixel_values

try:
    import _media_helpers as H
except ImportError:  # tests/ is a package
    from tests import _media_helpers as H


@pytest.fixture(scope="module")
def tok():
    return H.train_tokenizer()


@pytest.fixture(scope="module")
def rgb_array():
    return np.random.RandomState(3).randint(0, 256, (20, 30, 3), dtype=np.uint8)


def _png_bytes(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


# ---- inputs ----------------------------------------------------------------------------------------------
def test_load_from_path_str_and_pathlike(tmp_path, rgb_array):
    p = tmp_path / "a.png"
    Image.fromarray(rgb_array).save(p)
    for src in (str(p), p):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (30, 20)
        np.testing.assert_array_equal(np.asarray(img), rgb_array)


def test_load_from_bytes_and_bytearray(rgb_array):
    data = _png_bytes(Image.fromarray(rgb_array))
    for src in (data, bytearray(data)):
        img = load_image(src)
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), rgb_array)


def test_load_from_pil_rgb(rgb_array):
    img = load_image(Image.fromarray(rgb_array))
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), rgb_array)


def test_load_from_numpy_hwc_uint8(rgb_array):
    img = load_image(rgb_array)
    assert img.mode == "RGB" and img.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(img), rgb_array)


def test_load_from_non_contiguous_array(rgb_array):
    view = rgb_array[:, ::2]  # strided view
    np.testing.assert_array_equal(np.asarray(load_image(view)), view)


@pytest.mark.parametrize("shape", [(20, 30), (20, 30, 1)])
def test_load_gray_array(shape):
    gray = np.arange(600, dtype=np.uint8).reshape(shape)
    out = np.asarray(load_image(gray))
    assert out.shape == (20, 30, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray.reshape(20, 30))


def test_load_rgba_array_drops_alpha(rgb_array):
    rgba = np.concatenate([rgb_array, np.full((20, 30, 1), 7, np.uint8)], axis=2)
    out = np.asarray(load_image(rgba))
    assert out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, rgb_array)


def test_load_uint16_array():
    a = np.array([[0, 257, 1000, 60000], [30000, 65535, 128, 45000]], np.uint16)
    rgb = np.stack([a, a // 2, np.full_like(a, 65535)], axis=2)
    out = np.asarray(load_image(rgb))
    np.testing.assert_array_equal(out, np.rint(rgb / 257.0).astype(np.uint8))


def test_load_float_array_in_unit_range():
    a = np.linspace(0, 1, 60, dtype=np.float32).reshape(4, 5, 3)
    np.testing.assert_array_equal(np.asarray(load_image(a)), np.rint(a * 255).astype(np.uint8))


def test_pil_mode_L():
    out = np.asarray(load_image(Image.new("L", (4, 3), 77)))
    assert out.shape == (3, 4, 3) and (out == 77).all()


def test_pil_mode_LA():
    out = np.asarray(load_image(Image.new("LA", (4, 3), (100, 10))))
    assert out.shape == (3, 4, 3) and (out == 100).all()


def test_pil_mode_P_with_transparency():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    p.putpixel((1, 1), 1)
    p.putpixel((2, 3), 2)
    p.info["transparency"] = 0
    q = Image.open(io.BytesIO(_png_bytes(p)))
    assert q.mode == "P" and "transparency" in q.info
    out = np.asarray(load_image(q))
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[1, 1]) == (0, 255, 0)
    assert tuple(out[3, 2]) == (0, 0, 255)


def test_pil_mode_RGBA_drops_alpha():
    out = np.asarray(load_image(Image.new("RGBA", (3, 2), (10, 20, 30, 0))))
    assert out.shape == (2, 3, 3) and (out == [10, 20, 30]).all()


def test_pil_mode_CMYK():
    img = Image.new("CMYK", (2, 2), (255, 0, 0, 0))  # cyan
    out = np.asarray(load_image(img))
    assert tuple(out[0, 0]) == (0, 255, 255)
    assert tuple(np.asarray(load_image(Image.new("CMYK", (1, 1), (0, 0, 0, 0))))[0, 0]) == (255, 255, 255)


def test_16bit_png_scaled_to_8bit(tmp_path):
    a = np.array([[0, 257, 1000, 128, 60000], [30000, 65535, 40000, 12345, 45000]], np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    out = np.asarray(load_image(p))
    assert out.dtype == np.uint8 and out.shape == (2, 5, 3)
    expected = np.rint(a / 257.0).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_exif_orientation_6_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    p = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(p, quality=95, exif=exif)
    assert Image.open(p).size == (40, 20)
    img = load_image(p)
    assert img.size == (20, 40)  # width and height swapped
    out = np.asarray(img).astype(int)
    expected = np.rot90(arr, k=-1).astype(int)  # clockwise: the left half becomes the top half
    assert np.abs(out[2:18, 2:18] - expected[2:18, 2:18]).max() < 40
    assert np.abs(out[22:38, 2:18] - expected[22:38, 2:18]).max() < 40
    assert out[5, 10, 0] > 200 and out[30, 10, 2] > 200
    # bytes input gets the same treatment
    assert load_image(p.read_bytes()).size == (20, 40)


# ---- failures --------------------------------------------------------------------------------------------
def _noise_image(w=64, h=48):
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_file_raises_media_error(tmp_path, fmt, ext):
    full = tmp_path / f"full.{ext}"
    _noise_image().save(full, fmt)
    load_image(full)  # the complete file is fine
    data = full.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cannot decode"):
        load_image(cut)
    with pytest.raises(MediaError):
        load_image(data[: len(data) // 2])


def test_corrupt_bytes():
    with pytest.raises(MediaError, match="cannot decode"):
        load_image(b"definitely not an image" * 10)


def test_empty_bytes():
    with pytest.raises(MediaError, match="empty"):
        load_image(b"")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        load_image(p)


def test_missing_path(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(MediaError):
        load_image(str(tmp_path / "nope.jpg"))


def test_directory_path(tmp_path):
    with pytest.raises(MediaError):
        load_image(tmp_path)


def test_text_file_renamed_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("hello, this is a text file\n" * 20)
    with pytest.raises(MediaError, match="cannot decode"):
        load_image(p)


@pytest.mark.parametrize(
    "arr",
    [
        np.full((4, 4, 3), 2.0, np.float32),  # float above 1
        np.full((4, 4, 3), -0.5, np.float64),  # float below 0
        np.full((4, 4, 3), np.nan, np.float32),
        np.zeros((4, 4, 3), np.int64),  # unsupported integer dtype
    ],
)
def test_bad_array_dtype_or_range(arr):
    with pytest.raises(MediaError):
        load_image(arr)


@pytest.mark.parametrize("shape", [(4, 4, 2), (4, 4, 5), (2, 4, 4, 3), (5,), (0, 4, 3), (4, 0, 3)])
def test_wrong_array_shape(shape):
    with pytest.raises(MediaError, match="shape|got"):
        load_image(np.zeros(shape, np.uint8))


def test_unsupported_input_type():
    with pytest.raises(MediaError, match="unsupported"):
        load_image(12345)


def test_above_max_pixels_raises_for_every_input_kind(tmp_path):
    img = Image.new("RGB", (20, 20), (1, 2, 3))
    p = tmp_path / "big.png"
    img.save(p)
    for src in (p, p.read_bytes(), img, np.asarray(img)):
        with pytest.raises(MediaError, match="limit"):
            load_image(src, max_pixels=399)
        assert load_image(src, max_pixels=400).size == (20, 20)


def test_processor_rejects_image_above_config_limit(tok):
    cfg = NVILAConfig.from_preset("tiny", preprocessing={"max_image_pixels": 1000})
    proc = NVILAProcessor(cfg, tok)
    with pytest.raises(MediaError):
        proc("What?", images=[Image.new("RGB", (40, 40))])


def test_errors_are_value_errors_too():
    # MediaError subclasses ValueError so generic callers can catch it
    with pytest.raises(ValueError):
        load_image(b"xx")


# ---- pixel values ----------------------------------------------------------------------------------------
def test_to_pixel_values_shape_dtype_and_values():
    a = np.zeros((4, 5, 3), np.uint8)
    a[1, 2] = (255, 0, 51)
    b = np.full((4, 5, 3), 128, np.uint8)
    pv = to_pixel_values([Image.fromarray(a), Image.fromarray(b)])
    assert pv.shape == (2, 3, 4, 5)
    assert pv.dtype == np.float32
    assert pv.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(pv[0, :, 1, 2], [(255 / 255 - 0.5) / 0.5, (0 - 0.5) / 0.5, (51 / 255 - 0.5) / 0.5], atol=1e-6)
    np.testing.assert_allclose(pv[0, :, 0, 0], [-1.0, -1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(pv[1], (128 / 255 - 0.5) / 0.5, atol=1e-6)


def test_to_pixel_values_custom_mean_std():
    a = np.full((2, 2, 3), (10, 100, 200), np.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    pv = to_pixel_values([Image.fromarray(a)], mean, std)
    expected = [(v / 255 - m) / s for v, m, s in zip((10, 100, 200), mean, std)]
    np.testing.assert_allclose(pv[0, :, 0, 0], expected, rtol=1e-6, atol=1e-6)


def _to_uint8(pv: np.ndarray) -> np.ndarray:
    return np.rint((pv * 0.5 + 0.5) * 255).astype(np.int64)


def _check_against_hf(tiles_pil, pv):
    hf = H.siglip_image_processor()
    out = np.asarray(hf(images=tiles_pil, return_tensors="np")["pixel_values"])
    assert out.shape == pv.shape
    np.testing.assert_allclose(pv, out, rtol=0, atol=1e-6)


def test_dynamic_s2_pixel_parity_with_reference(tok):
    img = H.random_image(700, 300, seed=7)
    proc = NVILAProcessor(NVILAConfig.from_preset("tiny"), tok)
    plan = proc.plan_image(img.size)
    pv = proc.image_tiles(img, plan)

    ref_tiles, (cols, rows) = H.ref_dynamic_s2_tiles(img)
    assert (plan.grids[-1].cols, plan.grids[-1].rows) == (cols, rows) == (5, 2)
    ref = H.ref_normalize(ref_tiles)
    assert pv.shape == ref.shape == (1 + 4 + 10, 3, 448, 448)
    assert pv.dtype == np.float32
    np.testing.assert_array_equal(_to_uint8(pv), _to_uint8(ref))  # the very same pixels
    np.testing.assert_allclose(pv, ref, rtol=0, atol=1e-6)
    _check_against_hf(ref_tiles, pv)


def test_dynamic_s2_reference_is_sensitive_to_tile_order(tok):
    # guard: with a random image, a column-major crop order would give different tiles
    img = H.random_image(700, 300, seed=7)
    tiles, (cols, rows) = H.ref_dynamic_s2_tiles(img)
    last = tiles[5:]
    col_major = [last[r * cols + c] for c in range(cols) for r in range(rows)]
    assert not np.array_equal(H.ref_normalize(last), H.ref_normalize(col_major))


def test_lite_pixel_parity_with_reference_thumbnail_last(tok):
    img = H.random_image(700, 300, seed=11)
    proc = NVILAProcessor(NVILAConfig.from_preset("tiny-lite"), tok)
    plan = proc.plan_image(img.size)
    assert plan.thumbnail
    pv = proc.image_tiles(img, plan)

    ref_tiles, (cols, rows) = H.ref_dynamic_tiles(img)
    assert (plan.grids[0].cols, plan.grids[0].rows) == (cols, rows)
    assert len(ref_tiles) == cols * rows + 1 == plan.num_tiles
    ref = H.ref_normalize(ref_tiles)
    assert pv.shape == ref.shape
    np.testing.assert_array_equal(_to_uint8(pv), _to_uint8(ref))
    np.testing.assert_allclose(pv, ref, rtol=0, atol=1e-6)
    # the thumbnail is the plain 448 resize, last
    np.testing.assert_allclose(pv[-1], H.ref_normalize([img.resize((448, 448))])[0], atol=1e-6)
    _check_against_hf(ref_tiles, pv)


def test_lite_single_tile_image_pixels(tok):
    img = H.random_image(300, 310, seed=2)
    proc = NVILAProcessor(NVILAConfig.from_preset("tiny-lite"), tok)
    plan = proc.plan_image(img.size)
    assert plan.num_tiles == 1 and not plan.thumbnail
    pv = proc.image_tiles(img, plan)
    np.testing.assert_allclose(pv, H.ref_normalize([img.resize((448, 448))]), atol=1e-6)


def test_multi_image_plan_pixels_are_plain_resize(tok):
    img = H.random_image(700, 300, seed=5)
    proc = NVILAProcessor(NVILAConfig.from_preset("tiny"), tok)
    plan = proc.plan_image(img.size, multi=True)
    pv = proc.image_tiles(img, plan)
    assert pv.shape == (1, 3, 448, 448)
    np.testing.assert_allclose(pv, H.ref_normalize([img.resize((448, 448))]), atol=1e-6)


def test_pil_bicubic_differs_from_opencv_cubic():
    # documents why the reference resize must be PIL's: OpenCV INTER_CUBIC gives other pixels
    import cv2

    img = H.random_image(700, 300, seed=7)
    pil = np.asarray(img.resize((448, 448)))
    cv = cv2.resize(np.asarray(img), (448, 448), interpolation=cv2.INTER_CUBIC)
    assert not np.array_equal(pil, cv)


def test_pixel_limit_is_ours_not_pils(tmp_path):
    """Images between PIL's warning threshold and our max_pixels load; larger ones raise MediaError."""
    from PIL import Image as PILImage

    from nvila_edge.media.image import load_image

    path = tmp_path / "wide.png"
    PILImage.new("RGB", (2000, 1000), (10, 20, 30)).save(path)
    old = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = 1_500_000  # PIL would warn above this; our limit is what counts
    try:
        assert load_image(path, max_pixels=3_000_000).size == (2000, 1000)
        with pytest.raises(MediaError, match="pixels|too large"):
            load_image(path, max_pixels=1_000_000)
    finally:
        PILImage.MAX_IMAGE_PIXELS = old
