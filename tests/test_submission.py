"""The WiderFace submission text format: parsing, errors, exact round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import FormatError
from pipeline.submission import format_submission, parse_submission, submission_frame


def test_parse_real_style_file_with_trailing_spaces():
    text = "0_Parade_1\n2\n193 388 543 632 0.9999896 \n482 302 390 541 0.20316474 \n\n"
    name, boxes = parse_submission(text, "x.txt", expected_name="0_Parade_1")
    assert name == "0_Parade_1"
    np.testing.assert_array_equal(boxes, [[193, 388, 543, 632, 0.9999896], [482, 302, 390, 541, 0.20316474]])
    frame = submission_frame("0--Parade/0_Parade_1", boxes)
    assert frame.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [193, 388, 736, 1020]


def test_name_with_folder_and_extension_and_empty_file():
    name, boxes = parse_submission("0--Parade/0_Parade_1.jpg\n0\n", "x.txt", expected_name="0_Parade_1")
    assert name == "0_Parade_1" and boxes.shape == (0, 5)


@pytest.mark.parametrize("text, line, what", [
    ("", 1, "image name"),
    ("img\nthree\n", 2, "box count"),
    ("img\n1\n1 2 3 4\n", 3, "5 numbers"),
    ("img\n1\n1 2 3 4 x\n", 3, "5 numbers"),
    ("img\n2\n1 2 3 4 0.5\n", None, "2 box lines"),
    ("other\n0\n", 1, "name the image"),
    ("img\n1\n1 2 3 nan 0.5\n", 3, "finite"),
])
def test_errors_name_file_and_line(text, line, what):
    with pytest.raises(FormatError) as info:
        parse_submission(text, "sub/ev/img.txt", expected_name="img")
    message = str(info.value)
    assert message.startswith("sub/ev/img.txt" + (f":{line}" if line else ""))
    assert what in message


def test_format_then_parse_is_exact_in_float32():
    rng = np.random.default_rng(0)
    x1 = rng.uniform(0, 1000, 50).astype(np.float32)
    y1 = rng.uniform(0, 1000, 50).astype(np.float32)
    boxes = pd.DataFrame({
        "x1": x1, "y1": y1, "x2": (x1 + rng.uniform(1, 300, 50)).astype(np.float32),
        "y2": (y1 + rng.uniform(1, 300, 50)).astype(np.float32), "score": rng.random(50).astype(np.float32),
    })
    boxes.loc[0, ["x1", "y1", "x2", "y2"]] = [10, 20, 30, 40]
    text = format_submission("ev/img", boxes)
    assert text.splitlines()[0] == "img" and text.splitlines()[1] == "50"
    _, parsed = parse_submission(text, "t", expected_name="img")
    back = submission_frame("ev/img", parsed).astype({c: np.float32 for c in ("x1", "y1", "x2", "y2", "score")})
    want = boxes.iloc[np.argsort(-boxes["score"].to_numpy(), kind="stable")].reset_index(drop=True)
    for c in ("x1", "y1", "x2", "y2", "score"):
        np.testing.assert_array_equal(back[c].to_numpy(), want[c].to_numpy())
    assert "10 20 20 20 " in text  # integers are written without a decimal point
