"""Ways of scoring the learned fusion's clusters, against Weighted Boxes Fusion, in the pool's folds.

For each of the 5 folds of the training pool (the folds of ``confrank cv``), the learned fusion
(``--preset fuse``) is trained on the other folds; on the held-out images the clusters it builds
are scored four ways and compared with ``ensemble-boxes``' WBF of the same boxes (the baseline,
measured in the same run):

- ``fusion``: the cluster model (what ``confrank fuse --method rank-R`` writes);
- ``wbf-rule-probs``: WBF's rule (members' mean confidence x share of detectors present) on the
  per-box model's probabilities, no cluster model;
- ``wbf-rule``: WBF's rule on the detector scores, over our clusters (how close our clustering is
  to the package's).

Prints AP (%) per method and subset (mean over folds) and Δ against ``wbf`` (mean, sd, min).
Needs a data folder where the pool was indexed, detected and annotated at ``original`` for
retinaface-mnet025, slim and rfb (``snakemake --configfile config/cv.yaml``):

    python bench/fusion_variants.py --data-dir DATA
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.fusion import weighted_boxes_fusion  # noqa: E402
from pipeline.ranker import fusion as F  # noqa: E402
from pipeline.ranker.folds import assign_folds, score_finals  # noqa: E402
from pipeline.ranker.registry import FitRun, settings_of  # noqa: E402
from stages.common import read_gt  # noqa: E402
from stages.layout import Layout  # noqa: E402
from stages.rankerio import load_feature_rows, load_images_table  # noqa: E402

POOL = ["widerface416", "widerface416-extra", "widerface-val34", "widerface-orig21"]
DETECTORS = ["retinaface-mnet025", "slim", "rfb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    layout = Layout(args.data_dir)
    values = {"model": "fusion", "evidence": DETECTORS}
    kind, settings = settings_of(values)
    impl = kind.impl()
    folds = {d: assign_folds(load_images_table(layout, d)[0]["image_id"], args.folds) for d in POOL}
    rows, _, _ = load_feature_rows(layout, kind, settings, POOL, DETECTORS, "original", {d: set(f) for d, f in folds.items()})
    gts = {d: read_gt(layout, d)[1] for d in POOL}
    sizes = {}
    for d in POOL:
        table, _ = load_images_table(layout, d)
        sizes[d] = {i: (int(w), int(h)) for i, w, h in zip(table["image_id"], table["width"], table["height"])}
    results = []
    for k in range(1, args.folds + 1):
        test = {d: {i for i, f in folds[d].items() if f == k} for d in POOL}
        is_test = np.array([i in test[d] for d, i in zip(rows["dataset"], rows["image_id"])])
        t0 = time.perf_counter()
        model = impl.fit(rows[~is_test], settings, FitRun(Path("."), {}, "cpu", 2)).model
        finals: dict[str, dict[str, pd.DataFrame]] = {m: {} for m in ("fusion", "wbf-rule-probs", "wbf-rule", "wbf")}
        for d in POOL:
            held = rows[is_test & (rows["dataset"] == d).to_numpy()]
            frames = [held[held["detector"] == det].drop(columns=["oracle_iou", "gt_id"]) for det in DETECTORS]
            finals["fusion"][d] = impl.fuse(model, settings, frames, sizes[d])
            finals["wbf"][d] = weighted_boxes_fusion(frames, sizes[d])
            kept = F.kept_boxes(frames, settings.nms_iou)
            p_box = F.predict_gbm(model.box, kept[list(F.FEATURES)].to_numpy(np.float32), F._box_config(settings))
            table = F.clusters(kept.assign(p_box=p_box), len(DETECTORS), sizes[d], settings.fusion_iou)
            finals["wbf-rule-probs"][d] = F.fused_boxes(table, table["c_p_wbf"].to_numpy(), settings.nms_iou, 750)
            finals["wbf-rule"][d] = F.fused_boxes(table, table["c_wbf"].to_numpy(), settings.nms_iou, 750)
        prefixed = {m: pd.concat([f.assign(image_id=d + "/" + f["image_id"].astype(str)) for d, f in by.items()],
                                 ignore_index=True) for m, by in finals.items()}
        gt = {d: gts[d][gts[d]["image_id"].isin(test[d])] for d in POOL}
        for method, by_subset in score_finals(prefixed, gt).items():
            for subset, ap in by_subset.items():
                results.append({"fold": k, "method": method, "subset": subset, "ap": ap})
        print(f"fold {k}: {time.perf_counter() - t0:.1f} s", flush=True)
    table = pd.DataFrame(results)
    print((table.pivot_table(index="method", columns="subset", values="ap") * 100).round(1).to_string())
    wide = table.pivot_table(index=["fold", "subset"], columns="method", values="ap")
    for method in ("fusion", "wbf-rule-probs", "wbf-rule"):
        delta = ((wide[method] - wide["wbf"]) * 100).groupby("subset").agg(["mean", "std", "min"]).round(2)
        print(f"\n{method} - wbf (AP points):\n{delta.to_string()}")


if __name__ == "__main__":
    main()
