"""Images: header-only sizes, decoding, resizing (one place for it).

Arrays are HxWx3 uint8 in **BGR** order (OpenCV's convention) unless a docstring says
otherwise; sizes are (width, height) in pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import FormatError, MissingInputError

if TYPE_CHECKING:  # torch is imported where it is used, so header reads stay light
    import torch


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) read from the file header, without decoding the pixels.

    The format is detected from the content, not the extension (a PNG named .jpg works).
    Raises MissingInputError for a missing file and FormatError for an unreadable one.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: image not found")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise FormatError(path, "a readable image (JPEG/PNG/...)", got=str(exc)) from exc
    if width <= 0 or height <= 0:
        raise FormatError(path, "an image with positive width and height", got=f"{width}x{height}")
    return int(width), int(height)


_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


def decode_image(path: str | Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image file to an HxWx3 uint8 **BGR** array: the one decode of every stage.

    Orientation rule: pixels are in stored order, the EXIF orientation tag is ignored, so
    boxes (x1, y1, x2, y2 in stored pixels) match the header sizes of :func:`image_size` that
    the images table records, in detect, train, rerank and report alike. Grey images become
    3 identical channels; CMYK and other modes OpenCV cannot read are decoded with Pillow
    (which never applies the orientation either). The format comes from the content (a PNG
    named .jpg works). ``expected_size`` = (width, height) from the images table, if given,
    must equal the decoded size.
    Raises MissingInputError for a missing file and FormatError naming the file for an
    empty, truncated or undecodable one, or one of another size.
    """
    path = Path(path)
    image = _decode(path)
    got = (image.shape[1], image.shape[0])
    if expected_size is not None and got != tuple(expected_size):
        raise FormatError(path, f"a {expected_size[0]}x{expected_size[1]} image (as indexed)", got=f"{got[0]}x{got[1]}")
    return image


def _decode(path: Path) -> np.ndarray:
    if not path.is_file():
        raise MissingInputError(f"{path}: image not found")
    data = path.read_bytes()
    if not data:
        raise FormatError(path, "an image", got="an empty (0-byte) file")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    truncated_jpeg = data.startswith(_JPEG_SOI) and not data.rstrip(b"\x00\r\n ").endswith(_JPEG_EOI)
    if image is not None and not truncated_jpeg:
        return image
    # OpenCV failed or may have filled a truncated scan: Pillow decodes strictly
    try:
        with Image.open(path) as img:
            img.load()
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise FormatError(path, "a complete, readable image (JPEG/PNG/...)", got=str(exc)) from exc
    return image if image is not None else np.ascontiguousarray(rgb[..., ::-1])


def resize_cv2(image: np.ndarray, factor: float) -> np.ndarray:
    """Bilinear resize (cv2.INTER_LINEAR) of an HxWxC image by ``factor`` on both axes, as
    float32: ``cv2.resize(image, None, fx=factor, fy=factor)``, the CPU path of the reference
    test code (output sides ``round(side * factor)``, sampling step exactly 1/factor).
    Returns a float32 copy when ``factor`` is 1."""
    image = image.astype(np.float32)
    if factor == 1:
        return image
    return cv2.resize(image, None, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)


def resize_tensor(images: torch.Tensor, size: tuple[int, int], factor: float,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) images by ``factor`` to ``size`` = (width, height), as
    float32, on the images' device (upload the small image, resize there); written into
    ``out`` (a contiguous float32 (B, C, height, width) tensor on that device) when given.

    The same mapping as ``cv2.resize(image, None, fx=factor, fy=factor)`` (INTER_LINEAR):
    output pixel centre x samples the input at (x + 0.5) / factor - 0.5, half-pixel centres,
    no antialiasing. The sampling step is 1/factor, not in_side/out_side: the two differ
    whenever side * factor is not an integer (one edge of most 8K inputs), by up to 18 grey
    levels at 8K. ``size`` must be the rounded ``side * factor``
    (:meth:`pipeline.scales.Scale.input_size`). Agrees with OpenCV's float resize within
    0.03 at 8K. Returns a float32 tensor even when the size is unchanged.
    """
    import torch

    images = images.float()
    if factor == 1 and (images.shape[-1], images.shape[-2]) == tuple(size):
        return images if out is None else out.copy_(images)
    # the ATen op behind F.interpolate, called with both the output size (cv2's rounding)
    # and the scale factor (cv2's sampling step); F.interpolate accepts only one of the two
    if out is None:
        return torch.ops.aten.upsample_bilinear2d.default(images, [size[1], size[0]], False, factor, factor)
    return torch.ops.aten.upsample_bilinear2d.out(images, [size[1], size[0]], False, factor, factor, out=out)


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 array -> (3, H, W) uint8 tensor (a copy, contiguous)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
