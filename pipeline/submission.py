"""The WiderFace submission format: one text file per image.

```
<image name>            (without folder; an extension such as .jpg is allowed)
<box count>
x y w h score           (one line per box, in original-image pixels)
```

Blank lines and trailing spaces are accepted (real submissions end lines with a space).
In storage boxes are ``x1, y1, x2, y2`` with ``x2 = x + w`` and ``y2 = y + h``.
:func:`format_submission` writes numbers that read back to the same float32 values, so an
export followed by an import is lossless.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.errors import FormatError

FRAME_COLUMNS = ("image_id", "x1", "y1", "x2", "y2", "score")


def _stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, suffix = base.rpartition(".")
    return stem if dot and suffix.lower() in ("jpg", "jpeg", "png", "bmp") else base


def parse_submission(text: str, source: str, expected_name: str | None = None) -> tuple[str, np.ndarray]:
    """Parse one submission file's text.

    Returns the image name (line 1, folder and image extension removed) and an (N, 5)
    float64 array of ``x y w h score`` rows in file order. ``source`` names the file in
    errors. With ``expected_name`` (the file's stem), line 1 must name that image.
    Raises FormatError (file, line, expectation) on a missing name or count, a count that
    differs from the number of box lines, or a box line that is not 5 numbers.
    """
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise FormatError(source, "the image name on line 1", line=1, got=lines[0] if lines else "")
    name = _stem(lines[0].strip())
    if expected_name is not None and name != expected_name:
        raise FormatError(source, f"line 1 to name the image {expected_name!r} (the file's name)", line=1, got=lines[0].strip())
    if len(lines) < 2 or not lines[1].strip().isdigit():
        raise FormatError(source, "the box count (a non-negative integer) on line 2", line=2,
                          got=lines[1] if len(lines) > 1 else "end of file")
    count = int(lines[1])
    rows = []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise FormatError(source, "5 numbers 'x y w h score'", line=number, got=line)
        try:
            rows.append([float(f) for f in fields])
        except ValueError:
            raise FormatError(source, "5 numbers 'x y w h score'", line=number, got=line) from None
    if len(rows) != count:
        raise FormatError(source, f"{count} box lines (the count on line 2)", got=f"{len(rows)} box lines")
    boxes = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    if not np.isfinite(boxes).all():
        bad = int(np.flatnonzero(~np.isfinite(boxes).all(axis=1))[0])
        raise FormatError(source, "finite numbers", line=3 + bad, got=" ".join(map(str, boxes[bad])))
    return name, boxes


def submission_frame(image_id: str, boxes: np.ndarray) -> pd.DataFrame:
    """Parsed ``x y w h score`` rows (float64) of one image as image_id, x1..y2, score (float64)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    return pd.DataFrame({
        "image_id": image_id, "x1": boxes[:, 0], "y1": boxes[:, 1],
        "x2": boxes[:, 0] + boxes[:, 2], "y2": boxes[:, 1] + boxes[:, 3], "score": boxes[:, 4],
    })


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def format_submission(image_id: str, boxes: pd.DataFrame) -> str:
    """One image's submission text from ``boxes`` (x1..y2, score), sorted by score descending.

    Coordinates are written exactly (x1, y1 and the float64 differences w, h), scores as the
    shortest text that reads back to the same float32.
    """
    order = np.argsort(-boxes["score"].to_numpy(np.float64), kind="stable")
    b = boxes.iloc[order]
    x1, y1 = b["x1"].to_numpy(np.float64), b["y1"].to_numpy(np.float64)
    w = b["x2"].to_numpy(np.float64) - x1
    h = b["y2"].to_numpy(np.float64) - y1
    scores = b["score"].to_numpy(np.float32)
    lines = [image_id.rsplit("/", 1)[-1], str(len(b))]
    for i in range(len(b)):
        score = np.format_float_positional(scores[i], unique=True, trim="-")
        lines.append(f"{_number(x1[i])} {_number(y1[i])} {_number(w[i])} {_number(h[i])} {score}")
    return "\n".join(lines) + "\n"
