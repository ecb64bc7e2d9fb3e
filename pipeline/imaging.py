"""Images: header-only sizes, decoding, resizing (one place for it).

Arrays are HxWx3 uint8 in **BGR** order (OpenCV's convention) unless a docstring says
otherwise; sizes are (width, height) in pixels.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.errors import FormatError, MissingInputError


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
