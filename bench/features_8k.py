"""Per-box features at ``8k-multi``: seconds per image of ``frame_features`` for one detector.

A synthetic image in the shape of an ``8k-multi`` one: 7680 x 5120 original-image pixels,
``--faces`` faces (centres uniform over the frame, sizes log-uniform 8-800 px), and for each
of ``--detectors`` detectors and each of the 6 views of ``8k-multi`` (long edge 7680, 5760,
4096 px, each with and without flip) ``--boxes`` boxes: jittered copies of the faces (the
jitter grows as the view shrinks) and a share of background boxes, scored by their IoU with
the face they come from plus noise. One detector is described, the others are its evidence.

- ``new``: :func:`pipeline.ranker.features.frame_features` as ``confrank features`` runs it
  now: each (scale, flip) view's evidence is the other detectors' boxes of the same view,
  and the IoUs come from the pair search (:func:`pipeline.ranker.features.overlap_pairs`);
- ``old`` (the baseline, measured in the same run): every view's evidence is *all* views of
  the other detectors (the evidence frames without ``scale``/``flip``, as before) and every
  IoU block is the dense ``n x m`` matrix (``SPARSE_MIN_PAIRS`` set out of reach).

Also in the run (unless ``--no-check``): per-view evidence with the dense matrices, whose
features must equal the pair search's bit for bit. ``--real DATA`` adds the ``original``-scale
shards of a data folder (oracle shards, else detections, of ``--real-detectors`` on
``--dataset``): each detector described with the others as evidence, pair search vs dense,
ms/image and whether every feature is identical. Times are the fastest of ``--repeats`` runs
per image (``--old-repeats`` for the baseline), wall and CPU seconds, after the malloc
settings of the ``confrank`` command (:func:`pipeline.runtime.keep_freed_memory`).

Run: ``.venv/bin/python bench/features_8k.py [--images 2] [--boxes 5000] [--repeats 3]
[--old-repeats 1] [--real DATA --dataset widerface416]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.ranker import features as F  # noqa: E402
from pipeline.runtime import keep_freed_memory  # noqa: E402
from pipeline.scales import scale_set  # noqa: E402

WIDTH, HEIGHT = 7680, 5120
COLUMNS = ["image_id", "detector", "scale", "flip", "x1", "y1", "x2", "y2", "score"]


def fake_image(rng: np.random.Generator, image_id: str, faces: int, boxes: int,
               detectors: int) -> list[pd.DataFrame]:
    """One detections frame per detector: every view of ``8k-multi``, ``boxes`` boxes each."""
    centre = rng.uniform([0, 0], [WIDTH, HEIGHT], (faces, 2))
    side = np.exp(rng.uniform(np.log(8), np.log(800), (faces, 1)))
    truth = np.c_[centre - side / 2, centre + side / 2].astype(np.float32)
    frames = []
    for d in range(detectors):
        parts = []
        for view in scale_set("8k-multi"):
            step = WIDTH / view.target  # one network-input pixel in original pixels
            face = rng.integers(0, faces, boxes)
            size = (truth[face, 2:] - truth[face, :2]).repeat(2, axis=1)
            jitter = rng.normal(0, 1, (boxes, 4)) * (0.08 * size + 2 * step)
            b = truth[face] + jitter.astype(np.float32)
            background = rng.random(boxes) < 0.2
            nb = int(background.sum())
            corner = rng.uniform([0, 0], [WIDTH, HEIGHT], (nb, 2))
            bside = np.exp(rng.uniform(np.log(8), np.log(800), (nb, 1)))
            b[background] = np.c_[corner, corner + bside]
            b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 2)
            wh = np.minimum(b[:, 2:], truth[face, 2:]) - np.maximum(b[:, :2], truth[face, :2])
            inter = np.clip(wh, 0, None).prod(axis=1)
            union = np.prod(b[:, 2:] - b[:, :2], axis=1) + np.prod(truth[face, 2:] - truth[face, :2], axis=1) - inter
            own = np.where(background, 0.0, inter / union)
            score = np.clip(0.6 * own + rng.uniform(0, 0.4, boxes) + 0.05 * d, 0.02, 1).astype(np.float32)
            parts.append(pd.DataFrame({"image_id": image_id, "detector": f"det{d}", "scale": view.target,
                                       "flip": view.flip, "x1": b[:, 0], "y1": b[:, 1], "x2": b[:, 2],
                                       "y2": b[:, 3], "score": score}))
        frames.append(pd.concat(parts, ignore_index=True)[COLUMNS])
    return frames


def per_image_seconds(frames: list[pd.DataFrame], sizes: dict[str, tuple[int, int]], repeats: int,
                      evidence_columns: list[str] | None = None) -> tuple[float, float, list[pd.DataFrame]]:
    """(wall s, CPU s, results): means over images of the fastest of ``repeats`` runs of
    ``frame_features`` (detector 0 described, the others as evidence, their frames reduced to
    ``evidence_columns`` when given). A shared machine only ever slows a run down, so the
    fastest counts; the CPU time (this process) is the steadier of the two under load."""
    own, others = frames[0], frames[1:]
    wall, cpu, results = [], [], []
    for image_id in sorted(own["image_id"].unique()):
        dets = own[own["image_id"] == image_id].reset_index(drop=True)
        ev = {}
        for f in others:
            rows = f[f["image_id"] == image_id]
            ev[str(rows["detector"].iloc[0])] = rows[evidence_columns] if evidence_columns else rows
        best_wall = best_cpu = float("inf")
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = F.frame_features(dets, ev, sizes)
            best_wall = min(best_wall, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        wall.append(best_wall)
        cpu.append(best_cpu)
        results.append(out)
    return float(np.mean(wall)), float(np.mean(cpu)), results


def same(a: list[pd.DataFrame], b: list[pd.DataFrame]) -> bool:
    """Every feature and ensemble score equal bit for bit."""
    columns = [*F.FEATURES, "ensemble_score"]
    return all(np.array_equal(x[columns].to_numpy().view(np.uint32), y[columns].to_numpy().view(np.uint32))
               for x, y in zip(a, b))


def dense():
    """The dense IoU matrices everywhere (the pair search never starts)."""
    return mock.patch.object(F, "SPARSE_MIN_PAIRS", 1 << 62)


def real(data: Path, dataset: str, detectors: list[str], repeats: int) -> None:
    """``original``-scale shards of a data folder: pair search vs dense on the same evidence."""
    from pipeline.tables import read_table, read_tables, shard_paths
    from stages.layout import Layout

    layout = Layout(data)
    images = read_table(layout.images(dataset), "images", ["image_id", "width", "height"])
    sizes = {str(r.image_id): (int(r.width), int(r.height)) for r in images.itertuples(index=False)}
    shards = {}
    for det in detectors:
        parts = (shard_paths(layout.oracle_dir(dataset, det, "original"))
                 or shard_paths(layout.detections_dir(dataset, det, "original")))
        shards[det] = read_tables(parts, "detections")
    for det in detectors:
        frames = [shards[det], *(shards[o] for o in detectors if o != det)]
        fast, fast_cpu, a = per_image_seconds(frames, sizes, repeats)
        with dense():
            slow, slow_cpu, b = per_image_seconds(frames, sizes, repeats)
        boxes = shards[det].groupby("image_id", observed=True).size()
        print(f"real {dataset} {det} (original, {len(boxes)} images, {boxes.mean():.0f} boxes/image, at most "
              f"{boxes.max()}): {fast * 1000:.1f} ms/image (pair search; CPU {fast_cpu * 1000:.1f}) vs "
              f"{slow * 1000:.1f} ms/image (dense; CPU {slow_cpu * 1000:.1f}): {slow / fast:.2f}x; "
              f"identical: {same(a, b)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--faces", type=int, default=300)
    parser.add_argument("--boxes", type=int, default=5000, help="boxes per view and detector")
    parser.add_argument("--detectors", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old-repeats", type=int, default=1)
    parser.add_argument("--no-check", action="store_true", help="skip the dense per-view run (the equality check)")
    parser.add_argument("--real", type=Path, help="a data folder with original-scale shards")
    parser.add_argument("--dataset", default="widerface416")
    parser.add_argument("--real-detectors", default="retinaface-mnet025,slim,rfb")
    args = parser.parse_args()
    keep_freed_memory()  # as the confrank command does
    rng = np.random.default_rng(0)
    images = [fake_image(rng, f"img_{k}", args.faces, args.boxes, args.detectors) for k in range(args.images)]
    frames = [pd.concat([im[d] for im in images], ignore_index=True) for d in range(args.detectors)]
    sizes = {f"img_{k}": (WIDTH, HEIGHT) for k in range(args.images)}
    print(f"[{args.images} images {WIDTH}x{HEIGHT}, 6 views x {args.boxes} boxes x {args.detectors} detectors, "
          f"{args.faces} faces; features of one detector]", flush=True)
    new, new_cpu, new_out = per_image_seconds(frames, sizes, args.repeats)
    print(f"new (per-view evidence, pair search): {new:.3f} s/image (CPU {new_cpu:.3f})", flush=True)
    if not args.no_check:
        with dense():
            view, view_cpu, view_out = per_image_seconds(frames, sizes, 1)
        print(f"per-view evidence, dense IoU: {view:.3f} s/image (CPU {view_cpu:.3f}); identical to the pair "
              f"search: {same(new_out, view_out)}", flush=True)
    with dense():
        old, old_cpu, _ = per_image_seconds(frames, sizes, args.old_repeats, ["image_id", "detector", *BOX_SCORE])
    print(f"old (all-views evidence, dense IoU): {old:.3f} s/image (CPU {old_cpu:.3f})")
    print(f"features 8k-multi: {new:.3f} s/image vs {old:.3f} s/image: {old / new:.1f}x "
          f"(CPU {new_cpu:.3f} vs {old_cpu:.3f}: {old_cpu / new_cpu:.1f}x)", flush=True)
    if args.real:
        real(args.real, args.dataset, args.real_detectors.split(","), args.repeats)


BOX_SCORE = ["x1", "y1", "x2", "y2", "score"]


if __name__ == "__main__":
    main()
