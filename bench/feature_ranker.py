"""Feature ranker speed: per-box features ms/image, training boxes/s, re-scoring ms/image.

Synthetic images of ``--boxes`` boxes per detector (clustered around faces like real
detections), three detectors (one described, two as evidence), as at ``original`` scale on
the training pool (about 1,000 boxes per image and detector there).

- features: ms per image of :func:`pipeline.ranker.features.box_features` (numpy IoU),
  against the baseline of the same features with ``torchvision.ops.box_iou`` for the IoU
  matrices, measured in the same run;
- training: boxes/s of LightGBM at the ``cpu`` preset's settings on ``--images`` images;
- re-scoring: ms per image of the trained model's prediction (features excluded).

Run: ``.venv/bin/python bench/feature_ranker.py [--boxes 1000] [--images 200] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.iou import pairwise_iou  # noqa: E402
from pipeline.ranker import features as F  # noqa: E402
from pipeline.ranker.gbm import GbmConfig, predict_gbm, train_gbm  # noqa: E402
from pipeline.runtime import keep_freed_memory  # noqa: E402


def fake_image(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes, scores, oracle IoU) of one detector on a 1024x768 image with 20 faces."""
    faces = rng.uniform(0, 900, (20, 2))
    size = rng.uniform(8, 120, (20, 1))
    faces = np.c_[faces, faces + size].astype(np.float32)
    boxes = faces[rng.integers(0, 20, n)] + rng.normal(0, 4, (n, 4)).astype(np.float32)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 2)
    oracle = pairwise_iou(boxes, faces).max(axis=1)
    scores = np.clip(0.5 * oracle + rng.uniform(0, 0.5, n), 0.02, 1).astype(np.float32)
    return boxes, scores, oracle


def torch_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import torch
    from torchvision.ops import box_iou

    return box_iou(torch.from_numpy(np.ascontiguousarray(a, np.float32)),
                   torch.from_numpy(np.ascontiguousarray(b, np.float32))).numpy()


def features_ms(images, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for own, ev in images:
            F.box_features(own[0], own[1], 1024, 768, ev)
        best = min(best, (time.perf_counter() - t0) * 1000 / len(images))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    dets = [[fake_image(rng, args.boxes) for _ in range(3)] for _ in range(args.images)]
    sample = [((d[0][0], d[0][1]), [(d[1][0], d[1][1]), (d[2][0], d[2][1])]) for d in dets[:10]]
    fast = features_ms(sample, args.repeats)
    with mock.patch.object(F, "pairwise_iou", torch_iou):
        base = features_ms(sample, args.repeats)
    print(f"features: {fast:.1f} ms/image (numpy IoU) vs {base:.1f} ms/image (torchvision box_iou): {base / fast:.2f}x "
          f"[{args.boxes} boxes, 2 evidence detectors, {args.threads} torch threads]")
    x = np.concatenate([F.box_features(d[0][0], d[0][1], 1024, 768, [(d[1][0], d[1][1]), (d[2][0], d[2][1])])
                        for d in dets])
    oracle = np.concatenate([d[0][2] for d in dets])
    config = GbmConfig(trees=150, learning_rate=0.1)
    t0 = time.perf_counter()
    booster = train_gbm(x, oracle, config, threads=args.threads)
    seconds = time.perf_counter() - t0
    print(f"training: {len(x) / seconds:,.0f} boxes/s ({len(x):,} boxes, {config.trees} trees, {seconds:.1f} s)")
    per_image = x[: args.boxes]
    t0 = time.perf_counter()
    for _ in range(20):
        predict_gbm(booster, per_image, config)
    print(f"re-scoring: {(time.perf_counter() - t0) * 1000 / 20:.1f} ms/image ({args.boxes} boxes, features excluded)")


if __name__ == "__main__":
    main()
