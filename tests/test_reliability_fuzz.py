"""Fuzzing the annotation parsers with structured-but-wrong files, and the evaluator with
random prediction sets: no exception other than the documented ones.

test_widerface.py fuzzes the parsers with random characters; here the files are
well-formed WiderFace / RetinaFace text with one targeted corruption (a wrong count, a
missing or extra field, a non-numeric or non-finite token, a truncated file), so the fuzzing
reaches the face loops. A clean file must parse to exactly the faces it lists; a corrupt one
parses the same faces or raises FormatError naming the file and a line inside it.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pipeline.errors import FormatError
from pipeline.metrics import SUBSETS, evaluate_widerface
from pipeline.tables import ATTRIBUTE_COLUMNS
from pipeline.widerface import parse_retinaface_labels, parse_split_txt

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

numbers = st.one_of(st.integers(0, 1024), st.floats(0, 1024, allow_nan=False).map(lambda v: round(v, 1)))
attribute = st.integers(0, 2)
#: replacements for one token of a clean file
BAD_TOKENS = ["nan", "inf", "-inf", "abc", "", "1e40", "3.5", "-1", "999", "0x10", "1,5", "١٢"]


@st.composite
def widerface_text(draw) -> tuple[list[str], int]:
    """Lines of a valid split text file, and its number of face rows (0-face images: 1)."""
    lines, rows = [], 0
    for i in range(draw(st.integers(1, 4))):
        count = draw(st.integers(0, 3))
        lines += [f"{i}--Event/{i}_img_{draw(st.integers(0, 99))}.jpg", str(count)]
        for _ in range(max(count, 1)):
            box = [0, 0, 0, 0] if count == 0 else [draw(numbers) for _ in range(4)]
            attrs = [0] * 6 if count == 0 else [draw(attribute) for _ in range(6)]
            lines.append(" ".join(str(v) for v in box + attrs))
        rows += max(count, 1)
    return lines, rows


@st.composite
def label_text(draw) -> tuple[list[str], int]:
    """Lines of a valid RetinaFace label.txt, and its number of faces."""
    lines, faces = [], 0
    for i in range(draw(st.integers(1, 4))):
        lines.append(f"# {i}--Event/{i}_img.jpg")
        for _ in range(draw(st.integers(0, 3))):
            width = draw(st.sampled_from([4, 19, 20, 21]))
            values = [draw(numbers) for _ in range(4)] + [draw(st.sampled_from([-1.0, 12.5, 0.0, 0.82])) for _ in range(width - 4)]
            lines.append(" ".join(str(v) for v in values))
            faces += 1
    return lines, faces


@st.composite
def corruption(draw, lines: list[str]) -> list[str]:
    """One targeted change: replace/drop/add a token, drop/duplicate a line, truncate."""
    lines = list(lines)
    i = draw(st.integers(0, len(lines) - 1))
    tokens = lines[i].split()
    kind = draw(st.sampled_from(["replace", "drop-token", "add-token", "drop-line", "dup-line", "truncate"]))
    if kind == "replace" and tokens:
        tokens[draw(st.integers(0, len(tokens) - 1))] = draw(st.sampled_from(BAD_TOKENS))
    elif kind == "drop-token" and tokens:
        tokens.pop(draw(st.integers(0, len(tokens) - 1)))
    elif kind == "add-token":
        tokens.append(draw(st.sampled_from(BAD_TOKENS + ["7"])))
    elif kind == "drop-line":
        return lines[:i] + lines[i + 1:]
    elif kind == "dup-line":
        return lines[:i + 1] + lines[i:]
    elif kind == "truncate":
        return lines[:i]
    lines[i] = " ".join(tokens)
    return lines


def check_parse(parser, lines: list[str], expected_rows: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "annotations.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            ann = parser(path)
        except FormatError as exc:
            assert expected_rows is None, f"a clean file was refused: {exc}"
            match = re.match(rf"{re.escape(str(path))}(?::(\d+))?: expected ", str(exc))
            assert match, str(exc)
            if match.group(1):
                assert 1 <= int(match.group(1)) <= len(lines)
            else:
                assert "file ended" in str(exc) or "line" not in str(exc)
            return
        if expected_rows is not None:
            assert len(ann.gt) == expected_rows
        # whatever was accepted is stored faithfully: finite attribute codes in int8
        gt = ann.gt
        assert set(ann.images["image_id"]) >= set(gt["image_id"])
        for column in ATTRIBUTE_COLUMNS:
            assert gt[column].dtype == np.int8


@FUZZ
@given(widerface_text(), st.data())
def test_split_txt_structured_fuzz(clean, data):
    lines, rows = clean
    check_parse(parse_split_txt, lines, rows)
    check_parse(parse_split_txt, data.draw(corruption(lines)), None)


@pytest.mark.slow
@FUZZ
@given(label_text(), st.data())
def test_label_txt_structured_fuzz(clean, data):
    lines, faces = clean
    check_parse(parse_retinaface_labels, lines, faces)
    check_parse(parse_retinaface_labels, data.draw(corruption(lines)), None)


# ----------------------------------------------------------------------------- evaluator


@st.composite
def gt_and_predictions(draw) -> tuple[pd.DataFrame, pd.DataFrame]:
    n_images = draw(st.integers(1, 4))
    gt_rows, det_rows = [], []
    coordinate = st.floats(-50, 500, allow_nan=False, width=32)
    for i in range(n_images):
        image_id = f"0--E/img_{i}"
        for g in range(draw(st.integers(0, 4))):
            x, y = draw(coordinate), draw(coordinate)
            w, h = draw(st.floats(-5, 200, width=32)), draw(st.floats(-5, 200, width=32))  # zero/negative kept
            easy = draw(st.booleans())
            medium = easy or draw(st.booleans())
            hard = medium or draw(st.booleans())
            gt_rows.append({"image_id": image_id, "gt_id": g, "x1": x, "y1": y, "x2": x + w, "y2": y + h,
                            **{a: 0 for a in ATTRIBUTE_COLUMNS}, "easy": easy, "medium": medium, "hard": hard})
        for _ in range(draw(st.integers(0, 6))):
            x, y = draw(coordinate), draw(coordinate)
            w, h = draw(st.floats(-5, 200, width=32)), draw(st.floats(-5, 200, width=32))
            score = draw(st.one_of(st.floats(0, 1, width=32), st.sampled_from([0.0, 1.0, 0.5])))
            det_rows.append({"image_id": image_id, "x1": x, "y1": y, "x2": x + w, "y2": y + h, "score": score})
    gt = pd.DataFrame(gt_rows, columns=["image_id", "gt_id", "x1", "y1", "x2", "y2", *ATTRIBUTE_COLUMNS, *SUBSETS])
    dets = pd.DataFrame(det_rows, columns=["image_id", "x1", "y1", "x2", "y2", "score"])
    return gt.astype({c: "float32" for c in ("x1", "y1", "x2", "y2")}), dets


def all_aps(result: dict) -> list[float]:
    aps = [result["voc_ap"]]
    for key in ("ap", "ap_50_95"):
        aps += list(result.get(key, {}).values())
    for values in result.get("ap_by_attribute", {}).values():
        aps += list(values.values())
    return aps


@FUZZ
@given(gt_and_predictions())
def test_evaluator_on_random_inputs_gives_aps_in_unit_interval(case):
    gt, dets = case
    result = evaluate_widerface(gt, dets)
    assert result["n_detections"] == len(dets) and result["n_faces"] == len(gt)
    for ap in all_aps(result):
        assert np.isnan(ap) or 0.0 <= ap <= 1.0 + 1e-12, result
