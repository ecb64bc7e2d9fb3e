"""Messy inputs through the real commands: each fails with one line naming the file (and
line) and leaves no output behind, or works as documented in the README, "Failure behaviour".

Parser-level cases (malformed lines, zero-byte or missing images at index time, foreign
ranker files refused by rerank) are in test_widerface.py, test_index.py and
test_ranker_*.py; here the same faults are driven through `confrank` end to end, including
faults that appear after indexing (an image damaged or deleted between index and detect).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from pipeline.detectors import registry
from pipeline.errors import FormatError
from pipeline.tables import read_table
from stages.layout import Layout
from tests.support import ROOT, need_shared, run_cli

DETECT = ["detect", "--dataset", "x", "--detector", "slim", "--device", "cpu", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("confrank: error: "), err
    return lines[0]


def copy_widerface(dest: Path, n: int = 3) -> tuple[Path, list[Path]]:
    """The first n images of widerface416 in WiderFace layout (split text file only)."""
    src = need_shared("widerface416")
    lines = (src / "wider_face_split" / "wider_face_val_bbx_gt.txt").read_text().splitlines()
    out, images, i = [], [], 0
    while len(images) < n:
        name, count = lines[i], int(lines[i + 1])
        block = lines[i:i + 2 + max(count, 1)]
        out += block
        target = dest / "WIDER_val" / "images" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "WIDER_val" / "images" / name, target)
        images.append(target)
        i += len(block)
    (dest / "wider_face_split").mkdir(parents=True)
    (dest / "wider_face_split" / "wider_face_val_bbx_gt.txt").write_text("\n".join(out) + "\n")
    return dest, images


def index(root: Path, data: Path, capsys, name: str = "x") -> None:
    code, _, err = run_cli(["index", "--name", name, "--root", root, "--data-dir", data], capsys)
    assert code == 0, err


def leftovers(data: Path) -> list[Path]:
    """Every file under the detections/latency folders (finals and temporaries)."""
    return sorted(p for sub in ("detections", "latency") for p in (data / "interim" / sub).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- images


def test_png_named_jpg_grey_and_cmyk_images_are_detected(tmp_path, capsys, weights_dir, monkeypatch):
    monkeypatch.setenv("CONFRANK_WEIGHTS", str(weights_dir))
    plain, _ = copy_widerface(tmp_path / "plain")
    messy, images = copy_widerface(tmp_path / "messy")
    bgr = cv2.imread(str(images[0]), cv2.IMREAD_COLOR)
    images[0].write_bytes(cv2.imencode(".png", bgr)[1].tobytes())  # same pixels, PNG bytes, .jpg name
    grey = cv2.imread(str(images[1]), cv2.IMREAD_GRAYSCALE)
    images[1].write_bytes(cv2.imencode(".jpg", grey)[1].tobytes())  # one-channel JPEG
    Image.open(images[2]).convert("CMYK").save(images[2], format="JPEG")  # four-channel JPEG
    frames = {}
    for name, root in (("plain", plain), ("messy", messy)):
        index(root, tmp_path / name / "data", capsys)
        code, _, err = run_cli([*DETECT, "--data-dir", tmp_path / name / "data"], capsys)
        assert code == 0, err
        frames[name] = read_table(Layout(tmp_path / name / "data").detections("x", "slim", "original", 0), "detections")
    plain_df, messy_df = (frames[k].assign(image_id=frames[k].image_id.astype(str)) for k in ("plain", "messy"))
    first = images[0].relative_to(messy / "WIDER_val" / "images").with_suffix("").as_posix()
    # the PNG holds the JPEG's decoded pixels: identical boxes
    pd.testing.assert_frame_equal(plain_df[plain_df.image_id == first].reset_index(drop=True),
                                  messy_df[messy_df.image_id == first].reset_index(drop=True))
    # grey and CMYK images are detected (3-channel conversions), with boxes
    counts = messy_df.groupby("image_id").size()
    assert len(counts) == 3 and (counts > 0).all()


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "expected a complete, readable image"),
    ("empty", "empty (0-byte) file"),
    ("delete", "image not found"),
    ("resize", "a 416x416 image (as indexed)"),
])
def test_image_damaged_after_index_fails_the_shard_naming_it(tmp_path, capsys, weights_dir, monkeypatch,
                                                             damage, expected):
    monkeypatch.setenv("CONFRANK_WEIGHTS", str(weights_dir))
    root, images = copy_widerface(tmp_path / "ds")
    data = tmp_path / "data"
    index(root, data, capsys)
    victim = images[1]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "delete":
        victim.unlink()
    else:
        cv2.imwrite(str(victim), cv2.resize(cv2.imread(str(images[0])), (300, 200)))
    code, _, err = run_cli([*DETECT, "--data-dir", data], capsys)
    line = one_line_error(err)
    assert code == 1 and str(victim) in line and expected in line
    assert leftovers(data) == []


def test_truncated_jpeg_passes_index_and_fails_detect(tmp_path, capsys, weights_dir, monkeypatch):
    """index reads image headers only (fast on 8K frames); the full decode in detect finds it."""
    monkeypatch.setenv("CONFRANK_WEIGHTS", str(weights_dir))
    root, images = copy_widerface(tmp_path / "ds", n=2)
    images[0].write_bytes(images[0].read_bytes()[:4000])
    index(root, tmp_path / "data", capsys)
    code, _, err = run_cli([*DETECT, "--data-dir", tmp_path / "data"], capsys)
    assert code == 1 and str(images[0]) in one_line_error(err)
    assert leftovers(tmp_path / "data") == []  # no shard written


# ----------------------------------------------------------------------------- annotations


def test_malformed_label_file_names_file_and_line(tmp_path, capsys):
    root, _ = copy_widerface(tmp_path / "ds", n=1)
    (root / "wider_face_split" / "wider_face_val_bbx_gt.txt").unlink()
    labels = root / "val" / "label.txt"
    labels.parent.mkdir()
    labels.write_text("# 0--Parade/a.jpg\n1 2 3 4\n1 2 three 4\n")
    code, _, err = run_cli(["index", "--name", "x", "--root", root, "--data-dir", tmp_path / "data"], capsys)
    assert code == 1 and f"{labels}:3: expected" in one_line_error(err)
    assert not (tmp_path / "data").exists()


def test_zero_size_and_negative_ground_truth_boxes_are_kept(tmp_path, capsys):
    """As the official .mat has them: all-zero placeholder of a face-less image, negative width."""
    root = tmp_path / "ds"
    (root / "wider_face_split").mkdir(parents=True)
    (root / "wider_face_split" / "wider_face_val_bbx_gt.txt").write_text(
        "0--Parade/empty.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n"
        "0--Parade/odd.jpg\n3\n10 10 20 20 0 0 0 0 0 0\n50 60 -4 12 2 0 0 0 1 0\n5 5 0 0 0 0 0 1 0 0\n")
    index(root, tmp_path / "data", capsys)
    gt = read_table(Layout(tmp_path / "data").gt("x"), "gt")
    boxes = gt[["x1", "y1", "x2", "y2"]].to_numpy().tolist()
    assert gt.image_id.astype(str).tolist() == ["0--Parade/empty", "0--Parade/odd", "0--Parade/odd", "0--Parade/odd"]
    assert boxes == [[0, 0, 0, 0], [10, 10, 30, 30], [50, 60, 46, 72], [5, 5, 5, 5]]


def test_detections_shard_with_wrong_schema_is_refused_by_its_reader(tmp_path, capsys):
    """A shard another tool wrote (xywh columns) where oracle shards are expected: train stops
    naming the file and the differences."""
    from tests.test_ranker_train import make_dataset

    layout = Layout(tmp_path / "data")
    make_dataset(tmp_path / "raw", layout, n_images=2, detectors=("detA",))
    bad = layout.oracle("toy", "detA", "original", 1)
    pq_frame = pd.DataFrame({"image_id": ["0--Toy/img_1"], "x": [1.0], "y": [2.0], "w": [3.0], "h": [4.0],
                             "score": [0.5]})
    pq_frame.to_parquet(bad)
    code, _, err = run_cli(["train", "--datasets", "toy", "--detectors", "detA", "--scales", "original",
                            "--ranker", "r", "--image-branch", "none", "--iterations", "1", "--num-boxes", "8",
                            "--workers", "0", "--device", "cpu", "--data-dir", layout.root], capsys)
    line = one_line_error(err)
    assert code == 1 and str(bad) in line and "not a 'detections' table" in line and "'x1'" in line
    assert not layout.ranker_dir("r").exists() or not layout.ranker_model("r").exists()


# ----------------------------------------------------------------------------- weights and checkpoints


def test_weights_with_wrong_sha256_stop_detect_before_any_work(tmp_path, capsys, weights_dir, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    data = (weights_dir / "slim_Final.pth").read_bytes()
    (cache / "slim_Final.pth").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit
    monkeypatch.setenv("CONFRANK_WEIGHTS", str(cache))
    root, _ = copy_widerface(tmp_path / "ds", n=1)
    index(root, tmp_path / "data", capsys)
    code, _, err = run_cli([*DETECT, "--data-dir", tmp_path / "data"], capsys)
    line = one_line_error(err)
    assert code == 1 and str(cache / "slim_Final.pth") in line and "sha256 mismatch" in line
    assert leftovers(tmp_path / "data") == []


def test_checkpoint_of_another_detector_is_refused_naming_it(weights_dir):
    """A RetinaFace state dict given to slim (bypassing the pinned sha256, as a user-supplied
    checkpoint would): a FormatError naming the file, not a torch traceback."""
    retina = weights_dir / "retinaface_mobilenet0.25_Final.pth"
    with pytest.raises(FormatError, match=f"{retina}: expected a \\w+ state dict"):
        registry.build("slim", {"slim_Final": retina}, torch.device("cpu"))


def test_user_supplied_checkpoint_of_another_detector_fails_detect(tmp_path, capsys, weights_dir, monkeypatch):
    """`weights add` pins whatever file the user gives for the unpinned ResNet-50 entry; a
    slim checkpoint added by mistake is caught when retinaface-r50 loads it."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONFRANK_WEIGHTS", str(cache))
    code, _, err = run_cli(["weights", "add", "--name", "Resnet50_Final", weights_dir / "slim_Final.pth"], capsys)
    assert code == 0, err
    root, _ = copy_widerface(tmp_path / "ds", n=1)
    index(root, tmp_path / "data", capsys)
    code, _, err = run_cli(["detect", "--dataset", "x", "--detector", "retinaface-r50", "--device", "cpu",
                            "--workers", "0", "--data-dir", tmp_path / "data"], capsys)
    line = one_line_error(err)
    assert code == 1 and str(cache / "Resnet50_Final.pth") in line and "state dict" in line
    assert leftovers(tmp_path / "data") == []


def test_weights_file_that_is_not_a_checkpoint_fails_naming_it(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    junk = tmp_path / "Resnet50_Final.pth"
    junk.write_bytes(b"<html>404 Not Found</html>\n")  # a failed download saved as the checkpoint
    monkeypatch.setenv("CONFRANK_WEIGHTS", str(cache))
    assert run_cli(["weights", "add", "--name", "Resnet50_Final", junk], capsys)[0] == 0
    root, _ = copy_widerface(tmp_path / "ds", n=1)
    index(root, tmp_path / "data", capsys)
    code, _, err = run_cli(["detect", "--dataset", "x", "--detector", "retinaface-r50", "--device", "cpu",
                            "--workers", "0", "--data-dir", tmp_path / "data"], capsys)
    line = one_line_error(err)
    assert code == 1 and str(cache / "Resnet50_Final.pth") in line


@pytest.mark.parametrize("content", [b"", b"not a torch file", "foreign"])
def test_foreign_or_corrupt_ranker_checkpoint_stops_train_naming_it(tmp_path, capsys, content):
    from tests.test_ranker_train import make_dataset

    layout = Layout(tmp_path / "data")
    make_dataset(tmp_path / "raw", layout, n_images=2, detectors=("detA",))
    ckpt = layout.ranker_dir("r") / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    if content == "foreign":
        torch.save({"model": {}, "step": 3}, ckpt)  # some other project's checkpoint
    else:
        ckpt.write_bytes(content)
    before = ckpt.read_bytes()
    code, _, err = run_cli(["train", "--datasets", "toy", "--detectors", "detA", "--scales", "original",
                            "--ranker", "r", "--image-branch", "none", "--iterations", "2", "--num-boxes", "8",
                            "--workers", "0", "--device", "cpu", "--data-dir", layout.root], capsys)
    line = one_line_error(err)
    assert code == 1 and str(ckpt) in line and "not a confrank ranker checkpoint" in line
    assert ckpt.read_bytes() == before and not layout.ranker_model("r").exists()


@pytest.mark.parametrize("content", [b"", b"not a torch file"])
def test_corrupt_ranker_model_stops_rerank_with_one_line(tmp_path, capsys, content):
    from tests.test_ranker_train import make_dataset

    layout = Layout(tmp_path / "data")
    make_dataset(tmp_path / "raw", layout, n_images=2, detectors=("detA",))
    model = layout.ranker_model("r")
    model.parent.mkdir(parents=True)
    model.write_bytes(content)
    code, _, err = run_cli(["rerank", "--dataset", "toy", "--detector", "detA", "--scales", "original",
                            "--ranker", "r", "--device", "cpu", "--data-dir", layout.root], capsys)
    line = one_line_error(err)
    assert code == 1 and str(model) in line and "not a confrank ranker model" in line
    assert not layout.reranked_dir("r", "toy", "detA", "original").exists()


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["datasets"]["sample"].update(shards="two"), "datasets.sample.shards: 'two' is not of type 'integer'"),
    (lambda c: c["postprocess"].update(nms_treshold=0.5), "postprocess: Additional properties are not allowed"),
])
def test_bad_config_stops_snakemake_before_any_job(tmp_path, edit, message):
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    edit(config)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "Snakefile"),
                           "--configfile", "bad.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    # the Snakefile merges config files, so the message names the key path (not the file)
    assert f"config: {message}" in proc.stderr + proc.stdout
    assert not (tmp_path / "data").exists()
