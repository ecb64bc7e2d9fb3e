"""The one image decode (EXIF orientation rule) shared by every stage, and the one resize."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import FormatError
from pipeline.imaging import decode_image, image_size
from stages.train import read_rgb

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
