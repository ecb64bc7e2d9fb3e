"""Stage ``detect``: run one detector over one shard of a dataset at one scale set.

Reads ``DATA/interim/index/{dataset}/images.parquet`` (image paths relative to the dataset
root recorded in its ``root`` provenance key, or absolute), the detector's weights from the
sha256-checked cache, and writes one detections shard and its latency side table:

    DATA/interim/detections/dataset=D/detector=DET/scales=SET/part-K.parquet
    DATA/interim/latency/dataset=D/detector=DET/scales=SET/part-K.parquet

A shard whose two files already exist and are up to date is skipped:
:func:`pipeline.provenance.up_to_date` compares the provenance keys that decide it (settings
including shard and precision, detector, weights sha256, scale set, the images table's
sha256, and ``code``, the hash of this module's import closure that the Snakefile's
``code`` param also uses), not the rule name, the working folder or unrelated code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import click
import pandas as pd
import psutil
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.detect import Decoded, DetectLoop, MemoryBudget
from pipeline.detectors import registry, weights as weights_cache
from pipeline.detectors.base import Detector
from pipeline.errors import ConfrankError
from pipeline.imaging import decode_image, to_chw_tensor
from pipeline.provenance import code_hash, provenance, sha256_file, up_to_date
from pipeline.scales import scale_set
from pipeline.runtime import resident_bytes
from pipeline.tables import read_metadata, read_table, shard_members, write_table
from stages.common import DETECTION_SORT, pick_device, scales_option
from stages.layout import Layout, data_dir_option, parse_shard

log = logging.getLogger("confrank.detect")

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SORT_LATENCY = [("image_id", "ascending")]


class ImageFiles(Dataset):
    """Decodes the images of a shard (in DataLoader workers): item -> (image_id, pixels, error).

    Errors travel as text, so a bad file stops the run with one line naming it instead of a
    worker traceback.
    """

    def __init__(self, rows: pd.DataFrame, root: Path | None):
        self.ids = rows["image_id"].astype(str).tolist()
        self.paths = [resolve_path(p, root) for p in rows["path"].astype(str)]
        self.sizes = list(zip(rows["width"].astype(int), rows["height"].astype(int)))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str | None]:
        try:
            image = decode_image(self.paths[i], self.sizes[i])
        except ConfrankError as exc:
            return self.ids[i], None, str(exc)
        return self.ids[i], to_chw_tensor(image), None


def resolve_path(path: str, root: Path | None) -> Path:
    """An images-table path: absolute as is, else relative to the dataset root."""
    p = Path(path)
    if p.is_absolute():
        return p
    if root is None:
        raise ConfrankError(f"image path {path!r} is relative but the images table records no dataset root")
    return root / p


def decoded_images(files: ImageFiles, workers: int, pin: bool) -> Iterator[Decoded]:
    """Decoded images in table order, decoded ``workers`` at a time ahead of the consumer."""
    loader = DataLoader(files, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    for image_id, pixels, error in loader:
        if error is not None:
            raise ConfrankError(error)
        yield Decoded(image_id, pixels)


def shard_metadata(dataset: str, detector: str, scales: str, shard: tuple[int, int], device: torch.device,
                   amp: str, channels_last: bool, weight_files: dict[str, Path], images_path: Path,
                   top_k: int, min_score: float) -> dict[str, Any]:
    """The provenance both output files carry; equal provenance means an identical result."""
    config = {
        "dataset": dataset, "detector": detector, "scales": scales, "shard": shard[0], "n_shards": shard[1],
        "device": device.type, "amp": amp, "channels_last": channels_last, "top_k": top_k, "min_score": min_score,
        "scale_list": [[s.target, s.edge, s.flip] for s in scale_set(scales).views],
    }
    return provenance(
        "detect", config, inputs=[images_path], detector=detector, scale_set=scales,
        weights={name: sha256_file(path) for name, path in sorted(weight_files.items())},
        code=code_hash("stages.detect"),  # the Snakefile's `code` param of detect_shard
    )


def is_complete(paths: tuple[Path, Path], meta: dict[str, Any]) -> bool:
    """True when both outputs exist and each is :func:`pipeline.provenance.up_to_date` with
    ``meta`` (however and from wherever it was written)."""
    return all(p.is_file() and up_to_date(read_metadata(p), meta) for p in paths)


#: share of the memory available when a shard starts that its network calls may use (the
#: rest is for other processes and for the error of the per-pixel estimate); on the CPU the
#: process also hands freed heap pages back to stay within it (docs/detectors.md, "Memory at 8K")
MEMORY_SHARE = 0.3


def memory_budget(device: torch.device, per_pixel: float) -> MemoryBudget:
    """A share of the host's available RAM (CPU) or of the device's free memory (CUDA), now."""
    if device.type == "cuda":
        available, _ = torch.cuda.mem_get_info(device)
    else:
        available = psutil.virtual_memory().available
    return MemoryBudget(int(available * MEMORY_SHARE), per_pixel)


def build_detector(name: str, weight_files: dict[str, Path], device: torch.device, amp: str,
                   channels_last: bool) -> Detector:
    """Build and configure (AMP, memory format) a registered detector."""
    detector = registry.build(name, weight_files, device)
    if amp != "none" or channels_last:
        if not hasattr(detector, "set_precision"):
            raise ConfrankError(f"detector {name!r} does not support --amp/--channels-last")
        detector.set_precision(AMP_DTYPES[amp], channels_last)
    return detector


def run_detect(dataset: str, detector_name: str, scales: str, shard: tuple[int, int], layout: Layout,
               device: torch.device, batch_size: int = 4, amp: str = "none", channels_last: bool = False,
               workers: int = 2) -> tuple[Path, bool]:
    """Detect one shard; returns (detections path, whether it was computed, not skipped)."""
    info = registry.get_info(detector_name)
    views = scale_set(scales).views
    images_path = layout.images(dataset)
    if not images_path.is_file():
        raise ConfrankError(f"{images_path}: no images table; run `confrank index --name {dataset} --root DIR` first")
    weight_files = weights_cache.ensure(info.weights, log=lambda line: click.echo(line, err=True))
    out = (layout.detections(dataset, detector_name, scales, shard[0]),
           layout.latency(dataset, detector_name, scales, shard[0]))
    meta = shard_metadata(dataset, detector_name, scales, shard, device, amp, channels_last, weight_files,
                          images_path, Detector.top_k, Detector.min_score)
    if is_complete(out, meta):
        return out[0], False

    images = read_table(images_path, "images")
    images["image_id"] = images["image_id"].astype(str)
    members = set(shard_members(images["image_id"].tolist(), shard[1], shard[0]))
    rows = images[images["image_id"].isin(members)].sort_values("image_id", kind="stable")
    root = read_metadata(images_path).get("root")
    files = ImageFiles(rows, Path(root) if root else None)

    detector = build_detector(detector_name, weight_files, device, amp, channels_last)
    # an image too large for the GPU even alone runs on a CPU copy, built on first need
    fallback = (partial(build_detector, detector_name, weight_files, torch.device("cpu"), "none", False)
                if device.type == "cuda" else None)
    budget = memory_budget(device, info.bytes_per_pixel)
    # on the CPU the process stays within what it holds now plus the budget: freed heap pages
    # go back to the system before a call that would not fit otherwise
    limit = resident_bytes() + budget.available if device.type == "cpu" else None
    loop = DetectLoop(detector, views, batch_size=batch_size, top_k=detector.top_k, cpu_fallback=fallback,
                      memory=budget, release_above=limit)
    detections, latency = loop.run(decoded_images(files, workers, pin=device.type == "cuda"))
    if loop.fallbacks:
        meta = {**meta, "cpu_fallback": loop.fallbacks}
    with ThreadPoolExecutor(max_workers=2) as pool:  # the two files are written concurrently
        jobs = [pool.submit(write_table, detections, out[0], "detections", meta, DETECTION_SORT),
                pool.submit(write_table, latency, out[1], "latency", meta, SORT_LATENCY)]
        errors = [job.exception() for job in jobs]
    failed = [err for err in errors if err is not None]
    if failed:  # (disk full, say) never leave one table of the pair without the other
        for path, err in zip(out, errors):
            if err is None:
                path.unlink(missing_ok=True)
        raise failed[0]
    return out[0], True


@click.command("detect")
@click.option("--dataset", required=True, help="Dataset name given to `confrank index`.")
@click.option("--detector", "detector_name", required=True, help="Detector name (see `confrank detectors`).")
@scales_option("original", help="Named scale set: original, 8k (long edge 7680), wider-multi, 8k-multi (with flips).")
@click.option("--shard", default="0/1", show_default=True, help="K/N: run shard K of N (0-based).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Most images per network call (equal input sizes only); fewer when they would not "
                   f"fit in {MEMORY_SHARE:.0%} of the available RAM (CPU) or free GPU memory (CUDA).")
@click.option("--amp", type=click.Choice(list(AMP_DTYPES)), default="none", show_default=True,
              help="Autocast precision of the network; decoding stays float32.")
@click.option("--channels-last/--no-channels-last", default=False, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="DataLoader processes decoding JPEGs ahead of the detector.")
@data_dir_option
def cli(dataset: str, detector_name: str, scales: str, shard: str, device: str | None, batch_size: int, amp: str,
        channels_last: bool, workers: int, data_dir: Path) -> None:
    """Run a face detector over one shard of a dataset; write detections + latency shards."""
    logging.basicConfig(level=logging.WARNING, format="confrank: warning: %(message)s")
    k, n = parse_shard(shard)
    layout = Layout.from_env(data_dir)
    path, computed = run_detect(dataset, detector_name, scales, (k, n), layout, pick_device(device), batch_size,
                                amp, channels_last, workers)
    state = "written" if computed else "up to date, skipped"
    click.echo(f"detect {dataset}/{detector_name}/{scales} shard {k}/{n}: {state} -> {path}")
