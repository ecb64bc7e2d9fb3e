"""Image evidence cost: ms per image of the image-features stage's work, at ``original`` and 8K.

Per image, what ``confrank image-features`` does: decode the file
(:func:`pipeline.imaging.decode_image`), resize to at most 1024 px (:func:`prepare`), run
RetinaFace MobileNet-0.25 once (:meth:`ImageEvidence.maps`) and read ``--boxes`` boxes
(:meth:`ImageEvidence.box_evidence`; synthetic boxes, 5000 = the detectors' ``top_k``, the
worst case). Two inputs:

- ``original``: the first ``--images`` widerface416 images (416 x 416, not resized);
- ``8k``: the first widerface-val34 image upscaled to a 7680 px long edge (bilinear, as the
  ``8k`` scale set does) and stored as a JPEG (quality 95), so its decode is counted; the
  network still sees 1024 px.

Baseline, measured in the same run and interleaved with each case (so both see the same load):
the retinaface-mnet025 detector itself (``Detector.detect``: network and box decoding) on the
same image at its original size (416 px, and the 1024 px val34 original for ``8k``). The ratio
is evidence / baseline. Each image runs ``--repeats`` times and its fastest run counts (on a
shared machine the slowest runs measure the other processes), then the mean over images.

With ``--rnet-top-k K`` the optional R-Net crop scores of the K first boxes are timed too, apart.

Run: ``.venv/bin/python bench/image_features.py [--images 10] [--boxes 5000] [--threads 1]
[--rnet-top-k 1000]`` (weights from ``$CONFRANK_WEIGHTS``, else ``../shared/weights``; R-Net's
from there or the user cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.detectors import registry, weights as W  # noqa: E402
from pipeline.detectors.mtcnn import RNet  # noqa: E402
from pipeline.detectors.priors import load_state_dict  # noqa: E402
from pipeline.errors import ConfrankError  # noqa: E402
from pipeline.imaging import decode_image  # noqa: E402
from pipeline.ranker.image_evidence import CropEvidence, ImageEvidence, prepare  # noqa: E402
from pipeline.runtime import keep_freed_memory  # noqa: E402

SHARED = Path(os.environ.get("CONFRANK_SHARED", ROOT.parent / "shared"))


def synthetic_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """``n`` boxes of 2..40% of the short side, anywhere in a ``width`` x ``height`` image."""
    side = np.exp(rng.uniform(np.log(0.02), np.log(0.4), n)) * min(width, height)
    x1 = rng.uniform(0, width - side)
    y1 = rng.uniform(0, height - side)
    return np.stack([x1, y1, x1 + side, y1 + side * rng.uniform(1.0, 1.4, n)], axis=1).astype(np.float32)


def evidence_ms(model: ImageEvidence, path: Path, boxes: np.ndarray, crops: CropEvidence | None) -> dict[str, float]:
    """ms of each step for one image: decode, resize, network, boxes, total (and R-Net, apart)."""
    t0 = time.perf_counter()
    image = decode_image(path)
    t1 = time.perf_counter()
    ready = prepare(image, model.max_side)
    t2 = time.perf_counter()
    maps = model.maps(ready)
    t3 = time.perf_counter()
    model.box_evidence(maps, boxes)
    t4 = time.perf_counter()
    steps = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)
    out = {k: 1000 * v for k, v in zip(("decode", "resize", "network", "boxes", "total"), steps)}
    if crops is not None:
        t5 = time.perf_counter()
        crops.crop_evidence(ready, boxes)
        out["rnet"] = 1000 * (time.perf_counter() - t5)
    return out


def detector_ms(detector, image_bgr: np.ndarray) -> float:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(image_bgr)).permute(2, 0, 1)[None].float()
    t0 = time.perf_counter()
    detector.detect(x)
    return 1000 * (time.perf_counter() - t0)


def run_case(name: str, model, detector, cases: list[tuple[Path, np.ndarray, np.ndarray]], repeats: int,
             crops: CropEvidence | None) -> None:
    """``cases``: (file the stage decodes, the detector's original-size image, boxes). Each
    image runs ``repeats`` times, baseline and evidence interleaved; per image and step the
    fastest run counts (the least disturbed by other processes), then the mean over images."""
    best: dict[str, float] = {}
    base = 0.0
    for path, original, boxes in cases:
        mine: dict[str, float] = {}
        theirs = float("inf")
        for _ in range(repeats):
            theirs = min(theirs, detector_ms(detector, original))
            for k, v in evidence_ms(model, path, boxes, crops).items():
                mine[k] = min(mine.get(k, float("inf")), v)
        base += theirs / len(cases)
        for k, v in mine.items():
            best[k] = best.get(k, 0.0) + v / len(cases)
    steps = ", ".join(f"{k} {best[k]:.0f}" for k in ("decode", "resize", "network", "boxes"))
    print(f"{name:9s} evidence {best['total']:6.0f} ms/image ({steps}) | baseline retinaface-mnet025 detect "
          f"at original size {base:5.0f} ms/image | ratio {best['total'] / base:5.2f}")
    if crops is not None:
        print(f"{'':9s} + R-Net on the top {crops.top_k} boxes (--rnet-top-k): {best['rnet']:.0f} ms/image more, "
              f"ratio {(best['total'] + best['rnet']) / base:5.2f} with it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10, help="widerface416 images for the original case")
    parser.add_argument("--boxes", type=int, default=5000, help="boxes per image")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the stage's default: 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rnet-top-k", type=int, default=0,
                        help="also time R-Net on this many boxes per image (weights mtcnn_rnet in the cache)")
    args = parser.parse_args()
    keep_freed_memory()
    import torch

    torch.set_num_threads(args.threads)
    weights_dir = Path(os.environ.get(W.CACHE_ENV, SHARED / "weights"))
    files = W.resolve(registry.get_info("retinaface-mnet025").weights, weights_dir)
    detector = registry.build("retinaface-mnet025", files, torch.device("cpu"))
    model = ImageEvidence.from_detector(detector)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; {args.boxes} boxes per image; fastest of {args.repeats} runs per image")

    small = sorted((SHARED / "widerface416" / "WIDER_val" / "images").glob("*/*.jpg"))[: args.images]
    cases = []
    for path in small:
        image = decode_image(path)
        cases.append((path, image, synthetic_boxes(rng, args.boxes, image.shape[1], image.shape[0])))
    crops = None
    if args.rnet_top_k:
        try:
            rnet_file = W.resolve(["mtcnn_rnet"], weights_dir)["mtcnn_rnet"]
        except ConfrankError:
            rnet_file = W.resolve(["mtcnn_rnet"], W.user_cache_dir())["mtcnn_rnet"]
        rnet = RNet()
        load_state_dict(rnet_file, rnet)
        crops = CropEvidence(rnet, "cpu", args.rnet_top_k)
    run_case("original", model, detector, cases, args.repeats, crops)

    source = sorted((SHARED / "widerface-val34" / "WIDER_val" / "images").glob("*/*.jpg"))[0]
    original = decode_image(source)
    factor = 7680 / max(original.shape[:2])
    big = cv2.resize(original, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    with tempfile.TemporaryDirectory(prefix="bench-image-features-") as tmp:
        path = Path(tmp) / "8k.jpg"
        cv2.imwrite(str(path), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
        del big
        height, width = decode_image(path).shape[:2]
        boxes = synthetic_boxes(rng, args.boxes, width, height)
        print(f"8k input: {width} x {height} from {source.name} ({original.shape[1]} x {original.shape[0]}), "
              f"{path.stat().st_size / 1e6:.1f} MB JPEG")
        run_case("8k", model, detector, [(path, original, boxes)], args.repeats, crops)


if __name__ == "__main__":
    main()
