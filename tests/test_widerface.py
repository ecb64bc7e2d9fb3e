"""WiderFace parsers: real shared files, and malformed input failing with file and line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import FormatError
from pipeline.tables import ATTRIBUTE_COLUMNS
from pipeline.widerface import (
    check_same_boxes,
    image_id_of,
    parse_box_table,
    parse_eval_mat,
    parse_retinaface_labels,
    parse_split_txt,
)
from tests.support import need_shared


def test_image_id_of():
    assert image_id_of("0--Parade/0_Parade_Parade_0_194.jpg") == "0--Parade/0_Parade_Parade_0_194"
    assert image_id_of("a\\b.PNG") == "a/b"
    assert image_id_of("no_extension") == "no_extension"


def _write(tmp_path, text, name="gt.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_split_txt_counts_zero_face_entries_and_floats(tmp_path):
    path = _write(tmp_path, "e/a.jpg\n2\n1 2 3 4 0 1 0 0 2 0 \n5.5 6 7 8.25 1 0 1 0 0 1\ne/b.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n")
    ann = parse_split_txt(path)
    assert ann.images.image_id.tolist() == ["e/a", "e/b"]
    assert ann.images.event.tolist() == ["e", "e"]
    gt = ann.gt
    assert len(gt) == 3  # the 0-face image keeps its all-zero placeholder, as the .mat does
    np.testing.assert_allclose(gt[["x1", "y1", "x2", "y2"]].to_numpy()[:2], [[1, 2, 4, 6], [5.5, 6, 12.5, 14.25]])
    assert gt.gt_id.tolist() == [0, 1, 0]
    assert gt.loc[0, ["blur", "expression", "illumination", "invalid", "occlusion", "pose"]].tolist() == [0, 1, 0, 0, 2, 0]
    assert gt.iloc[2][["x1", "y1", "x2", "y2"]].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("e/a.jpg\nx\n", 2, "face count"),
        ("e/a.jpg\n1\n1 2 3\n", 3, "10 numbers"),
        ("e/a.jpg\n1\n1 2 3 4 0 0 0 0 zero 0\n", 3, "numbers"),
        ("e/a.jpg\n2\n1 2 3 4 0 0 0 0 0 0\n", None, "file ended"),
        ("not-an-image\n1\n", 1, "image path"),
        ("e/a.jpg\n0\n1 0 0 0 0 0 0 0 0 0\n", 3, "all-zero"),
    ],
)
def test_split_txt_malformed(tmp_path, text, line, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(FormatError) as err:
        parse_split_txt(path)
    message = str(err.value)
    assert str(path) in message and fragment in message
    if line is not None:
        assert f"{path}:{line}:" in message


def test_retinaface_labels(tmp_path):
    text = ("# e/a.jpg\n10 20 30 40 11 21 0.0 12 22 0.0 13 23 0.0 14 24 0.0 15 25 0.0 0.9\n"
            "1 2 3 4 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1\n# e/b.jpg\n")
    ann = parse_retinaface_labels(_write(tmp_path, text, "label.txt"))
    assert ann.images.image_id.tolist() == ["e/a", "e/b"]
    assert len(ann.gt) == 2
    first = ann.gt.iloc[0]
    assert (first.x1, first.y1, first.x2, first.y2) == (10, 20, 40, 60)
    assert [first[f"lm_x{i}"] for i in range(5)] == [11, 12, 13, 14, 15]
    assert np.isnan(ann.gt.iloc[1].lm_x0)


@pytest.mark.parametrize("text, line", [("1 2 3 4\n", 1), ("# e/a.jpg\n1 2 3\n", 2), ("#\n", 1)])
def test_retinaface_labels_malformed(tmp_path, text, line):
    path = _write(tmp_path, text, "label.txt")
    with pytest.raises(FormatError, match=f"{path}:{line}:"):
        parse_retinaface_labels(path)


def test_box_table(tmp_path):
    table = pd.DataFrame({"image": ["a.jpg", "sub/b.png", "a.jpg"], "x1": [0, 1, 2], "y1": [0, 1, 2],
                          "x2": [10, 5, 2], "y2": [10, 6, 9], "ignore": [False, True, False]})
    ann = parse_box_table(table, tmp_path / "boxes.csv", ["a.jpg", "sub/b.png", "c.jpg"])
    assert ann.images.image_id.tolist() == ["a", "c", "sub/b"]
    assert ann.gt.image_id.tolist() == ["a", "sub/b", "a"]
    assert ann.gt.gt_id.tolist() == [0, 0, 1]
    assert ann.gt.ignore.tolist() == [False, True, False]
    assert ann.gt.iloc[1][["x1", "y1", "x2", "y2"]].tolist() == [1, 1, 5, 6]


@pytest.mark.parametrize(
    "row, fragment",
    [({"image": "missing.jpg"}, "exists in the images folder"), ({"x2": -5}, "x2 >= x1"), ({"y1": "abc"}, "numeric")],
)
def test_box_table_errors_name_row(tmp_path, row, fragment):
    base = {"image": "a.jpg", "x1": 0, "y1": 0, "x2": 10, "y2": 10}
    table = pd.DataFrame([base, {**base, **row}])
    with pytest.raises(FormatError, match=f"boxes.csv:3: expected .*{fragment}"):
        parse_box_table(table, tmp_path / "boxes.csv", ["a.jpg"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from("ab/.0123456789 -\n#jpg"), max_size=80))
def test_parsers_fuzz_raise_only_format_errors(tmp_path, text):
    path = _write(tmp_path, text, "fuzz.txt")
    for parser in (parse_split_txt, parse_retinaface_labels):
        try:
            parser(path)
        except FormatError as exc:
            assert str(path) in str(exc)


# ----------------------------------------------------------------------------- shared data


def test_widerface416_txt_equals_mat():
    root = need_shared("widerface416")
    txt = parse_split_txt(root / "wider_face_split" / "wider_face_val_bbx_gt.txt")
    mat = parse_eval_mat(root / "ground_truth")
    assert len(txt.images) == len(mat.images) == 93
    assert len(txt.gt) == len(mat.gt) == 1586
    assert check_same_boxes(txt.gt, mat.gt, atol=1e-4) == []
    left = txt.gt.sort_values(["image_id", "gt_id"]).reset_index(drop=True)
    right = mat.gt.sort_values(["image_id", "gt_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(left[list(ATTRIBUTE_COLUMNS)], right[list(ATTRIBUTE_COLUMNS)])
    assert mat.has_subsets and right.hard.sum() >= right.medium.sum() >= right.easy.sum() > 0


def test_full_val_ground_truth_counts():
    mat = parse_eval_mat(need_shared("widerface", "ground_truth"))
    assert len(mat.images) == 3226
    assert len(mat.gt) == 39708  # including 4 all-zero placeholders of the 0-face images
    sizes = mat.gt.groupby("image_id").size()
    placeholders = mat.gt[(mat.gt[["x1", "y1", "x2", "y2"]] == 0).all(axis=1)]
    assert len(placeholders) == 4 and (sizes[placeholders.image_id] == 1).all()
    assert mat.gt[["easy", "medium", "hard"]].sum().tolist() == [7211, 13319, 31958]
    # the official truth has one box with negative width; it is kept as the official evaluation keeps it
    assert int(((mat.gt.x2 - mat.gt.x1) < 0).sum()) == 1


def test_label_txt_matches_official_boxes():
    labels = parse_retinaface_labels(need_shared("widerface", "retinaface_labels", "val_label.txt"))
    mat = parse_eval_mat(need_shared("widerface", "ground_truth"))
    assert len(labels.images) == 3226 and len(labels.gt) == 39708
    # the only difference: label.txt clips the negative-width official box to width 0
    assert check_same_boxes(labels.gt, mat.gt) == [
        "1 boxes differ, first at 39--Ice_Skating/39_Ice_Skating_iceskiing_39_583 face 7"
    ]
