"""End-to-end check of each detector port: official-protocol WiderFace AP on widerface416.

The reference numbers (README of the shared widerface416 set) come from the reference test
settings: BGR minus (104, 117, 123) at the image's own size, confidence > 0.02, top 5000,
torchvision NMS at IoU 0.4, keep 750. A faithful port reproduces them to +-0.002.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torchvision

from pipeline.detect import Decoded, DetectLoop
from pipeline.detectors import registry
from pipeline.imaging import decode_image, to_chw_tensor
from pipeline.metrics import evaluate_widerface
from pipeline.scales import scale_set
from pipeline.widerface import parse_eval_mat

TARGETS = {
    "retinaface-mnet025": (0.800108, 0.726471, 0.469769),
    "slim": (0.773507, 0.702574, 0.539794),
    "rfb": (0.784192, 0.727880, 0.578688),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def final_boxes(detections: pd.DataFrame) -> pd.DataFrame:
    """Reference post-processing: torchvision NMS at IoU 0.4 per image, keep 750."""
    frames = []
    for image_id, rows in detections.groupby("image_id", sort=True):
        boxes = torch.tensor(rows[["x1", "y1", "x2", "y2"]].to_numpy())
        scores = torch.tensor(rows["score"].to_numpy())
        keep = torchvision.ops.nms(boxes, scores, 0.4)[:750].numpy()
        frames.append(rows.iloc[keep][["image_id", "x1", "y1", "x2", "y2", "score"]])
    return pd.concat(frames, ignore_index=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_widerface416_ap_matches_reference(name, shared, weights_dir):
    root = shared("widerface416")
    gt = parse_eval_mat(root / "ground_truth").gt
    paths = sorted((root / "WIDER_val" / "images").glob("*/*.jpg"))
    images = [Decoded(f"{p.parent.name}/{p.stem}", to_chw_tensor(decode_image(p))) for p in paths]
    assert len(images) == 93
    info = registry.get_info(name)
    detector = registry.build(name, {w: weights_dir / f"{w}.pth" for w in info.weights}, torch.device("cpu"))
    detections, _ = DetectLoop(detector, scale_set("original"), batch_size=8).run(images)
    ap = evaluate_widerface(gt, final_boxes(detections))["ap"]
    got = (ap["easy"], ap["medium"], ap["hard"])
    assert got == pytest.approx(TARGETS[name], abs=0.002), got
