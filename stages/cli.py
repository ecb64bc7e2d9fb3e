"""The ``confrank`` command (the console entry point): every DAG stage as a subcommand, plus inspect/weights/run.

Subcommands are imported lazily, so ``confrank inspect`` does not pay for importing torch.
Each maps to ``stages.<module>:<attribute>``, a click command defined next to its stage.
"""

from __future__ import annotations

import importlib
import sys

import click

from pipeline.errors import ConfrankError
from pipeline.runtime import keep_freed_memory

#: name -> (module, attribute, one-line help shown by ``confrank --help`` without importing)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "index": ("stages.index", "cli", "Ingest a dataset into images/gt tables."),
    "sample": ("stages.sample", "cli", "Build the embedded demo dataset (WiderFace layout)."),
    "subset": ("stages.subset", "cli", "Index a half, a cross-validation fold or the first N images of a dataset as a new one."),
    "inspect": ("stages.inspect", "cli", "Show schema, provenance and summaries of Parquet outputs."),
    "detect": ("stages.detect", "cli", "Run a face detector over a dataset shard."),
    "detectors": ("stages.weights", "detectors_cli", "List detectors and the status of their weights."),
    "weights": ("stages.weights", "cli", "Fetch, add or verify detector weights (sha256-checked)."),
    "import": ("stages.submission", "import_cli", "Import a WiderFace submission folder."),
    "export": ("stages.submission", "export_cli", "Export final boxes as a WiderFace submission."),
    "oracle": ("stages.oracle", "cli", "Annotate detections with IoU to the closest face."),
    "nms": ("stages.nms", "cli", "NMS / box voting into final boxes."),
    "fuse": ("stages.fuse", "cli", "Fuse several detectors' boxes into final boxes (Weighted Boxes Fusion)."),
    "evaluate": ("stages.evaluate", "cli", "WiderFace AP (easy/medium/hard), AP@[.5:.95], VOC AP."),
    "features": ("stages.features", "cli", "Per-box features and the ensemble score of a detector's boxes."),
    "image-features": ("stages.image_features", "cli", "Per-box image evidence (a face network at each box) of a detector's boxes."),
    "train": ("stages.train", "cli", "Train the confidence ranker."),
    "rerank": ("stages.rerank", "cli", "Re-score detections with a trained ranker."),
    "cv": ("stages.cv", "cli", "Cross-validate a ranker setting on a pool of datasets."),
    "report": ("stages.report", "cli", "Paper-style tables and figures (HTML + markdown)."),
    "run": ("stages.run", "cli", "Run the whole Snakemake DAG."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[name]
        module = importlib.import_module(module_name)
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="confrank")
def group() -> None:
    """confrank: face detectors at 8K, a pairwise confidence ranker, exact WiderFace AP."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user-facing errors become one line on stderr and exit code 1.

    That includes operating-system errors (disk full, permission denied, a path that is not a
    folder): their message names the file. Anything else is a bug and keeps its traceback.
    """
    keep_freed_memory()  # CPU inference without a page fault storm (pipeline/runtime.py)
    try:
        group.main(args=argv, prog_name="confrank", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (ConfrankError, OSError) as exc:
        click.echo(f"confrank: error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
