"""``confrank subset``: index part of an indexed dataset as a new dataset.

Used for runs that cannot afford every image (8K on a CPU), and for held-out evaluation
(train the ranker on ``--split-half first``, evaluate on a subset made of the ``second``
half). The subset has its own images and gt tables, so every later stage, and the
evaluation, sees the same images.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.errors import MissingInputError
from pipeline.ranker.data import HALVES, split_half
from pipeline.provenance import provenance
from pipeline.tables import read_metadata, read_table, write_table
from stages.layout import Layout, data_dir_option


def select_images(image_ids: list[str], half: str | None = None, max_images: int | None = None) -> list[str]:
    """Ids kept in a subset, sorted: the ``half`` of ``split_half`` (all when None), then
    its first ``max_images`` (all when None or when there are fewer)."""
    ids = split_half(image_ids, half) if half else sorted(image_ids)
    return ids[:max_images] if max_images else ids


def write_subset(layout: Layout, parent: str, name: str, half: str | None = None, max_images: int | None = None) -> int:
    """Write images/gt tables of ``name`` from ``parent``; returns the number of images kept."""
    src_images, src_gt = layout.images(parent), layout.gt(parent)
    for path in (src_images, src_gt):
        if not path.is_file():
            raise MissingInputError(f"{path}: index of dataset {parent!r} not found (run confrank index first)")
    images = read_table(src_images, "images")
    gt = read_table(src_gt, "gt")
    keep = set(select_images(images["image_id"].astype(str).tolist(), half, max_images))
    config = {"parent": parent, "name": name, "half": half, "max_images": max_images}
    for kind, frame, src, dst in (("images", images, src_images, layout.images(name)), ("gt", gt, src_gt, layout.gt(name))):
        part = frame[frame["image_id"].astype(str).isin(keep)]
        # keep the parent's keys (its dataset root above all: image paths are relative to it)
        meta = {**read_metadata(src), **provenance("subset", config, inputs=[src], dataset=name, parent=parent)}
        order = [("image_id", "ascending")] + ([("gt_id", "ascending")] if kind == "gt" else [])
        write_table(part, dst, kind, meta, sort_by=order)
    return len(keep)


@click.command()
@click.option("--parent", required=True, help="Indexed dataset to take images from.")
@click.option("--name", required=True, help="Name of the new dataset.")
@click.option("--half", type=click.Choice(HALVES), default=None,
              help="Keep one half of the sorted ids: first = positions 0, 2, 4, ...; second = 1, 3, 5, ... "
                   "(the halves of `confrank train --split-half`).")
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Keep the first N sorted ids (of the half).")
@data_dir_option
def cli(parent: str, name: str, half: str | None, max_images: int | None, data_dir: Path) -> None:
    """Index part of dataset PARENT (a half, its first N images, or both) as dataset NAME."""
    if half is None and max_images is None:
        raise click.UsageError("give --half, --max-images or both")
    if name == parent:
        raise click.UsageError("--name must differ from --parent")
    kept = write_subset(Layout.from_env(data_dir), parent, name, half, max_images)
    click.echo(f"subset {name}: {kept} images of {parent}")
