"""Benchmark: WiderFace evaluation of a full val submission, vectorised vs per threshold.

Usage: ``python bench/evaluate.py [--archive PATH] [--gt DIR]`` (defaults: the
thflgg133 submission and the official ground truth under ../shared/widerface).

Both implementations get the same parsed boxes and ground truth. The baseline is the
straightforward per-image, per-threshold evaluation of the common Python port
(``tests/widerface_reference.py``; its Cython IoU replaced by the same arithmetic in numpy,
which only makes the baseline faster). Prints seconds per subset, the ratio, and checks
that the APs agree to 1e-12.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.metrics import SUBSETS, WiderFaceEval  # noqa: E402
from pipeline.submission import parse_submission, submission_frame  # noqa: E402
from pipeline.widerface import parse_eval_mat  # noqa: E402
from pipeline.runtime import keep_freed_memory  # noqa: E402
from tests.widerface_reference import bbox_overlaps_numpy, evaluation, gt_from_table  # noqa: E402

SHARED = ROOT.parent / "shared" / "widerface"


def read_archive(path: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    frames, raw = [], {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".txt"):
                parts = Path(member.name).with_suffix("").parts
                image_id = f"{parts[-2]}/{parts[-1]}"
                _, boxes = parse_submission(tar.extractfile(member).read().decode(), member.name, parts[-1])
                frames.append(submission_frame(image_id, boxes))
                raw[image_id] = boxes
    return pd.concat(frames, ignore_index=True), raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=SHARED / "submissions" / "thflgg133.tar.gz")
    parser.add_argument("--gt", type=Path, default=SHARED / "ground_truth")
    args = parser.parse_args()
    keep_freed_memory()  # as the confrank command does
    gt = parse_eval_mat(args.gt).gt
    dets, raw = read_archive(args.archive)
    print(f"{args.archive.name}: {len(dets)} boxes, {dets.image_id.nunique()} images, {len(gt)} faces")

    start = time.perf_counter()
    e = WiderFaceEval(gt, dets).evaluate()
    t_match = time.perf_counter() - start
    fast, t_fast = {}, {}
    for s in SUBSETS:
        t0 = time.perf_counter()
        fast[s] = e.widerface_curve(e.keep_mask(s)).ap
        t_fast[s] = time.perf_counter() - t0
    fast_total = t_match + sum(t_fast.values())

    reference_gt = gt_from_table(gt)
    slow, t_slow = {}, {}
    for s in SUBSETS:
        preds = {k: v.copy() for k, v in raw.items()}
        t0 = time.perf_counter()
        slow[s] = evaluation(preds, reference_gt, 0.5, settings=(s,), overlaps_fn=bbox_overlaps_numpy)[s]
        t_slow[s] = time.perf_counter() - t0
    slow_total = sum(t_slow.values())

    print(f"vectorised: matching {t_match:.3f} s (shared by all subsets and IoUs), then per subset "
          + ", ".join(f"{s} {t_fast[s]:.3f} s" for s in SUBSETS) + f"; total {fast_total:.3f} s")
    print("reference : " + ", ".join(f"{s} {t_slow[s]:.2f} s" for s in SUBSETS) + f"; total {slow_total:.2f} s")
    print(f"speed-up  : {slow_total / fast_total:.0f}x for the three subsets")
    for s in SUBSETS:
        agree = abs(fast[s] - slow[s]) <= 1e-12
        print(f"AP {s:6s} vectorised {fast[s]:.16f} reference {slow[s]:.16f} {'equal' if agree else 'DIFFERENT'}")
        if not agree:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
