"""Dataset formats parsed into the ``images`` and ``gt`` tables (see ``pipeline.tables``).

Formats:

* the split text files ``wider_face_split/wider_face_{split}_bbx_gt.txt``: an image path
  line, a face count line, then one ``x y w h blur expression illumination invalid
  occlusion pose`` line per face (an image with 0 faces carries one all-zero line);
* the official evaluation ground truth ``ground_truth/wider_{face,easy,medium,hard}_val.mat``
  (the easy/medium/hard keep lists become boolean columns);
* RetinaFace's ``label.txt``: ``# event/name.jpg`` lines, then per face ``x y w h`` followed
  by 5 landmarks as (x, y, flag) triples (-1 when absent) and a final value (blur); some
  public copies carry one more -1 before the final value (21 numbers), which is accepted;
* a generic box table (CSV or Parquet) ``image, x1, y1, x2, y2[, ignore]`` for any dataset.

Boxes are stored as ``x1, y1, x2, y2`` in original-image pixels, with ``x2 = x + w`` and
``y2 = y + h`` for WiderFace's ``x y w h``. Numbers may be integers or floats everywhere.
Zero-size boxes are kept exactly as the official files have them (the 0-face images carry
one all-zero placeholder box, which the official evaluation keeps and ignores).

``image_id`` is ``event/name`` without extension (the key of the official .mat files).
``gt_id`` is the 0-based position of a face within its image, in file order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import FormatError
from pipeline.tables import ATTRIBUTE_COLUMNS, LANDMARK_COLUMNS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SUBSETS = ("easy", "medium", "hard")


@dataclass
class Annotations:
    """Parsed annotations: one row per image and one per face.

    images: image_id, file (path relative to the images folder), event.
    gt: the ``gt`` table columns (image_id, gt_id, x1..y2, attributes, easy/medium/hard,
    optionally ignore and landmarks).
    has_subsets: True when easy/medium/hard come from official keep lists.
    """

    images: pd.DataFrame
    gt: pd.DataFrame
    has_subsets: bool = False


def image_id_of(relpath: str) -> str:
    """``"0--Parade/0_Parade_x.jpg"`` -> ``"0--Parade/0_Parade_x"`` (forward slashes)."""
    rel = relpath.replace("\\", "/").strip("/")
    stem, dot, suffix = rel.rpartition(".")
    return stem if dot and ("." + suffix.lower()) in IMAGE_SUFFIXES else rel


def _event_of(image_id: str) -> str:
    return image_id.split("/", 1)[0] if "/" in image_id else ""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            yield number, line.strip()


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _floats(path: Path, number: int, text: str, count: int | None, what: str) -> list[float]:
    fields = text.split()
    if count is not None and len(fields) != count:
        raise FormatError(path, f"{count} numbers ({what})", line=number, got=text)
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise FormatError(path, f"numbers ({what})", line=number, got=text) from None
    if not all(abs(v) <= _FLOAT32_MAX for v in values):  # also false for NaN
        raise FormatError(path, f"finite numbers ({what})", line=number, got=text)
    return values


def _codes(path: Path, number: int, text: str, values: list[float]) -> list[int]:
    """Attribute values as int8 codes; FormatError on a fraction or an out-of-range value."""
    if not all(v == int(v) and -128 <= v <= 127 for v in values):
        raise FormatError(path, "integer attribute codes in -128..127", line=number, got=text)
    return [int(v) for v in values]


def _gt_frame(rows: list[dict], with_landmarks: bool = False) -> pd.DataFrame:
    columns = ["image_id", "gt_id", "x1", "y1", "x2", "y2", *ATTRIBUTE_COLUMNS, *SUBSETS]
    if with_landmarks:
        columns += list(LANDMARK_COLUMNS)
    frame = pd.DataFrame(rows, columns=columns)
    frame = frame.astype({"gt_id": "int32", **{c: "float32" for c in ("x1", "y1", "x2", "y2")},
                          **{c: "int8" for c in ATTRIBUTE_COLUMNS}, **{s: "bool" for s in SUBSETS}})
    if with_landmarks:
        frame = frame.astype({c: "float32" for c in LANDMARK_COLUMNS})
    return frame


def _images_frame(image_ids: Iterable[str], files: Iterable[str]) -> pd.DataFrame:
    ids = list(image_ids)
    return pd.DataFrame({"image_id": ids, "file": list(files), "event": [_event_of(i) for i in ids]})


def _face_row(image_id: str, gt_id: int, x: float, y: float, w: float, h: float, attrs: list[int]) -> dict:
    row = {"image_id": image_id, "gt_id": gt_id, "x1": x, "y1": y, "x2": x + w, "y2": y + h}
    row.update(zip(ATTRIBUTE_COLUMNS, attrs))
    row.update(dict.fromkeys(SUBSETS, False))
    return row


# ----------------------------------------------------------------------------- split txt


def parse_split_txt(path: str | Path) -> Annotations:
    """Parse ``wider_face_{split}_bbx_gt.txt`` (10 numbers per face line).

    Raises FormatError with the file, line number and expectation on a malformed line, a
    bad count, or a file that ends before its last image's faces.
    """
    path = Path(path)
    lines = _lines(path)
    ids, files, rows = [], [], []
    for number, text in lines:
        if not text:
            continue
        if not text.lower().endswith(IMAGE_SUFFIXES):
            raise FormatError(path, f"an image path ending in one of {IMAGE_SUFFIXES}", line=number, got=text)
        image_id = image_id_of(text)
        count_number, count_text = _next(lines, path, "a face count line")
        if not count_text.isdigit():
            raise FormatError(path, "a face count (non-negative integer)", line=count_number, got=count_text)
        count = int(count_text)
        ids.append(image_id)
        files.append(text)
        # an image with 0 faces carries one all-zero line, kept as the official .mat keeps it
        for gt_id in range(max(count, 1)):
            face_number, face_text = _next(lines, path, f"face line {gt_id + 1} of {text}")
            values = _floats(path, face_number, face_text, 10, "x y w h blur expression illumination invalid occlusion pose")
            if count == 0 and any(values):
                raise FormatError(path, "an all-zero line after a count of 0", line=face_number, got=face_text)
            x, y, w, h = values[:4]
            rows.append(_face_row(image_id, gt_id, x, y, w, h, _codes(path, face_number, face_text, values[4:])))
    return Annotations(_images_frame(ids, files), _gt_frame(rows))


def _next(lines: Iterator[tuple[int, str]], path: Path, expected: str) -> tuple[int, str]:
    for number, text in lines:
        if text:
            return number, text
    raise FormatError(path, f"{expected}, but the file ended")


# ----------------------------------------------------------------------------- official .mat


def parse_eval_mat(folder: str | Path) -> Annotations:
    """Parse ``wider_face_val.mat`` and the easy/medium/hard keep lists in ``folder``.

    Boxes, attributes and file list come from ``wider_face_val.mat``; a face is in a subset
    when its 1-based index is in that subset's ``gt_list`` for its image.
    """
    from scipy.io import loadmat

    folder = Path(folder)
    face_path = folder / "wider_face_val.mat"
    face = _loadmat(loadmat, face_path, ("event_list", "file_list", "face_bbx_list", *(f"{a}_label_list" for a in ATTRIBUTE_COLUMNS)))
    keep = {s: _loadmat(loadmat, folder / f"wider_{s}_val.mat", ("gt_list",))["gt_list"] for s in SUBSETS}
    ids, files, frames = [], [], []
    for e, event_cell in enumerate(face["event_list"]):
        event = str(event_cell[0][0])
        names = face["file_list"][e][0]
        for j in range(len(names)):
            name = str(names[j][0][0])
            image_id = f"{event}/{name}"
            boxes = np.asarray(face["face_bbx_list"][e][0][j][0], dtype=np.float64).reshape(-1, 4)
            n = len(boxes)
            frame = {"image_id": [image_id] * n, "gt_id": np.arange(n),
                     "x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 0] + boxes[:, 2], "y2": boxes[:, 1] + boxes[:, 3]}
            for attr in ATTRIBUTE_COLUMNS:
                values = np.asarray(face[f"{attr}_label_list"][e][0][j][0]).reshape(-1)
                frame[attr] = values if len(values) == n else np.full(n, -1)
            for subset in SUBSETS:
                kept = np.asarray(keep[subset][e][0][j][0]).reshape(-1).astype(np.int64)
                if len(kept) and (kept.min() < 1 or kept.max() > n):
                    raise FormatError(folder / f"wider_{subset}_val.mat", f"keep indices in 1..{n} for {image_id}", got=str(kept.tolist()))
                mask = np.zeros(n, dtype=bool)
                mask[kept - 1] = True
                frame[subset] = mask
            ids.append(image_id)
            files.append(f"{image_id}.jpg")
            frames.append(pd.DataFrame(frame))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    gt = _gt_frame(rows.to_dict("records")) if len(rows) else _gt_frame([])
    return Annotations(_images_frame(ids, files), gt, has_subsets=True)


def _loadmat(loadmat, path: Path, keys: tuple[str, ...]) -> dict:
    if not path.is_file():
        raise FormatError(path, "an official WiderFace evaluation .mat file", got="missing file")
    try:
        data = loadmat(str(path))
    except Exception as exc:  # scipy raises several types for corrupt files
        raise FormatError(path, "a MATLAB .mat file", got=str(exc)) from exc
    missing = [k for k in keys if k not in data]
    if missing:
        raise FormatError(path, f"variables {list(keys)}", got=f"missing {missing}")
    return data


# ----------------------------------------------------------------------------- label.txt


def parse_retinaface_labels(path: str | Path) -> Annotations:
    """Parse RetinaFace's ``label.txt`` (``# path`` lines, then 4 + 15 + 1 numbers per face).

    Landmarks with value -1 (absent) become NaN; the landmark flags are dropped; the final
    value is stored as ``blur``; other attributes are -1 (not in this format).
    """
    path = Path(path)
    ids, files, rows = [], [], []
    current: str | None = None
    gt_id = 0
    for number, text in _lines(path):
        if not text:
            continue
        if text.startswith("#"):
            rel = text[1:].strip()
            if not rel:
                raise FormatError(path, "'# <event>/<image>' after '#'", line=number, got=text)
            current, gt_id = image_id_of(rel), 0
            ids.append(current)
            files.append(rel)
            continue
        if current is None:
            raise FormatError(path, "a '# <image path>' line before the first face", line=number, got=text)
        values = _floats(path, number, text, None, "x y w h, 5 landmarks (x y flag), final value")
        if len(values) not in (4, 19, 20, 21):
            raise FormatError(path, "4, 19, 20 or 21 numbers (x y w h [15 landmark values [extra flag] [blur]])", line=number, got=text)
        x, y, w, h = values[:4]
        blur = int(values[-1]) if len(values) >= 20 else -1  # train files hold a float here
        if not -128 <= blur <= 127:
            raise FormatError(path, "a final value in -128..127", line=number, got=text)
        row = _face_row(current, gt_id, x, y, w, h, [blur, -1, -1, -1, -1, -1])
        marks = values[4:19] if len(values) >= 19 else [-1.0] * 15
        for i in range(5):
            lx, ly = marks[3 * i], marks[3 * i + 1]
            absent = lx < 0 and ly < 0
            row[f"lm_x{i}"] = np.nan if absent else lx
            row[f"lm_y{i}"] = np.nan if absent else ly
        rows.append(row)
        gt_id += 1
    return Annotations(_images_frame(ids, files), _gt_frame(rows, with_landmarks=True))


# ----------------------------------------------------------------------------- generic boxes


def parse_box_table(table: pd.DataFrame, source: str | Path, image_files: Iterable[str]) -> Annotations:
    """A generic box dataset: ``table`` has ``image, x1, y1, x2, y2[, ignore]`` rows.

    ``image`` is a path relative to the images folder; ``image_files`` lists every image in
    that folder (relative paths), so images without rows are kept as images with no faces.
    A row naming an unknown image, a non-numeric value or a box with x2 < x1 or y2 < y1
    raises FormatError naming ``source`` and the row (line numbers count the CSV header).
    """
    required = ["image", "x1", "y1", "x2", "y2"]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise FormatError(source, f"columns {required} (+ optional 'ignore')", got=f"columns {list(table.columns)}")
    files = sorted({f.replace("\\", "/") for f in image_files})
    known = set(files)
    rows = []
    counts: dict[str, int] = {}
    for position, record in enumerate(table.itertuples(index=False), start=2):
        rel = str(record.image).replace("\\", "/").strip("/")
        if rel not in known:
            raise FormatError(source, "an image that exists in the images folder", line=position, got=rel)
        try:
            x1, y1, x2, y2 = (float(getattr(record, c)) for c in ("x1", "y1", "x2", "y2"))
        except (TypeError, ValueError):
            raise FormatError(source, "numeric x1, y1, x2, y2", line=position, got=str(tuple(record))) from None
        if not np.isfinite([x1, y1, x2, y2]).all() or x2 < x1 or y2 < y1:
            raise FormatError(source, "a finite box with x2 >= x1 and y2 >= y1", line=position, got=f"{x1} {y1} {x2} {y2}")
        image_id = image_id_of(rel)
        gt_id = counts.get(image_id, 0)
        counts[image_id] = gt_id + 1
        row = _face_row(image_id, gt_id, x1, y1, x2 - x1, y2 - y1, [-1] * 6)
        row["x2"], row["y2"] = x2, y2
        row["ignore"] = bool(getattr(record, "ignore", False)) if "ignore" in table.columns else False
        rows.append(row)
    gt = _gt_frame(rows)
    gt["ignore"] = pd.Series([r["ignore"] for r in rows], dtype=bool)
    return Annotations(_images_frame([image_id_of(f) for f in files], files), gt)


def check_same_boxes(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-3) -> list[str]:
    """Differences between two gt tables (same images, face counts, boxes within ``atol``).

    Returns human-readable lines, empty when they agree; used to cross-check the text and
    .mat forms of the same ground truth.
    """
    problems = []
    ka, kb = set(a.image_id), set(b.image_id)
    if ka != kb:
        problems.append(f"images only in first: {sorted(ka - kb)[:5]}, only in second: {sorted(kb - ka)[:5]}")
    left = a.sort_values(["image_id", "gt_id"]).reset_index(drop=True)
    right = b.sort_values(["image_id", "gt_id"]).reset_index(drop=True)
    if len(left) != len(right):
        problems.append(f"{len(left)} faces vs {len(right)}")
        return problems
    diff = np.abs(left[["x1", "y1", "x2", "y2"]].to_numpy(np.float64) - right[["x1", "y1", "x2", "y2"]].to_numpy(np.float64))
    bad = np.flatnonzero(diff.max(axis=1) > atol)
    if len(bad):
        problems.append(f"{len(bad)} boxes differ, first at {left.image_id[bad[0]]} face {left.gt_id[bad[0]]}")
    return problems
