"""MTCNN: architecture vs the facenet-pytorch state dicts, geometry, and real detections.

The weights come from the facenet-pytorch 2.6.0 wheel via ``fetch`` into the user cache
(``~/.cache/confrank/weights``), so the download happens once per machine. Without PyPI the
tests skip, except under CONFRANK_REQUIRE_SHARED=1 (CI), where they fail.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torchvision.ops import box_iou, nms

from pipeline.detectors import mtcnn as M
from pipeline.detectors import weights as W
from pipeline.detectors.registry import build
from pipeline.errors import ConfrankError
from pipeline.widerface import parse_split_txt

NAMES = ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet")
pytestmark = [pytest.mark.xdist_group("mtcnn"), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def mtcnn_weights():
    try:
        return W.fetch_many(NAMES, W.user_cache_dir())
    except ConfrankError as exc:
        if os.environ.get("CONFRANK_REQUIRE_SHARED") == "1":
            pytest.fail(f"MTCNN weights could not be fetched (CONFRANK_REQUIRE_SHARED=1): {exc}")
        pytest.skip(f"MTCNN weights could not be fetched (is PyPI reachable?): {exc}")


@pytest.fixture(scope="module")
def detector(mtcnn_weights):
    return build("mtcnn", mtcnn_weights, torch.device("cpu"))


def _tensor(bgr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bgr).permute(2, 0, 1).float()


def test_state_dicts_match_architecture(mtcnn_weights):
    for net, name, n_keys in ((M.PNet(), "mtcnn_pnet", 13), (M.RNet(), "mtcnn_rnet", 16), (M.ONet(), "mtcnn_onet", 21)):
        state = torch.load(mtcnn_weights[name], map_location="cpu", weights_only=True)
        assert len(state) == n_keys == len(net.state_dict())
        net.load_state_dict(state, strict=True)


def test_pyramid_scales():
    scales = M.pyramid_scales(100, 300)  # min side 100: 12/20 = 0.6 times 0.709^k while side*scale >= 12
    assert scales == pytest.approx([0.6 * 0.709 ** k for k in range(len(scales))])
    assert 100 * scales[-1] >= 12 > 100 * scales[-1] * 0.709
    assert M.pyramid_scales(11, 500, min_face=12) == []


boxes_st = st.tuples(
    st.floats(-100, 1000), st.floats(-100, 1000), st.floats(0.5, 500), st.floats(0.5, 500),
).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])


@given(st.lists(boxes_st, min_size=1, max_size=20))
def test_square_keeps_centre_and_contains_box(rows):
    boxes = torch.tensor(rows, dtype=torch.float64)
    sq = M.square(boxes)
    side = sq[:, 2:] - sq[:, :2]
    torch.testing.assert_close(side[:, 0], side[:, 1])
    torch.testing.assert_close(side[:, 0], (boxes[:, 2:] - boxes[:, :2]).amax(1))
    torch.testing.assert_close((sq[:, :2] + sq[:, 2:]) / 2, (boxes[:, :2] + boxes[:, 2:]) / 2)
    assert (sq[:, :2] <= boxes[:, :2] + 1e-9).all() and (sq[:, 2:] >= boxes[:, 2:] - 1e-9).all()


@given(st.lists(boxes_st, min_size=1, max_size=20), st.floats(-0.5, 0.5))
def test_regress_moves_corners_by_fraction_of_size(rows, d):
    boxes = torch.tensor(rows, dtype=torch.float64)
    out = M.regress(boxes, torch.full_like(boxes, d))
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    torch.testing.assert_close(out, boxes + d * wh)
    torch.testing.assert_close(M.regress(boxes, torch.zeros_like(boxes)), boxes)


def test_crowd_photo(detector, shared):
    bgr = cv2.imread(str(shared("photos", "crowd_1024.jpg")))
    (r,) = detector.detect(_tensor(bgr)[None])
    h, w = bgr.shape[:2]
    assert r.boxes.dtype == r.scores.dtype == r.landmarks.dtype == torch.float32
    assert r.landmarks.shape == (len(r.boxes), 10)
    assert torch.equal(r.scores, r.scores.sort(descending=True).values)
    assert float(r.scores.min()) > M.THRESHOLDS[2] and float(r.scores.max()) <= 1
    # distinct confident faces: 19 measured; facenet-pytorch's own pipeline finds 20 above 0.9
    strong = r.scores > 0.9
    faces = nms(r.boxes[strong], r.scores[strong], 0.4)
    assert len(faces) >= 17
    # confident landmarks lie in their (regressed) box, left eye left of the right eye (image x)
    lm = r.landmarks[strong].view(-1, 5, 2)
    b = r.boxes[strong]
    pad = 0.1 * (b[:, 2:] - b[:, :2])[:, None]
    assert ((lm >= b[:, None, :2] - pad) & (lm <= b[:, None, 2:] + pad)).all()
    assert (lm[:, 0, 0] < lm[:, 1, 0]).all()
    assert (r.boxes[strong][:, :2] > -5).all() and (r.boxes[strong][:, 2] < w + 5).all() and (r.boxes[strong][:, 3] < h + 5).all()


def test_bgr_input_is_converted(detector, shared):
    """Feeding RGB (the wrong order) must change the result: the detector flips channels."""
    bgr = cv2.imread(str(shared("photos", "crowd_1024.jpg")))[:300, :600]
    (a,) = detector.detect(_tensor(bgr)[None])
    (b,) = detector.detect(_tensor(np.ascontiguousarray(bgr[:, :, ::-1]))[None])
    assert not (len(a.scores) == len(b.scores) and torch.allclose(a.scores, b.scores))


def test_batch_equals_single_images(detector, shared):
    folder = shared("widerface416", "WIDER_val", "images")
    files = sorted(folder.rglob("*.jpg"))[:2]
    images = [_tensor(cv2.imread(str(f))) for f in files]
    batch = detector.detect(torch.stack(images))
    for img, got in zip(images, batch):
        (want,) = detector.detect(img[None])
        assert len(got.scores) == len(want.scores)
        torch.testing.assert_close(got.boxes, want.boxes, atol=1e-2, rtol=0)
        torch.testing.assert_close(got.scores, want.scores, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_widerface416_recall(detector, shared):
    """Recall at IoU 0.5 of valid faces >= 30 px tall, on every third image (31 images).

    Measured 79/95 = 0.83 here (0.79 on all 93 images). MTCNN's smallest window is 20 px and
    these images are squeezed to 416x416, so smaller faces are out of its reach; 0.75 leaves
    room for platform-level float differences and still fails on real regressions (feeding the
    nets BGR instead of RGB gives 55/95).
    """
    root = shared("widerface416")
    ann = parse_split_txt(root / "wider_face_split" / "wider_face_val_bbx_gt.txt")
    images = ann.images.sort_values("image_id").iloc[::3]
    gt = ann.gt[ann.gt["invalid"] == 0]
    found = total = 0
    for image_id, file in zip(images["image_id"], images["file"]):
        (r,) = detector.detect(_tensor(cv2.imread(str(root / "WIDER_val" / "images" / file)))[None])
        g = gt[gt["image_id"] == image_id]
        boxes = torch.tensor(g[["x1", "y1", "x2", "y2"]].to_numpy(), dtype=torch.float32)
        tall = (boxes[:, 3] - boxes[:, 1]) >= 30
        if len(r.boxes) and tall.any():
            found += int((box_iou(boxes[tall], r.boxes).amax(1) >= 0.5).sum())
        total += int(tall.sum())
    assert total == 95
    assert found / total >= 0.75, f"recall {found}/{total}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(mtcnn_weights, detector, shared):
    bgr = cv2.imread(str(shared("photos", "crowd_1024.jpg")))
    (cpu,) = detector.detect(_tensor(bgr)[None])
    gpu_det = build("mtcnn", mtcnn_weights, torch.device("cuda"))
    (gpu,) = gpu_det.detect(_tensor(bgr)[None].cuda())
    assert gpu.boxes.device.type == "cuda"
    strong = cpu.scores > 0.9
    iou = box_iou(cpu.boxes[strong], gpu.boxes.cpu())
    assert (iou.amax(1) > 0.95).float().mean() >= 0.95
