"""`confrank index`, `inspect` and `sample` through the CLI, on shared and generated data."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.tables import read_metadata, read_table
from stages.layout import Layout
from tests.support import need_shared, run_cli


def test_index_widerface416(tmp_path, capsys):
    root = need_shared("widerface416")
    code, out, err = run_cli(["index", "--name", "w416", "--root", str(root), "--data-dir", str(tmp_path)], capsys)
    assert code == 0, err
    assert "93 images, 1586 faces" in out
    layout = Layout(tmp_path)
    images = read_table(layout.images("w416"), "images")
    assert len(images) == 93 and (images.width == 416).all() and (images.height == 416).all()
    assert images.path.iloc[0].startswith("WIDER_val/images/")
    meta = read_metadata(layout.gt("w416"))
    assert meta["has_subsets"] and meta["images_present"] and meta["stage"] == "index"


def test_subset_halves_partition_the_dataset(tmp_path, capsys):
    root = need_shared("widerface416")
    assert run_cli(["index", "--name", "w416", "--root", str(root), "--data-dir", str(tmp_path)], capsys)[0] == 0
    layout = Layout(tmp_path)
    parent_images = read_table(layout.images("w416"), "images")
    parent_gt = read_table(layout.gt("w416"), "gt")
    halves = {}
    for half in ("first", "second"):
        code, out, err = run_cli(["subset", "--parent", "w416", "--name", half, "--half", half,
                                  "--data-dir", str(tmp_path)], capsys)
        assert code == 0, err
        halves[half] = read_table(layout.images(half), "images")
        gt = read_table(layout.gt(half), "gt")
        expected = parent_gt[parent_gt.image_id.isin(halves[half].image_id)].reset_index(drop=True)
        pd.testing.assert_frame_equal(gt.astype({"image_id": str}), expected.astype({"image_id": str}))
        # the images keep the parent's root: their paths still resolve
        assert read_metadata(layout.images(half))["root"] == read_metadata(layout.images("w416"))["root"]
    first, second = (list(halves[h].image_id.astype(str)) for h in ("first", "second"))
    assert (len(first), len(second)) == (47, 46)
    all_ids = sorted(parent_images.image_id.astype(str))
    assert not set(first) & set(second) and sorted(first + second) == all_ids
    assert first == all_ids[0::2]
    code, out, err = run_cli(["subset", "--parent", "w416", "--name", "few", "--half", "second", "--max-images", "5",
                              "--data-dir", str(tmp_path)], capsys)
    assert code == 0 and "subset few: 5 images of w416" in out
    assert list(read_table(layout.images("few"), "images").image_id.astype(str)) == second[:5]
    code, out, err = run_cli(["subset", "--parent", "w416", "--name", "none", "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and "give --half, --max-images or both" in err
    code, out, err = run_cli(["subset", "--parent", "nope", "--name", "x", "--max-images", "1",
                              "--data-dir", str(tmp_path)], capsys)
    assert code == 1 and "index of dataset 'nope' not found" in err


@pytest.mark.slow
def test_index_ground_truth_only(tmp_path, capsys):
    code, out, _ = run_cli(["index", "--name", "val", "--root", str(need_shared("widerface")), "--data-dir", str(tmp_path)], capsys)
    assert code == 0 and "3226 images, 39708 faces" in out
    images = read_table(Layout(tmp_path).images("val"), "images")
    assert images.width.isna().all()
    assert not read_metadata(Layout(tmp_path).images("val"))["images_present"]


def _copy_small_widerface(tmp_path, n=3):
    """A WiderFace-layout copy of the first n images of widerface416 (txt only)."""
    src = need_shared("widerface416")
    lines = (src / "wider_face_split" / "wider_face_val_bbx_gt.txt").read_text().splitlines()
    out, i, kept = [], 0, 0
    while i < len(lines) and kept < n:
        name, count = lines[i], int(lines[i + 1])
        block = lines[i:i + 2 + max(count, 1)]
        out += block
        dest = tmp_path / "ds" / "WIDER_val" / "images" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "WIDER_val" / "images" / name, dest)
        i += len(block)
        kept += 1
    split = tmp_path / "ds" / "wider_face_split"
    split.mkdir(parents=True)
    (split / "wider_face_val_bbx_gt.txt").write_text("\n".join(out) + "\n")
    return tmp_path / "ds"


def test_index_missing_image_is_an_error_naming_it(tmp_path, capsys):
    root = _copy_small_widerface(tmp_path, n=4)
    images = sorted((root / "WIDER_val" / "images").rglob("*.jpg"))
    images[1].unlink()
    code, _, err = run_cli(["index", "--name", "x", "--root", str(root), "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 1
    assert err == f"confrank: error: {images[1]}: image listed in the annotations is missing\n"
    assert not (tmp_path / "data").exists()
    for victim in images[2:]:
        victim.unlink()
    code, _, err = run_cli(["index", "--name", "x", "--root", str(root), "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 1
    assert err == f"confrank: error: {images[1]}: image listed in the annotations is missing (and 2 more)\n"
    assert not (tmp_path / "data").exists()


def test_index_malformed_line_names_file_and_line(tmp_path, capsys):
    root = _copy_small_widerface(tmp_path)
    txt = root / "wider_face_split" / "wider_face_val_bbx_gt.txt"
    lines = txt.read_text().splitlines()
    lines[3] = "12 13 oops"
    txt.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(["index", "--name", "x", "--root", str(root), "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 1 and f"{txt}:4: expected 10 numbers" in err


def test_index_png_named_jpg_grey_and_cmyk(tmp_path, capsys):
    root = _copy_small_widerface(tmp_path)
    images = sorted((root / "WIDER_val" / "images").rglob("*.jpg"))
    grey = cv2.imread(str(images[0]), cv2.IMREAD_GRAYSCALE)
    ok, png = cv2.imencode(".png", grey)
    images[0].write_bytes(png.tobytes())  # a grey-scale PNG named .jpg
    from PIL import Image

    Image.open(images[1]).convert("CMYK").save(images[1], format="JPEG")
    code, out, err = run_cli(["index", "--name", "x", "--root", str(root), "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 0, err
    table = read_table(Layout(tmp_path / "data").images("x"), "images")
    assert (table.width == 416).all()


@pytest.mark.parametrize("damage", ["zero-byte", "not an image", "cut inside the header"])
def test_index_zero_byte_or_undecodable_image_fails(tmp_path, capsys, damage):
    """index reads every image's header: an image whose header cannot be read stops it,
    naming the image (a JPEG cut after its header passes: test_reliability_inputs.py)."""
    root = _copy_small_widerface(tmp_path)
    victim = sorted((root / "WIDER_val" / "images").rglob("*.jpg"))[1]
    content = {"zero-byte": b"", "not an image": b"<html>404 Not Found</html>\n",
               "cut inside the header": victim.read_bytes()[:300]}[damage]
    victim.write_bytes(content)
    code, _, err = run_cli(["index", "--name", "x", "--root", str(root), "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"confrank: error: {victim}: expected a readable image"), err
    assert not (tmp_path / "data").exists()


def test_index_generic_boxes_csv(tmp_path, capsys):
    root = tmp_path / "mine"
    (root / "cam1").mkdir(parents=True)
    for name in ("cam1/f0.jpg", "f1.png"):
        cv2.imwrite(str(root / name), np.zeros((30, 40, 3), np.uint8))
    pd.DataFrame({"image": ["cam1/f0.jpg", "cam1/f0.jpg"], "x1": [1, 5], "y1": [2, 6], "x2": [11, 9], "y2": [12, 20],
                  "ignore": [0, 1]}).to_csv(root / "boxes.csv", index=False)
    code, out, err = run_cli(["index", "--name", "mine", "--format", "boxes", "--root", str(root),
                              "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 0, err
    layout = Layout(tmp_path / "data")
    images = read_table(layout.images("mine"), "images")
    assert images.image_id.astype(str).tolist() == ["cam1/f0", "f1"]
    assert images.width.tolist() == [40, 40] and images.height.tolist() == [30, 30]
    gt = read_table(layout.gt("mine"), "gt")
    assert gt.ignore.tolist() == [False, True] and not gt.easy.any()


def test_inspect_text_and_json(tmp_path, capsys):
    root = need_shared("widerface416")
    assert run_cli(["index", "--name", "w", "--root", str(root), "--data-dir", str(tmp_path)], capsys)[0] == 0
    code, out, _ = run_cli(["inspect", str(Layout(tmp_path).gt("w")), "--format", "json"], capsys)
    report = json.loads(out)
    assert report["table"] == "gt" and report["rows"] == 1586
    assert report["summary"]["per_image"]["images"] == 93
    assert report["provenance"]["stage"] == "index" and len(report["head"]) == 5
    code, out, _ = run_cli(["inspect", str(Layout(tmp_path).index_dir("w"))], capsys)
    assert code == 0 and "table 'gt'" in out and "provenance:" in out and "first rows:" in out


def test_inspect_missing_path(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["inspect", str(tmp_path / "empty")], capsys)
    assert code == 1 and "no Parquet file" in err


def test_sample_is_deterministic_and_indexable(tmp_path, capsys):
    for out in ("a", "b"):
        code, text, err = run_cli(["sample", "--out", str(tmp_path / out), "--images", "2"], capsys)
        assert code == 0, err
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + 1 + 4
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    code, text, err = run_cli(["index", "--name", "demo", "--root", str(tmp_path / "a"), "--data-dir", str(tmp_path / "d")], capsys)
    assert code == 0, err
    gt = read_table(Layout(tmp_path / "d").gt("demo"), "gt")
    heights = gt.y2 - gt.y1
    assert heights.min() >= 9 and heights.max() <= 330
    assert gt.hard.all() and gt.easy.sum() == (heights >= 50).sum()


@pytest.mark.parametrize("args", [["index", "--name", "x"], ["inspect"]])
def test_usage_errors_exit_2(args, capsys):
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "Missing" in err


def test_operating_system_errors_are_one_line_naming_the_path(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, out, err = run_cli(["sample", "--out", str(blocker / "demo"), "--images", "1"], capsys)
    assert code == 1
    assert err.startswith("confrank: error: [Errno 20] Not a directory:") and str(blocker) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
