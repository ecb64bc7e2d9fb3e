"""Benchmark: box voting / NMS of a multi-scale run, streamed shard by shard.

Usage: ``python bench/nms.py [--images 64] [--scales 6] [--boxes 2000] [--shards 4]``

Builds synthetic detection shards like an 8K multi-scale run (per image and scale: jittered
boxes around 40 faces plus clutter, up to ``--boxes`` per scale; flips are folded into the
scale count), writes them as Parquet in a temporary folder, then runs the nms stage's
per-shard function (read shard -> vote -> keep 750) one shard at a time and reports the
time per image, the peak RSS, and the ratio against the RetinaFace reference ``bbox_vote``
loop (numpy, one cluster per Python iteration) measured on the first images in the same run.
The full val set (3226 images x 6 views x 5000 boxes) is extrapolated linearly in the
number of images and quadratically in boxes per image (an upper bound: voting compares
each seed only with the boxes near it; ``--boxes 5000`` measures the full size directly).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.tables import read_table, shard_members, write_table  # noqa: E402
from pipeline.runtime import keep_freed_memory  # noqa: E402
from stages.nms import _fuse_shard  # noqa: E402
from tests.widerface_reference import bbox_vote  # noqa: E402


def synthetic_image(rng: np.random.Generator, image_id: str, n_scales: int, n_boxes: int) -> pd.DataFrame:
    faces_xy = rng.uniform(0, 7000, (40, 2))
    faces_wh = rng.uniform(16, 400, (40, 1)) * [1, 1.2]
    frames = []
    for scale in range(n_scales):
        n_face = n_boxes // 10
        idx = rng.integers(0, 40, n_face)
        xy = faces_xy[idx] + rng.normal(0, 0.08, (n_face, 2)) * faces_wh[idx]
        wh = faces_wh[idx] * rng.normal(1, 0.08, (n_face, 1))
        clutter_xy = rng.uniform(0, 7600, (n_boxes - n_face, 2))
        clutter_wh = rng.uniform(8, 300, (n_boxes - n_face, 1)) * [1, 1.2]
        xy, wh = np.r_[xy, clutter_xy], np.r_[wh, clutter_wh]
        score = np.r_[rng.uniform(0.3, 1, n_face), rng.uniform(0.02, 0.5, n_boxes - n_face)]
        frames.append(pd.DataFrame({"image_id": image_id, "detector": "synthetic", "scale": 1000 + scale, "flip": False,
                                    "x1": xy[:, 0], "y1": xy[:, 1], "x2": xy[:, 0] + wh[:, 0], "y2": xy[:, 1] + wh[:, 1],
                                    "score": score}))
    return pd.concat(frames, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--scales", type=int, default=6)
    parser.add_argument("--boxes", type=int, default=2000, help="boxes per image and scale")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--reference-images", type=int, default=2)
    args = parser.parse_args()
    keep_freed_memory()  # as the confrank command does
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    ids = [f"e/{i:05d}" for i in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k in range(args.shards):
            members = shard_members(ids, args.shards, k)
            frame = pd.concat([synthetic_image(rng, i, args.scales, args.boxes) for i in members], ignore_index=True)
            path = Path(tmp) / f"part-{k}.parquet"
            write_table(frame, path, "detections", sort_by=[("image_id", "ascending"), ("score", "descending")])
            paths.append(path)
        del frame
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        n_out = 0
        for path in paths:
            final, _ = _fuse_shard((path, "multi", 0.4, 750, False))
            n_out += len(final)
        elapsed = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        first = read_table(paths[0], "detections")

    per_image = elapsed / args.images
    ref_times = []
    for image_id in ids[: args.reference_images]:
        det = first[first.image_id.astype(str) == image_id]
        det = det.sort_values("score", ascending=False, kind="stable")[["x1", "y1", "x2", "y2", "score"]].to_numpy(np.float64)
        t0 = time.perf_counter()
        bbox_vote(det)
        ref_times.append(time.perf_counter() - t0)
    ref_per_image = float(np.mean(ref_times))
    n = args.scales * args.boxes
    full = per_image * 3226 * (6 * 5000 / n) ** 2
    print(f"{args.images} images x {args.scales} views x {args.boxes} boxes ({n} per image) in {args.shards} shards")
    print(f"voting, streamed shard by shard: {elapsed:.2f} s ({per_image * 1000:.0f} ms/image), {n_out} boxes out")
    print(f"reference bbox_vote loop: {ref_per_image * 1000:.0f} ms/image -> speed-up {ref_per_image / per_image:.1f}x")
    print(f"peak RSS {peak:.0f} MiB (before voting {rss_before:.0f} MiB; one shard at a time)")
    print(f"extrapolated to 3226 images x 6 views x 5000 boxes: ~{full / 60:.0f} min on this machine (1 thread)")


if __name__ == "__main__":
    main()
