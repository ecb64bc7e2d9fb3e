"""``python -m stages.subset``: index the first N images of an indexed dataset as a new dataset.

Used for runs that cannot afford every image (8K on a CPU): the subset has its own images
and gt tables, so every later stage, and the evaluation, sees the same images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.errors import ConfrankError, MissingInputError
from pipeline.shards import provenance, read_metadata, read_table, write_table
from stages.layout import Layout, data_dir_option


def first_images(image_ids: list[str], n: int) -> list[str]:
    """The first ``n`` ids in sorted order (all of them when there are fewer)."""
    return sorted(image_ids)[:n]


def write_subset(layout: Layout, parent: str, name: str, max_images: int) -> int:
    """Write images/gt tables of ``name`` from ``parent``; returns the number of images kept."""
    src_images, src_gt = layout.images(parent), layout.gt(parent)
    for path in (src_images, src_gt):
        if not path.is_file():
            raise MissingInputError(f"{path}: index of dataset {parent!r} not found (run confrank index first)")
    images = read_table(src_images, "images")
    gt = read_table(src_gt, "gt")
    keep = set(first_images(images["image_id"].astype(str).tolist(), max_images))
    config = {"parent": parent, "name": name, "max_images": max_images}
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
@click.option("--max-images", type=click.IntRange(min=1), required=True, help="Images to keep (first N sorted ids).")
@data_dir_option
def cli(parent: str, name: str, max_images: int, data_dir: Path) -> None:
    """Index the first MAX_IMAGES images of PARENT as dataset NAME."""
    kept = write_subset(Layout.from_env(data_dir), parent, name, max_images)
    click.echo(f"subset {name}: {kept} images of {parent}")


if __name__ == "__main__":
    try:
        cli()
    except ConfrankError as exc:
        click.echo(f"confrank: error: {exc}", err=True)
        sys.exit(1)
