"""Detector ports, prior boxes, decoding, resize, image decoding and the detection loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.detect import Decoded, DetectLoop, MemoryBudget, to_original
from pipeline.detectors import registry
from pipeline.detectors.base import RawDetections
from pipeline.detectors.onemb import ANCHORS as ANCHORS_1MB_FAMILY
from pipeline.detectors import priors as priors_module
from pipeline.detectors.priors import (PriorConfig, decode_boxes, decode_landmarks, prior_boxes, prior_boxes_loop,
                                      select_scores)
from pipeline.detectors.retinaface import ANCHORS_RETINAFACE, build_r50, resnet50_net
from pipeline.errors import ConfrankError, FormatError
from pipeline.imaging import decode_image, resize_cv2, to_chw_tensor
from pipeline.scales import SCALE_SETS, Scale, scale_set

WEIGHTED = ("retinaface-mnet025", "retinaface-mnet025-1mb", "slim", "rfb")
CONFIGS = (ANCHORS_RETINAFACE, ANCHORS_1MB_FAMILY)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(name, weights_dir, device="cpu"):
    info = registry.get_info(name)
    return registry.build(name, {w: weights_dir / f"{w}.pth" for w in info.weights}, torch.device(device))


def load(path) -> Decoded:
    return Decoded(f"{path.parent.name}/{path.stem}", to_chw_tensor(decode_image(path)))


@pytest.fixture(scope="module")
def two_images():
    from tests.support import need_shared

    root = need_shared("widerface416", "WIDER_val", "images")
    return [load(p) for p in sorted(root.glob("*/*.jpg"))[:2]]


# ----------------------------------------------------------------------------- priors


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from(CONFIGS))
def test_vectorised_priors_equal_reference_loop(height, width, config):
    fast = prior_boxes(height, width, config)
    assert torch.equal(fast, prior_boxes_loop(height, width, config))
    cells = sum(math.ceil(height / s) * math.ceil(width / s) * len(m) for s, m in zip(config.steps, config.min_sizes))
    assert fast.shape == (cells, 4)


def test_priors_are_cached_per_size():
    a = prior_boxes(64, 96, ANCHORS_RETINAFACE)
    assert prior_boxes(64, 96, ANCHORS_RETINAFACE) is a
    assert prior_boxes(64, 97, ANCHORS_RETINAFACE) is not a


def test_first_prior_of_each_level():
    config = PriorConfig(steps=(8, 16), min_sizes=((10, 20), (32,)))
    p = prior_boxes(32, 64, config)  # level 1: 4x8 cells x2 anchors, level 2: 2x4 cells
    assert p[0].tolist() == pytest.approx([4 / 64, 4 / 32, 10 / 64, 10 / 32])
    assert p[1].tolist() == pytest.approx([4 / 64, 4 / 32, 20 / 64, 20 / 32])
    assert p[2].tolist() == pytest.approx([12 / 64, 4 / 32, 10 / 64, 10 / 32])  # next column
    assert p[64].tolist() == pytest.approx([8 / 64, 8 / 32, 32 / 64, 32 / 32])


def test_decode_zero_regression_gives_prior_box():
    priors = torch.tensor([[0.5, 0.25, 0.2, 0.1]])
    boxes = decode_boxes(torch.zeros(1, 1, 4), priors, (0.1, 0.2))
    assert boxes[0, 0].tolist() == pytest.approx([0.4, 0.2, 0.6, 0.3])
    loc = torch.tensor([[[1.0, -1.0, math.log(2) / 0.2, 0.0]]])
    boxes = decode_boxes(loc, priors, (0.1, 0.2))  # centre moves by 0.1 * size, width doubles
    assert boxes[0, 0].tolist() == pytest.approx([0.52 - 0.2, 0.24 - 0.05, 0.52 + 0.2, 0.24 + 0.05])
    points = decode_landmarks(torch.ones(1, 1, 10), priors, (0.1, 0.2))
    assert points[0, 0, :2].tolist() == pytest.approx([0.52, 0.26])


def _decode_every_prior(detector, images):
    """The reference post-processing: softmax and decode every prior, then threshold and cut."""
    _, _, height, width = images.shape
    loc, logits, landmarks = detector.network(images)
    priors = prior_boxes(height, width, detector.config)
    scale = torch.tensor([width, height], dtype=torch.float32)
    boxes = decode_boxes(loc.float(), priors, detector.config.variances) * scale.repeat(2)
    points = decode_landmarks(landmarks.float(), priors, detector.config.variances) * scale.repeat(5)
    scores = torch.softmax(logits.float(), dim=-1)[..., 1]
    out = []
    for b in range(images.shape[0]):
        keep = torch.nonzero(scores[b] > detector.min_score).squeeze(1)
        keep = keep[torch.sort(scores[b, keep], descending=True, stable=True).indices[: detector.top_k]]
        out.append(RawDetections(boxes[b, keep], scores[b, keep], points[b, keep]))
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3000), st.floats(0.001, 0.5), st.integers(1, 500), st.integers(0, 2**31))
def test_select_scores_equals_softmax_of_every_prior(n, min_score, top_k, seed):
    gen = torch.Generator().manual_seed(seed)
    # log-odds spread around the threshold, with ties
    logits = torch.randn(n, 2, generator=gen) * 2
    logits[: n // 3, 1] = logits[: n // 3, 0] + math.log(min_score / (1 - min_score))
    logits[n // 2:, :] = logits[:1, :]
    scores = torch.softmax(logits, dim=-1)[:, 1]
    keep = torch.nonzero(scores > min_score).squeeze(1)
    keep = keep[torch.sort(scores[keep], descending=True, stable=True).indices[:top_k]]
    index, got = select_scores(logits, min_score, top_k)
    assert torch.equal(index, keep) and torch.equal(got, scores[keep])


@pytest.mark.parametrize("name", WEIGHTED)
def test_detect_decodes_only_the_kept_priors_with_identical_results(name, weights_dir, two_images, monkeypatch):
    detector = build(name, weights_dir)
    images = torch.stack([i.pixels for i in two_images]).float()
    expected = _decode_every_prior(detector, images)
    rows = []
    real = priors_module.decode_boxes
    monkeypatch.setattr(priors_module, "decode_boxes", lambda loc, *a: rows.append(loc.shape[:-1].numel()) or real(loc, *a))
    got = detector.detect(images)
    for a, b in zip(got, expected):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert rows == [len(r.scores) for r in expected]  # one call per image, kept priors only


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name,keys", [("retinaface-mnet025", "retinaface_mobilenet0.25.keys.txt"),
                                       ("slim", "slim_Final.keys.txt"), ("rfb", "RBF_Final.keys.txt")])
def test_networks_match_published_key_lists(name, keys, weights_dir):
    listed = {}
    for line in (weights_dir / keys).read_text().splitlines():
        key, shape, _ = line.split("\t")
        listed[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    net = build(name, weights_dir).net
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == listed


def test_r50_loads_a_prefixed_checkpoint_strictly(tmp_path):
    torch.manual_seed(0)
    source = resnet50_net()
    path = tmp_path / "Resnet50_Final.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    detector = build_r50({"Resnet50_Final": path}, torch.device("cpu"))
    for key, value in source.state_dict().items():
        assert torch.equal(detector.net.state_dict()[key], value), key
    loc, logits, points = detector.net(torch.zeros(1, 3, 64, 96))
    priors = prior_boxes(64, 96, ANCHORS_RETINAFACE)
    assert loc.shape == (1, len(priors), 4) and logits.shape == (1, len(priors), 2) and points.shape == (1, len(priors), 10)


def test_wrong_checkpoint_names_the_file(tmp_path, weights_dir):
    path = tmp_path / "Resnet50_Final.pth"
    path.write_bytes((weights_dir / "slim_Final.pth").read_bytes())
    with pytest.raises(FormatError, match="Resnet50_Final.pth"):
        build_r50({"Resnet50_Final": path}, torch.device("cpu"))


# ----------------------------------------------------------------------------- real detections


def check_detections(frame, image, scale_target, top_k=5000):
    assert len(frame) > 0
    for (_, scale, flip), rows in frame.groupby(["image_id", "scale", "flip"]):
        assert scale == scale_target and len(rows) <= top_k
        scores = rows["score"].to_numpy()
        assert np.all(np.diff(scores) <= 0) and scores.min() > 0.02 and scores.max() <= 1
    assert frame[["x1", "y1", "x2", "y2", "score"]].dtypes.eq(np.float32).all()
    assert (frame["x2"] > frame["x1"]).all() and (frame["y2"] > frame["y1"]).all()
    # decoded centres lie on the input (priors cover it), in original pixels
    cx, cy = (frame["x1"] + frame["x2"]) / 2, (frame["y1"] + frame["y2"]) / 2
    w, h = image.size
    assert cx.between(-0.1 * w, 1.1 * w).all() and cy.between(-0.1 * h, 1.1 * h).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", WEIGHTED)
def test_detector_on_real_images_original_and_8k(name, weights_dir, two_images):
    detector = build(name, weights_dir)
    det, lat = DetectLoop(detector, scale_set("original")).run(two_images)
    check_detections(det, two_images[0], 0)
    assert det["image_id"].nunique() == 2 and len(lat) == 2
    assert list(det.columns[-10:]) == [f"lm_{a}{i}" for i in range(5) for a in "xy"]
    # 8K on two real images; horizontal strips keep the 7680 px long edge affordable on a CPU
    strips = [Decoded(i.image_id, i.pixels[:, 200:232].clone()) for i in two_images]
    det8k, lat8k = DetectLoop(detector, scale_set("8k")).run(strips)
    check_detections(det8k, strips[0], 7680)
    assert lat8k[["input_width", "input_height"]].drop_duplicates().values.tolist() == [[7680, 591]]


@pytest.mark.slow
def test_8k_boxes_map_back_to_original_pixels(weights_dir, two_images):
    detector = build("retinaface-mnet025", weights_dir)
    strip = two_images[0].pixels[:, 200:232].clone()
    det, _ = DetectLoop(detector, scale_set("8k")).run([Decoded("a", strip)])
    # the reference way: cv2.resize with fx = fy = r, detect, divide by r; 32 * r = 590.77 is
    # not an integer, so the sampling step 1/r differs from 32/591
    r = 7680 / 416
    resized = resize_cv2(strip.permute(1, 2, 0).numpy(), r)
    assert resized.shape == (591, 7680, 3)
    raw = detector.detect(torch.from_numpy(resized).permute(2, 0, 1)[None])[0]
    expected = (raw.boxes / r)[:50].numpy()
    got = det[["x1", "y1", "x2", "y2"]].to_numpy()[:50]
    assert len(det) == len(raw.scores)
    assert np.abs(got - expected).max() < 1e-3  # sampling with 32/591 instead: 22 px (boxes swap places)
    assert np.abs(det["score"].to_numpy()[:50] - raw.scores[:50].numpy()).max() < 1e-4


def test_flip_round_trip_on_a_real_detector(weights_dir, two_images):
    detector = build("retinaface-mnet025", weights_dir)
    image = two_images[1]
    mirrored = Decoded(image.image_id, image.pixels.flip(-1).contiguous())
    flipped, _ = DetectLoop(detector, [Scale(0, flip=True)]).run([image])
    plain, _ = DetectLoop(detector, [Scale(0)]).run([mirrored])
    assert flipped["flip"].all() and not plain["flip"].any()
    w = image.size[0]
    a = flipped[["x1", "y1", "x2", "y2", "score"]].to_numpy()
    b = plain[["x1", "y1", "x2", "y2", "score"]].to_numpy()
    b = np.c_[w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3], b[:, 4]]
    np.testing.assert_allclose(a, b, atol=1e-3)
    # left eye of the subject stays the left eye: x0 (left eye) < x1 (right eye) for frontal faces
    top = flipped.iloc[0]
    assert top["lm_x0"] < top["lm_x1"] and top["lm_x3"] < top["lm_x4"]


@settings(max_examples=50, deadline=None)
@given(st.integers(8, 2000), st.integers(8, 2000), st.integers(1, 8000), st.booleans(),
       st.lists(st.floats(0, 1), min_size=14, max_size=14))
def test_to_original_round_trip(width, height, target, flip, values):
    scale = Scale(target)
    size, r = scale.input_size(width, height), scale.factor(width, height)
    box = torch.tensor([sorted(values[0:2]) + sorted(values[2:4])])[:, [0, 2, 1, 3]] * torch.tensor(
        [size[0], size[1]] * 2)
    points = torch.tensor([values[4:14]]) * torch.tensor([size[0], size[1]] * 5)
    raw = RawDetections(box, torch.ones(1), points)
    once = to_original(raw, size, r, flip)
    assert (once.boxes[:, 2] >= once.boxes[:, 0]).all()
    # mapping back to input pixels and flipping again gives the input
    back = RawDetections(once.boxes * r, raw.scores, once.landmarks * r)
    again = to_original(back, size, 1.0, flip)
    torch.testing.assert_close(again.boxes, box, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(again.landmarks, points, atol=1e-3, rtol=1e-5)


def test_flip_swaps_landmark_sides():
    points = torch.tensor([[10.0, 1, 30, 2, 20, 3, 12, 4, 28, 5]])  # left eye at x=10, right eye at 30
    raw = RawDetections(torch.tensor([[5.0, 0, 35, 10]]), torch.ones(1), points)
    out = to_original(raw, (100, 50), 1.0, flipped=True)
    assert out.boxes.tolist() == [[65.0, 0, 95, 10]]
    assert out.landmarks.tolist() == [[70.0, 2, 90, 1, 80, 3, 72, 5, 88, 4]]


# ----------------------------------------------------------------------------- scales


def test_scale_sets():
    assert scale_set("original").views == (Scale(0),) and scale_set("original").name == "original"
    assert [(s.name, s.multi, s.long_edge) for s in SCALE_SETS.values()] == [
        ("original", False, None), ("8k", False, 7680), ("wider-multi", True, None), ("8k-multi", True, 7680)]
    assert [(s.target, s.edge, s.flip) for s in scale_set("8k-multi")] == [
        (7680, "long", False), (7680, "long", True), (5760, "long", False), (5760, "long", True),
        (4096, "long", False), (4096, "long", True)]
    assert [s.target for s in scale_set("wider-multi")][::2] == [500, 800, 1100, 1400, 1700]
    assert Scale(7680).input_size(1024, 683) == (7680, 5122)  # 5122.5, half to even
    assert Scale(7680).factor(1600, 898) == 4.8 and Scale(7680).input_size(1600, 898) == (7680, 4310)
    assert Scale(0).factor(1600, 898) == 1.0
    assert Scale(500, "short").input_size(1024, 683) == (750, 500)
    with pytest.raises(ConfrankError, match="known: original"):
        scale_set("4k")


# ----------------------------------------------------------------------------- resize and decode


def test_decode_grey_cmyk_and_png_named_jpg(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.jpg", quality=100)
    out = decode_image(tmp_path / "grey.jpg")
    assert out.shape == (20, 30, 3) and np.array_equal(out[..., 0], out[..., 2])
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "png.jpg", format="PNG")
    assert np.array_equal(decode_image(tmp_path / "png.jpg"), rgb[..., ::-1])
    Image.fromarray(np.full((20, 30, 3), (200, 30, 10), np.uint8)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    cmyk = decode_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (20, 30, 3) and np.abs(cmyk[10, 10].astype(int) - (10, 30, 200)).max() < 12


def test_bad_images_fail_naming_the_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(FormatError, match=r"empty\.jpg.*0-byte"):
        decode_image(tmp_path / "empty.jpg")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"cut\.jpg.*truncated"):
        decode_image(tmp_path / "cut.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(FormatError, match=r"text\.jpg"):
        decode_image(tmp_path / "text.jpg")


# ----------------------------------------------------------------------------- out of memory


class _Recorder:
    """A fake detector: one box per image; raises CUDA OOM for batches above ``max_batch``."""

    batched = True
    min_score, top_k = 0.02, 5000

    def __init__(self, name, max_batch):
        self.name, self.max_batch, self.device, self.calls = name, max_batch, torch.device("cpu"), []

    def detect(self, images):
        self.calls.append(images.shape[0])
        if images.shape[0] > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        h, w = images.shape[-2:]
        return [RawDetections(torch.tensor([[0.0, 0, w / 2, h / 2]]), torch.tensor([0.9]), None) for _ in images]


def _tiny(n):
    return [Decoded(f"img{i}", torch.zeros(3, 10, 20, dtype=torch.uint8)) for i in range(n)]


def test_memory_budget_sizes_the_batches(caplog):
    detector = _Recorder("fake", max_batch=99)
    budget = MemoryBudget(available=50_000, per_pixel=100.0)  # 10x20 inputs: 20 kB each, 2 fit
    assert budget.images_per_call((20, 10), cap=4) == 2 and budget.images_per_call((20, 10), cap=1) == 1
    det, _ = DetectLoop(detector, [Scale(0)], batch_size=4, memory=budget).run(_tiny(5))
    assert detector.calls == [2, 2, 1] and len(det) == 5  # chunks of 4 (the cap) split in 2 + 2, then 1
    detector.calls.clear()
    too_small = MemoryBudget(available=10_000, per_pixel=100.0)  # not even one image fits: one at a time
    DetectLoop(detector, [Scale(0), Scale(40)], batch_size=4, memory=too_small).run(_tiny(6))
    # two input sizes too large, one warning for the run
    assert detector.calls == [1] * 12 and caplog.text.count("needs about") == 1


def test_freed_memory_goes_back_only_above_the_limit(monkeypatch):
    import pipeline.detect as detect_module

    released = []
    monkeypatch.setattr(detect_module, "release_freed_memory", lambda: released.append(1) or True)
    monkeypatch.setattr(detect_module, "resident_bytes", lambda: 5_000)
    detector = _Recorder("fake", max_batch=99)
    budget = MemoryBudget(available=10**9, per_pixel=1.0)  # 20x10 inputs: 200 bytes each
    DetectLoop(detector, [Scale(0)], batch_size=2, memory=budget, release_above=5_399).run(_tiny(3))
    # 5000 held + 400 for a call of two images passes the bound; 5000 + 200 for one does not
    assert detector.calls == [2, 1] and len(released) == 1
    released.clear()
    DetectLoop(detector, [Scale(0)], batch_size=2, memory=budget, release_above=5_400).run(_tiny(3))
    DetectLoop(detector, [Scale(0)], batch_size=2).run(_tiny(3))
    assert released == []  # within the bound, or without one: the heap keeps its freed memory


def test_oom_retries_one_image_at_a_time(caplog):
    detector = _Recorder("fake", max_batch=1)
    det, lat = DetectLoop(detector, [Scale(0)], batch_size=3).run(_tiny(3))
    assert detector.calls == [3, 1, 1, 1]
    assert det["x2"].tolist() == [10.0] * 3 and len(lat) == 3
    assert "retrying one image at a time" in caplog.text


def test_oom_on_one_image_falls_back_to_cpu(caplog):
    gpu, cpu = _Recorder("fake", max_batch=0), _Recorder("fake", max_batch=8)
    loop = DetectLoop(gpu, [Scale(0), Scale(40)], batch_size=2, cpu_fallback=lambda: cpu)
    det, _ = loop.run(_tiny(2))
    assert gpu.calls == [2, 1, 1, 2, 1, 1] and cpu.calls == [1, 1, 1, 1]
    assert sorted(loop.fallbacks) == ["img0@0", "img0@40", "img1@0", "img1@40"]
    assert len(det) == 4 and "running it on the CPU" in caplog.text
    with pytest.raises(ConfrankError, match="img0@0: out of GPU memory"):
        DetectLoop(_Recorder("fake", max_batch=0), [Scale(0)]).run(_tiny(1))
