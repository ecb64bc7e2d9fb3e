"""Weighted Boxes Fusion: pipeline.fusion and ``confrank fuse``.

Fast tests on synthetic boxes (exact numbers, a detector without boxes, the normalisation
round trip, the stage's errors and sharding); a slow test on real detections of three
detectors on two non-square val34 images, where our output must equal the ``ensemble-boxes``
package called directly, image by image, after torchvision's NMS.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from ensemble_boxes import weighted_boxes_fusion as package_wbf
from torchvision.ops import batched_nms

from pipeline.fusion import weighted_boxes_fusion
from pipeline.tables import read_metadata, read_table, write_table
from stages.layout import Layout
from tests.support import need_shared, one_thread, run_cli

BOX = ["x1", "y1", "x2", "y2"]


def frame(rows, detector="toy") -> pd.DataFrame:
    """A detections frame of (image_id, x1, y1, x2, y2, score) rows."""
    out = pd.DataFrame(rows, columns=["image_id", *BOX, "score"])
    return out.assign(detector=detector, scale=0, flip=False)


def by_image(final: pd.DataFrame) -> dict[str, list[tuple[float, ...]]]:
    """{image: [(x1, y1, x2, y2, score), ...] best score first}."""
    final = final.sort_values(["image_id", "score"], ascending=[True, False])
    return {str(i): [tuple(map(float, r)) for r in g[[*BOX, "score"]].to_numpy()] for i, g in final.groupby("image_id")}


# --------------------------------------------------------------------------- the library


def test_two_detectors_fuse_to_the_score_weighted_box_with_the_mean_score():
    a = frame([("e/a", 10, 10, 30, 30, 0.9),
               ("e/a", 11, 11, 31, 31, 0.8),  # NMS of detector a removes it first (IoU 0.83 > 0.4)
               ("e/a", 60, 60, 80, 80, 0.5),
               ("e/a", 0, 0, 5, 5, 0.01)])  # below skip_box_thr
    b = frame([("e/a", 12, 10, 32, 30, 0.6)])
    got = by_image(weighted_boxes_fusion([a, b], {"e/a": (100, 100)}))["e/a"]
    assert len(got) == 2
    # a and b match (IoU 360/440 > 0.55): coordinates weighted by score, score = mean x 2/2 models
    assert got[0] == pytest.approx(((0.9 * 10 + 0.6 * 12) / 1.5, 10, (0.9 * 30 + 0.6 * 32) / 1.5, 30, 0.75), rel=1e-6)
    # a lone box of one of two detectors: its score x 1/2
    assert got[1] == pytest.approx((60, 60, 80, 80, 0.25), rel=1e-6)


def test_settings_are_passed_through():
    a = frame([("e/a", 10, 10, 30, 30, 0.9), ("e/a", 11, 11, 31, 31, 0.8)])
    b = frame([("e/a", 12, 10, 32, 30, 0.6)])
    sizes = {"e/a": (100, 100)}
    # no NMS first (IoU 1 suppresses nothing): three boxes in one cluster, mean score x 2/2
    got = by_image(weighted_boxes_fusion([a, b], sizes, nms_iou=1.0))["e/a"]
    assert len(got) == 1 and got[0][4] == pytest.approx((0.9 + 0.8 + 0.6) / 3 * 2 / 2, rel=1e-6)
    assert by_image(weighted_boxes_fusion([a, b], sizes, conf_type="max"))["e/a"][0][4] == pytest.approx(0.9)
    assert len(weighted_boxes_fusion([a, b], sizes, iou_thr=0.9)) == 2  # IoU 0.82 no longer matches
    assert weighted_boxes_fusion([a, b], sizes, skip_box_thr=0.95).empty
    assert len(weighted_boxes_fusion([a, b], sizes, nms_iou=1.0, iou_thr=0.9, keep=1)) == 1


def test_an_image_or_a_whole_detector_without_boxes():
    a = frame([("e/a", 10, 10, 30, 30, 0.8), ("e/b", 40, 40, 60, 70, 0.6)])
    b = frame([("e/a", 10, 10, 30, 30, 0.4)])  # nothing on e/b
    empty = frame([]).astype({c: np.float32 for c in [*BOX, "score"]})
    sizes = {"e/a": (100, 100), "e/b": (100, 100), "e/c": (100, 100)}
    got = by_image(weighted_boxes_fusion([a, b, empty], sizes))
    assert set(got) == {"e/a", "e/b"}  # e/c: no detector has a box
    assert got["e/a"] == [pytest.approx((10, 10, 30, 30, (0.8 + 0.4) / 2 * 2 / 3), rel=1e-6)]
    assert got["e/b"] == [pytest.approx((40, 40, 60, 70, 0.6 / 3), rel=1e-6)]
    assert weighted_boxes_fusion([empty, empty], sizes).columns.tolist() == ["image_id", *BOX, "score"]


def test_normalisation_round_trip_on_a_non_square_image():
    """Boxes of one detector that match nothing come back where they were (width and height
    not swapped); a box sticking out of the image is clipped to it; one entirely outside
    (zero area once clipped) is dropped, as the package drops it."""
    rows = [("e/w", 600, 20, 630, 60, 0.9), ("e/w", 5, 430, 45, 470, 0.8), ("e/w", 300, 200, 340, 260, 0.7),
            ("e/w", -10, -5, 20, 25, 0.6), ("e/w", 700, 10, 720, 30, 0.5)]
    got = by_image(weighted_boxes_fusion([frame(rows)], {"e/w": (640, 480)}))["e/w"]
    expected = [r[1:] for r in rows[:3]] + [(0, 0, 20, 25, 0.6)]
    assert got == [pytest.approx(e, rel=1e-6, abs=1e-4) for e in expected]


def test_the_config_schema_offers_the_packages_conf_types():
    from pipeline.fusion import CONF_TYPES
    from stages.common import load_schema

    fusion = load_schema()["properties"]["fusions"]["additionalProperties"]["properties"]
    assert tuple(fusion["conf_type"]["enum"]) == CONF_TYPES


def test_an_image_without_a_size_is_an_error():
    with pytest.raises(Exception, match="e/x"):
        weighted_boxes_fusion([frame([("e/x", 1, 1, 9, 9, 0.9)])], {"e/a": (10, 10)})


# --------------------------------------------------------------------------- the stage

SIZES = {"e/a": (200, 100), "e/b": (200, 100), "e/c": (200, 100)}
DETS = {
    "slim": frame([("e/a", 10, 10, 30, 30, 0.9), ("e/b", 50, 50, 70, 80, 0.7), ("e/c", 5, 5, 15, 15, 0.3)], "slim"),
    "rfb": frame([("e/a", 12, 10, 32, 30, 0.6), ("e/a", 150, 60, 170, 90, 0.5)], "rfb"),  # nothing on e/b, e/c
}


@pytest.fixture
def toy(tmp_path) -> Layout:
    layout = Layout(tmp_path / "data")
    images = pd.DataFrame({"image_id": list(SIZES), "path": "", "width": 200, "height": 100, "split": "val", "event": "e"})
    write_table(images, layout.images("toy"), "images")
    gt = pd.DataFrame({"image_id": ["e/a", "e/b"], "gt_id": [0, 0], "x1": [10, 50], "y1": [10, 50], "x2": [30, 70],
                       "y2": [30, 80], **{k: True for k in ("easy", "medium", "hard")},
                       **{k: 0 for k in ("blur", "expression", "illumination", "invalid", "occlusion", "pose")}})
    write_table(gt, layout.gt("toy"), "gt")
    # slim in two shards (e/a | e/b, e/c), rfb in one: groups must still keep an image together
    slim = DETS["slim"]
    write_table(slim[slim.image_id == "e/a"], layout.detections("toy", "slim", "original", 0), "detections")
    write_table(slim[slim.image_id != "e/a"], layout.detections("toy", "slim", "original", 1), "detections")
    write_table(DETS["rfb"], layout.detections("toy", "rfb", "original", 0), "detections")
    return layout


def fuse_args(layout: Layout, detectors: str, *extra: str) -> list[str]:
    return ["fuse", "--dataset", "toy", "--detectors", detectors, "--scales", "original", "--method", "wbf",
            "--name", "both", "--data-dir", str(layout.root), *extra]


def test_fuse_stage_writes_the_library_result_and_evaluate_scores_it(toy, capsys):
    code, out, err = run_cli(fuse_args(toy, "slim,rfb", "--dask-scheduler", "synchronous"), capsys)
    assert code == 0, err
    path = toy.final("toy", "both", "original", "wbf")
    final = read_table(path, "final")
    stored = [d.astype({c: np.float32 for c in [*BOX, "score"]}) for d in DETS.values()]  # as the shards hold them
    expected = weighted_boxes_fusion(stored, SIZES)
    assert by_image(final) == by_image(expected)
    keys = list(zip(final.image_id.astype(str), -final.score))
    assert keys == sorted(keys)  # sorted by image, then score descending
    meta = read_metadata(path)
    assert meta["stage"] == "fuse" and meta["config"]["detectors"] == ["slim", "rfb"]
    assert meta["config"]["method"] == "wbf" and meta["config"]["package"] == "ensemble-boxes==1.0.9"
    assert {k: meta["config"][k] for k in ("nms_iou", "iou_thr", "skip_box_thr", "conf_type", "keep")} == \
        {"nms_iou": 0.4, "iou_thr": 0.55, "skip_box_thr": 0.02, "conf_type": "avg", "keep": 750}

    code, out, err = run_cli(["evaluate", "--dataset", "toy", "--detector", "both", "--scales", "original",
                              "--method", "wbf", "--format", "json", "--data-dir", str(toy.root)], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == "wbf" and result["detector"] == "both" and result["ap"]["hard"] == 1.0
    assert result["postprocess"]["fusion"] == "wbf" and result["postprocess"]["detectors"] == ["slim", "rfb"]


def test_oracle_shards_are_read_when_they_match_the_detection_shards(toy, capsys):
    assert run_cli(fuse_args(toy, "slim,rfb"), capsys)[0] == 0
    first = read_table(toy.final("toy", "both", "original", "wbf"), "final")
    # oracle shards of rfb with a changed score: read instead of its detections
    write_table(DETS["rfb"].assign(score=0.3, oracle_iou=0.0, gt_id=-1), toy.oracle("toy", "rfb", "original", 0), "detections")
    assert run_cli(fuse_args(toy, "slim,rfb"), capsys)[0] == 0
    second = read_table(toy.final("toy", "both", "original", "wbf"), "final")
    assert not first.equals(second) and read_metadata(toy.final("toy", "both", "original", "wbf"))["inputs"]


def test_a_detector_without_shards_fails_naming_the_detect_command_and_writes_nothing(toy, capsys):
    code, _, err = run_cli(fuse_args(toy, "slim,rfb,retinaface-mnet025"), capsys)
    assert code == 1
    assert "confrank detect --dataset toy --detector retinaface-mnet025 --scales original" in err
    assert not (toy.root / "processed").exists()  # nothing written, not even a temporary file


def test_bad_options_are_refused(toy, capsys):
    code, _, err = run_cli(fuse_args(toy, "slim,rfb")[:-2] + ["--data-dir", str(toy.root), "--method", "voting"], capsys)
    assert code != 0 and "--method" in err
    args = fuse_args(toy, "slim,rfb")
    args[args.index("--name") + 1] = "a/b"
    code, _, err = run_cli(args, capsys)
    assert code != 0 and "--name" in err
    # boxes of an image the images table does not have
    write_table(frame([("e/zz", 1, 1, 9, 9, 0.9)], "rfb"), toy.detections("toy", "rfb", "original", 1), "detections")
    code, _, err = run_cli(fuse_args(toy, "slim,rfb"), capsys)
    assert code == 1 and "e/zz" in err and not toy.final("toy", "both", "original", "wbf").exists()


# --------------------------------------------------------------------------- real detections

DETECTORS = ("retinaface-mnet025", "slim", "rfb")


def reference_wbf(frames, sizes, keep=750):
    """The recipe written out: torchvision's batched NMS per image at 0.4 (+1 pixel convention,
    as py_cpu_nms), then the package's own call per image on normalised boxes, scaled back."""
    per_detector = []
    for dets in frames:
        codes, images = pd.factorize(dets["image_id"].astype(str))
        boxes = torch.tensor(dets[BOX].to_numpy(np.float64))
        scores = torch.tensor(dets["score"].to_numpy(np.float64))
        shifted = boxes.clone()
        shifted[:, 2:] += 1
        kept = batched_nms(shifted, scores, torch.tensor(codes), 0.4).numpy()
        per_detector.append((np.asarray(images)[codes[kept]], boxes.numpy()[kept], scores.numpy()[kept]))
    rows = []
    for image, (w, h) in sorted(sizes.items()):
        scale = np.array([w, h, w, h], dtype=np.float64)
        boxes_list = [np.clip(b[i == image] / scale, 0, 1) for i, b, _ in per_detector]
        scores_list = [s[i == image] for i, _, s in per_detector]
        labels_list = [np.zeros(len(s)) for s in scores_list]
        fused, fused_scores, _ = package_wbf(boxes_list, scores_list, labels_list, iou_thr=0.55, skip_box_thr=0.02,
                                             conf_type="avg")
        for box, score in zip(fused[:keep] * scale, fused_scores[:keep]):
            rows.append((image, *box, score))
    out = pd.DataFrame(rows, columns=["image_id", *BOX, "score"])
    return out.astype({c: np.float32 for c in [*BOX, "score"]})


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Layout:
    """Two val34 images (1024x754, 1024x682) indexed and detected by three detectors at original."""
    root, weights = need_shared("widerface-val34"), need_shared("weights")
    layout = Layout(tmp_path_factory.mktemp("fusion") / "data")
    commands = [["index", "--name", "v34", "--root", root], ["subset", "--parent", "v34", "--name", "two", "--max-images", 2]]
    commands += [["detect", "--dataset", "two", "--detector", d, "--scales", "original", "--device", "cpu", "--workers", 0]
                 for d in DETECTORS]
    from stages.cli import main

    with one_thread(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONFRANK_WEIGHTS", str(weights))
        for args in commands:
            try:
                main([str(a) for a in [*args, "--data-dir", layout.root]])
            except SystemExit as exc:
                assert not exc.code, f"confrank {args} exited {exc.code}"
    return layout


@pytest.mark.slow
def test_real_detections_equal_the_package_called_directly(real, capsys):
    images = read_table(real.images("two"), "images")
    sizes = {str(r.image_id): (int(r.width), int(r.height)) for r in images.itertuples()}
    assert len(sizes) == 2 and all(w != h for w, h in sizes.values())
    frames = [read_table(real.detections("two", d, "original", 0), "detections") for d in DETECTORS]
    assert all(len(f) > 100 for f in frames)
    expected = reference_wbf(frames, sizes)
    ours = weighted_boxes_fusion(frames, sizes)
    assert len(ours) == len(expected) > 0
    assert by_image(ours) == by_image(expected)  # exact, float32 for float32
    # and the stage writes the same boxes
    args = ["fuse", "--dataset", "two", "--detectors", ",".join(DETECTORS), "--scales", "original", "--method", "wbf",
            "--name", "wbf3", "--data-dir", str(real.root)]
    with one_thread():
        code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert by_image(read_table(real.final("two", "wbf3", "original", "wbf"), "final")) == by_image(expected)
