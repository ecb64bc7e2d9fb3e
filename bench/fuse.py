"""Benchmark: Weighted Boxes Fusion of three detectors' real boxes, milliseconds per image.

Usage: ``python bench/fuse.py [--root ../shared/widerface416] [--images 8] [--repeats 3]``

Indexes the dataset folder, keeps its first ``--images`` images, runs the detectors at
``original`` on the CPU (``confrank index``, ``subset``, ``detect``) in a temporary data folder
(or ``--data-dir``, reused when its detections are there), then times on the same boxes, one
torch thread, median of ``--repeats``:

* baseline: NMS at IoU 0.4 per detector and image (``pipeline.boxes.nms``, what ``confrank nms
  --method single`` runs), all detectors;
* fuse: ``pipeline.fusion.weighted_boxes_fusion`` (that NMS, then ``ensemble_boxes`` per image),
  what ``confrank fuse --method wbf`` runs per shard;

and prints ms per image of each, their ratio, and the boxes per image that WBF receives.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.boxes import nms  # noqa: E402
from pipeline.fusion import weighted_boxes_fusion  # noqa: E402
from pipeline.tables import read_table, read_tables, shard_paths  # noqa: E402
from stages.cli import main as confrank  # noqa: E402
from stages.layout import Layout  # noqa: E402

SHARED = ROOT.parent / "shared"
DETECTORS = ("retinaface-mnet025", "slim", "rfb")


def run(args: list) -> None:
    try:
        confrank([str(a) for a in args])
    except SystemExit as exc:
        if exc.code:
            raise SystemExit(f"confrank {' '.join(map(str, args))} exited {exc.code}") from None


def prepare(layout: Layout, root: Path, images: int, detectors: list[str]) -> None:
    if not layout.images("bench").is_file():
        run(["index", "--name", "full", "--root", root, "--data-dir", layout.root])
        run(["subset", "--parent", "full", "--name", "bench", "--max-images", images, "--data-dir", layout.root])
    for det in detectors:
        if not shard_paths(layout.detections_dir("bench", det, "original")):
            run(["detect", "--dataset", "bench", "--detector", det, "--scales", "original", "--device", "cpu",
                 "--workers", 0, "--data-dir", layout.root])


def per_detector_nms(frames: list[pd.DataFrame]) -> int:
    kept = 0
    for dets in frames:
        codes, _ = pd.factorize(dets["image_id"].astype(str))
        boxes = torch.from_numpy(dets[["x1", "y1", "x2", "y2"]].to_numpy(np.float64, copy=True))
        scores = torch.from_numpy(dets["score"].to_numpy(np.float64))
        kept += len(nms(boxes, scores, torch.from_numpy(codes.astype(np.int64)), 0.4, max(len(dets), 1)))
    return kept


def timed(func, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = func()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=SHARED / "widerface416", help="WiderFace-layout dataset folder")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=None, help="keep (and reuse) the detections here")
    args = parser.parse_args()
    detectors = args.detectors.split(",")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(args.data_dir or Path(tmp) / "data")
        prepare(layout, args.root, args.images, detectors)
        table = read_table(layout.images("bench"), "images")
        sizes = {str(r.image_id): (int(r.width), int(r.height)) for r in table.itertuples(index=False)}
        frames = [read_tables(shard_paths(layout.detections_dir("bench", d, "original")), "detections") for d in detectors]
    n = len(sizes)
    weighted_boxes_fusion(frames, sizes)  # warm-up (imports)
    base_s, kept = timed(lambda: per_detector_nms(frames), args.repeats)
    fuse_s, fused = timed(lambda: weighted_boxes_fusion(frames, sizes), args.repeats)
    shape = sorted({f"{w}x{h}" for w, h in sizes.values()})
    print(f"{n} images of {args.root.name} ({', '.join(shape[:3])}{', ...' if len(shape) > 3 else ''}), "
          f"detectors {', '.join(detectors)} at original, 1 torch thread, median of {args.repeats}")
    print(f"boxes per image: {sum(map(len, frames)) / n:.0f} detected, {kept / n:.0f} after NMS per detector, "
          f"{len(fused) / n:.0f} fused")
    print(f"baseline  NMS per detector          {1000 * base_s / n:8.2f} ms/image")
    print(f"fuse      NMS + WBF (ensemble-boxes) {1000 * fuse_s / n:8.2f} ms/image   ({fuse_s / base_s:.1f}x the baseline)")


if __name__ == "__main__":
    main()
