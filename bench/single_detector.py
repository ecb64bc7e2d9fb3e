"""Seed 000's single-detector setting: seconds per image of ``single``, ``rank`` and ``multi``.

For each detector, on the same ``--n`` real images of ``--dataset`` (widerface416: 416 x 416;
widerface-val34: WiderFace's full-resolution val images), one image at a time (a frame's
latency, as seed 000's tables 3-4 report it), three paths end to end:

- ``single``: detect at ``--scales`` (``original``, or ``8k`` for seed 000's table 4;
  :class:`pipeline.detect.DetectLoop`), then NMS IoU 0.4 (:func:`pipeline.postprocess.fuse`,
  as ``confrank nms --method single``);
- ``rank``: the same detection, then the image evidence of every box (RetinaFace
  MobileNet-0.25 read once per image from the image file, at most ``--max-side`` px,
  :class:`ImageEvidence`, as ``confrank image-features``),
  the per-box features with no other detector (:func:`frame_features`, as ``confrank
  features`` reads them for a ranker without evidence), the trees' new scores
  (``--model``: a ``cpu-single`` ranker's ``model.pt``, as ``confrank rerank``), then NMS on
  them (``confrank nms --method rank``);
- ``multi``: detect at ``--multi`` (``wider-multi``: short side 500..1700 px, with flips, 10
  network calls; ``8k-multi``: 7680, 5760 and 4096 px with flips, 6), then box voting
  (``confrank nms --method multi``).

The baseline is ``single``, measured in the same run: the three paths run one after another
on each image (so they see the same load), ``--repeats`` times, and each path's fastest run on
an image counts (a shared machine only ever slows a run down); the mean over images is
reported, with ``rank``'s extra work apart (evidence, features, trees). One untimed run of
every path on the first image comes first (warm-up). JPEG decoding is not timed (no path
decodes more than the others: all read the same decoded image).

Run: ``.venv/bin/python bench/single_detector.py --model DATA/processed/rankers/NAME/model.pt
[--n 10] [--repeats 2] [--threads 1] [--detectors retinaface-mnet025,slim,rfb]
[--dataset widerface416] [--scales original] [--multi wider-multi] [--max-side 1024]`` after
``confrank train --datasets widerface416 --detectors slim --scales original --ranker NAME
--preset cpu-single``. Weights from ``$CONFRANK_WEIGHTS``, else the cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.detect import Decoded, DetectLoop  # noqa: E402
from pipeline.detectors import registry, weights as weights_cache  # noqa: E402
from pipeline.imaging import decode_image, to_chw_tensor  # noqa: E402
from pipeline.postprocess import fuse  # noqa: E402
from pipeline.ranker.features import frame_features  # noqa: E402
from pipeline.ranker.image_evidence import IMAGE_FEATURES, ImageEvidence  # noqa: E402
from pipeline.ranker.registry import ScoreContext, load_ranker  # noqa: E402
from pipeline.runtime import keep_freed_memory  # noqa: E402
from pipeline.scales import scale_set  # noqa: E402

SHARED = Path(os.environ.get("CONFRANK_SHARED", ROOT.parent / "shared"))
DETECTORS = ("retinaface-mnet025", "slim", "rfb")
#: confrank nms defaults (config/config.yaml postprocess)
IOU, KEEP, KEEP_SINGLETONS = 0.4, 750, False
#: what each path's time is split into
PARTS = ("detect", "evidence", "features", "trees", "nms")


def build(name: str, device: torch.device):
    files = weights_cache.resolve(registry.get_info(name).weights)
    return registry.build(name, files, device)


def detections(loop: DetectLoop, image: Decoded) -> pd.DataFrame:
    """One image's detections, sorted as a stored shard (score descending)."""
    dets, _ = loop.run([image])
    return dets.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


class Paths:
    """The three paths of one detector; each call returns ``{part: seconds}``."""

    def __init__(self, detector, evidence: ImageEvidence, ranker, batch_size: int, scales: str, multi: str):
        self.single_loop = DetectLoop(detector, list(scale_set(scales)), batch_size=batch_size)
        self.multi_loop = DetectLoop(detector, list(scale_set(multi)), batch_size=batch_size)
        self.evidence = evidence
        self.ranker = ranker

    @staticmethod
    def _detect_and_fuse(loop: DetectLoop, image: Decoded, method: str) -> dict[str, float]:
        t0 = time.perf_counter()
        dets = detections(loop, image)
        t1 = time.perf_counter()
        fuse(dets, method, IOU, KEEP, KEEP_SINGLETONS)
        return {"detect": t1 - t0, "nms": time.perf_counter() - t1}

    def single(self, image: Decoded, bgr: np.ndarray) -> dict[str, float]:
        return self._detect_and_fuse(self.single_loop, image, "single")

    def rank(self, image: Decoded, bgr: np.ndarray) -> dict[str, float]:
        t0 = time.perf_counter()
        dets = detections(self.single_loop, image)
        t1 = time.perf_counter()
        boxes = dets[["x1", "y1", "x2", "y2"]].to_numpy(np.float32)
        image_cols = self.evidence.image_evidence(self.evidence.prepare(bgr), boxes)
        t2 = time.perf_counter()
        height, width = bgr.shape[:2]
        frame = frame_features(dets, {}, {image.image_id: (width, height)})
        frame = pd.concat([frame, pd.DataFrame(image_cols, columns=list(IMAGE_FEATURES), index=frame.index)], axis=1)
        t3 = time.perf_counter()
        frame["rank_score"] = self.ranker.score(frame, ScoreContext({image.image_id: (width, height)}))
        t4 = time.perf_counter()
        fuse(frame, "rank", IOU, KEEP, KEEP_SINGLETONS)
        return {"detect": t1 - t0, "evidence": t2 - t1, "features": t3 - t2, "trees": t4 - t3,
                "nms": time.perf_counter() - t4}

    def multi(self, image: Decoded, bgr: np.ndarray) -> dict[str, float]:
        return self._detect_and_fuse(self.multi_loop, image, "multi")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a cpu-single ranker's model.pt (confrank train)")
    parser.add_argument("--n", type=int, default=10, help="images (the first in file-name order)")
    parser.add_argument("--dataset", default="widerface416", help="a WiderFace-layout folder of ../shared")
    parser.add_argument("--scales", default="original", help="the scale set of single and rank")
    parser.add_argument("--multi", default="wider-multi", help="the scale set of multi")
    parser.add_argument("--max-side", type=int, default=1024, help="the evidence network's longest input side")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each path per image (fastest kept)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every path (one: the cores are shared; see docs/ranker-evidence.md)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per network call (the detect stage default)")
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    args = parser.parse_args()
    keep_freed_memory()  # as the confrank command does
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    ranker = load_ranker(args.model, device)
    if not getattr(ranker.settings, "image_features", False) or ranker.settings.evidence_set:
        raise SystemExit(f"{args.model}: not a single-detector ranker with image evidence (preset cpu-single)")
    evidence = ImageEvidence.from_detector(build("retinaface-mnet025", device), args.max_side)
    files = sorted((SHARED / args.dataset / "WIDER_val" / "images").glob("*/*.jpg"))[: args.n]
    bgrs = [decode_image(p) for p in files]
    images = [Decoded(p.stem, to_chw_tensor(b)) for p, b in zip(files, bgrs)]
    sides = np.mean([max(b.shape[:2]) for b in bgrs])
    print(f"cpu, {args.threads} torch thread(s), load {os.getloadavg()[0]:.2f}; {len(images)} {args.dataset} images "
          f"(long edge {sides:.0f} px on average), single/rank at {args.scales}, multi at {args.multi}, evidence at "
          f"<= {args.max_side} px, best of {args.repeats} per image; ranker {args.model.parent.name}: "
          f"{ranker.kind.name} {','.join(ranker.settings.features)}")
    print(f"{'detector':20s} {'single s/img':>12s} {'rank s/img':>11s} {'multi s/img':>12s} {'rank/single':>11s} "
          f"{'rank/multi':>10s}  rank extra ms/img (evidence, features, trees)")
    for name in args.detectors.split(","):
        paths = Paths(build(name, device), evidence, ranker, args.batch_size, args.scales, args.multi)
        runs = {"single": paths.single, "rank": paths.rank, "multi": paths.multi}
        for run in runs.values():  # warm-up
            run(images[0], bgrs[0])
        best = {k: [] for k in runs}
        for image, bgr in zip(images, bgrs):
            per = {k: None for k in runs}
            for _ in range(args.repeats):
                for key, run in runs.items():
                    parts = run(image, bgr)
                    if per[key] is None or sum(parts.values()) < sum(per[key].values()):
                        per[key] = parts
            for key in runs:
                best[key].append(per[key])
        mean = {k: {p: float(np.mean([r.get(p, 0.0) for r in v])) for p in PARTS} for k, v in best.items()}
        total = {k: sum(v.values()) for k, v in mean.items()}
        extra = mean["rank"]
        print(f"{name:20s} {total['single']:12.3f} {total['rank']:11.3f} {total['multi']:12.3f} "
              f"{total['rank'] / total['single']:10.2f}x {total['rank'] / total['multi']:9.2f}x  "
              f"{1000 * extra['evidence']:.0f}, {1000 * extra['features']:.0f}, {1000 * extra['trees']:.0f}", flush=True)
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
