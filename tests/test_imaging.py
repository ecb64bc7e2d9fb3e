"""The one image decode (EXIF orientation rule) shared by every stage, and the one resize."""

from __future__ import annotations

import ast
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.errors import FormatError
from pipeline.imaging import decode_image, image_size, resize_cv2, resize_tensor, to_chw_tensor
from pipeline.scales import SCALE_SETS, Scale
from stages.rankerio import read_rgb
from tests.support import need_shared

ROOT = Path(__file__).resolve().parent.parent
ORIENTATION_TAG = 0x0112


def _rotated_jpeg(path: Path, orientation: int) -> np.ndarray:
    """Write a 40x24 (width x height) JPEG tagged with EXIF ``orientation``; returns its
    stored pixels (BGR, as Pillow decodes them, which never applies the orientation)."""
    rgb = np.zeros((24, 40, 3), np.uint8)
    rgb[:8, :10] = (255, 0, 0)  # a red block in the stored top-left corner
    rgb[16:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    Image.fromarray(rgb).save(path, quality=100, exif=exif)
    with Image.open(path) as img:
        assert img.getexif()[ORIENTATION_TAG] == orientation
        stored = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(stored[..., ::-1])


@pytest.mark.parametrize("orientation", [3, 6])
def test_every_stage_decodes_the_stored_pixels_whatever_the_exif_orientation(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    stored = _rotated_jpeg(path, orientation)
    assert image_size(path) == (40, 24)  # what `confrank index` records
    bgr = decode_image(path)  # detect
    assert bgr.shape == (24, 40, 3)
    assert np.abs(bgr.astype(int) - stored).max() <= 1
    assert bgr[2, 2, 2] > 200 and bgr[2, 2, 0] < 60  # red stays top-left: not rotated
    rgb = read_rgb(str(path), 40, 24)  # train and rerank
    np.testing.assert_array_equal(rgb, bgr[..., ::-1])


def test_decode_checks_the_indexed_size(tmp_path):
    path = tmp_path / "o1.jpg"
    _rotated_jpeg(path, 1)
    assert decode_image(path, (40, 24)).shape == (24, 40, 3)
    with pytest.raises(FormatError, match=r"o1\.jpg.*a 24x40 image \(as indexed\).*40x24"):
        decode_image(path, (24, 40))
    with pytest.raises(FormatError, match=r"o1\.jpg.*a 24x40 image \(as indexed\)"):
        read_rgb(str(path), 24, 40)


def _image_reading_calls(source: str) -> list[str]:
    calls = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = f"{owner.id}.{node.func.attr}" if isinstance(owner, ast.Name) else node.func.attr
            if name in ("cv2.imread", "cv2.imdecode", "Image.open", "PIL.Image.open"):
                calls.append(f"{name} line {node.lineno}")
    return calls


def test_only_imaging_reads_image_files():
    """One decode for every stage: no other module of the package calls an image reader."""
    offenders = {}
    for path in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/**/*.py")]):
        if path.relative_to(ROOT).as_posix() == "pipeline/imaging.py":
            continue
        calls = _image_reading_calls(path.read_text())
        if calls:
            offenders[path.relative_to(ROOT).as_posix()] = calls
    assert offenders == {}


# ----------------------------------------------------------------------------- resize


def _resize_both(image: np.ndarray, scale: Scale) -> tuple[np.ndarray, np.ndarray]:
    """(ours, the reference ``cv2.resize(float image, None, fx=r, fy=r)``), HxWx3 float32."""
    height, width = image.shape[:2]
    size, r = scale.input_size(width, height), scale.factor(width, height)
    ours = resize_tensor(to_chw_tensor(image)[None], size, r)[0].permute(1, 2, 0).numpy()
    reference = cv2.resize(image.astype(np.float32), None, None, fx=r, fy=r, interpolation=cv2.INTER_LINEAR)
    assert ours.shape == reference.shape == (size[1], size[0], 3)
    return ours, reference


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(st.integers(2, 200), st.integers(2, 200), st.integers(1, 1500), st.sampled_from(["long", "short"]),
       st.integers(0, 2**31))
def test_resize_is_cv2_resize_with_fx_fy(width, height, target, edge, seed):
    r = Scale(target, edge).factor(width, height)
    assume(round(width * r) >= 1 and round(height * r) >= 1)  # OpenCV refuses an empty output
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ours, reference = _resize_both(image, Scale(target, edge))
    assert np.abs(ours - reference).max() < 0.02
    assert np.abs(resize_cv2(image, r) - reference).max() == 0


@pytest.mark.parametrize("name", sorted(SCALE_SETS))
def test_every_scale_set_samples_with_step_one_over_r(name):
    """Sizes where r x side is not an integer (thin strips keep the 8K outputs small):
    sampling with the output/input size ratio instead of 1/r is off there."""
    for scale in SCALE_SETS[name]:
        sizes = [(1600, 37), (1603, 45)] if scale.edge == "long" else [(416, 281), (1024, 683)]
        for width, height in sizes:
            rng = np.random.default_rng(width)
            image = cv2.resize(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8), (width, height))
            ours, reference = _resize_both(image, scale)
            assert np.abs(ours - reference).max() < 0.02, (scale, width, height)


@pytest.mark.slow
def test_8k_resize_of_a_real_photo_equals_opencv():
    """group_1600.jpg (1600x898) at 8K: r = 4.8, 898 r = 4310.4. Sampling with 898/4310
    instead of 1/4.8 differed from OpenCV by up to 18 grey levels (mean 0.6)."""
    image = decode_image(need_shared("photos", "group_1600.jpg"))
    ours, reference = _resize_both(image, Scale(7680))
    diff = np.abs(ours - reference)
    assert diff.max() < 0.05 and diff.mean() < 0.001
