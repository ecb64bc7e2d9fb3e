"""Benchmark: paired bootstrap of AP differences, three real submissions on a val subset.

Usage: ``python bench/bootstrap.py [--images 200] [--n 1000] [--seed 0]``.

Takes the first ``--images`` ground-truth images (sorted ids) of WiderFace val and the
thflgg133, FadingLight9291117 and derronqi submissions under ../shared/widerface, matches
each once, then times :func:`pipeline.bootstrap.paired_bootstrap` over the three pairs for
every subset (easy, medium, hard, all), and, for comparison, the one-curve-per-resample
path (``widerface_curve``/``voc_curve`` with weights) on a few resamples, extrapolated.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.evaluate import read_archive  # noqa: E402
from pipeline.bootstrap import BOOTSTRAP_SUBSETS, paired_bootstrap, resample_weights  # noqa: E402
from pipeline.metrics import WiderFaceEval  # noqa: E402
from pipeline.widerface import parse_eval_mat  # noqa: E402

SHARED = ROOT.parent / "shared" / "widerface"
SUBMISSIONS = ("thflgg133", "FadingLight9291117", "derronqi")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-resamples", type=int, default=20)
    args = parser.parse_args()

    gt = parse_eval_mat(SHARED / "ground_truth").gt
    images = sorted(gt["image_id"].astype(str).unique())[: args.images]
    gt = gt[gt["image_id"].astype(str).isin(images)]
    evals = {}
    for name in SUBMISSIONS:
        dets, _ = read_archive(SHARED / "submissions" / f"{name}.tar.gz")
        evals[name] = WiderFaceEval(gt, dets[dets["image_id"].astype(str).isin(images)])
    n_boxes = sum(len(e.dets) for e in evals.values())
    t0 = time.perf_counter()
    for e in evals.values():
        e.evaluate()
    match = time.perf_counter() - t0
    print(f"{len(images)} images, {len(gt)} faces, {n_boxes} boxes over {len(evals)} methods; matching {match:.2f} s")
    pairs = [(a, b) for i, a in enumerate(SUBMISSIONS) for b in SUBMISSIONS[i + 1:]]
    total = 0.0
    for subset in BOOTSTRAP_SUBSETS:
        t0 = time.perf_counter()
        table = paired_bootstrap(evals, pairs, subset, n=args.n, seed=args.seed)
        took = time.perf_counter() - t0
        total += took
        print(f"\n{subset}: paired_bootstrap, {args.n} resamples x {len(evals)} methods: {took:.2f} s")
        print(table.drop(columns=["subset", "n", "seed"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nall four subsets: {total:.2f} s")

    e = next(iter(evals.values()))
    w = resample_weights(len(e.image_ids), args.baseline_resamples, args.seed)
    for subset in ("hard", "all"):
        keep = e.voc_keep_mask() if subset == "all" else e.keep_mask(subset)
        curve = e.voc_curve if subset == "all" else e.widerface_curve
        t0 = time.perf_counter()
        for row in w:
            curve(keep, weights=row)
        per = (time.perf_counter() - t0) / len(w)
        print(f"baseline {subset}: one weighted curve per resample {per * 1e3:.1f} ms -> "
              f"{per * args.n * len(evals):.1f} s for {args.n} resamples x {len(evals)} methods")


if __name__ == "__main__":
    main()
