"""``python -m stages.demo`` (``make demo``): the whole DAG on a small dataset, then the report.

- With a WiderFace-layout folder named by ``CONFRANK_DATASET``, or ``../shared/widerface416``
  beside the repository: the three shared-weight detectors (retinaface-mnet025, slim, rfb;
  weights from ``CONFRANK_WEIGHTS`` or ``../shared/weights``) at ``original`` on every image
  and at ``original`` and ``8k`` on a few images (8K on a CPU is slow), a small image-free
  ranker, and the report.
- Otherwise: the embedded default of ``config/config.yaml`` (MTCNN on the dataset built by
  ``confrank sample``).

Snakemake's own output goes to ``DATA/demo/snakemake.log``; the terminal shows one progress
bar over the DAG's jobs and one summary line per finished job (the last line of its log).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml
from tqdm import tqdm

from pipeline.atomic_io import write_text_atomic
from stages.layout import Layout
from stages.common import ROOT, snakemake_command

SHARED_DETECTORS = ["retinaface-mnet025", "slim", "rfb"]
#: images of the 8K subset: each costs ~10 s per detector on a 2-core CPU
EIGHT_K_IMAGES = 3


def shared_dataset() -> Path | None:
    """The WiderFace-layout folder to run on, or None for the embedded default."""
    named = os.environ.get("CONFRANK_DATASET")
    if named:
        path = Path(named)
        if not path.is_dir():
            raise click.ClickException(f"CONFRANK_DATASET={named}: not a folder")
        return path
    default = Path("..") / "shared" / "widerface416"
    return default if default.is_dir() else None


def shared_config(root: Path, weights: Path) -> dict[str, Any]:
    """Config overrides (merged over config/config.yaml) for a run on a shared WiderFace folder."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", root.resolve().name) or "dataset"
    subset = f"{name}-8k"
    return {
        "weights_dir": str(weights),
        "datasets": {
            name: {"source": "folder", "root": str(root), "format": "widerface", "split": "val", "shards": 1},
            subset: {"source": "subset", "subset_of": name, "max_images": EIGHT_K_IMAGES, "shards": 1},
        },
        "rankers": {
            "demo": {"datasets": [name], "detectors": SHARED_DETECTORS, "scales": "original", "iterations": 300,
                     "backbone": "mobilenet", "image_branch": "none", "loss": "pairwise", "n_pairs": 10,
                     "batch_size": 8, "num_boxes": 2000, "output": "logit"},
        },
        "experiments": [
            {"dataset": name, "detectors": SHARED_DETECTORS, "scales": ["original"],
             "methods": ["single", "oracle", "rank"], "rankers": ["demo"]},
            {"dataset": subset, "detectors": SHARED_DETECTORS, "scales": ["original", "8k"],
             "methods": ["single", "rank"], "rankers": ["demo"]},
        ],
    }


def summarise(line: str) -> str:
    """A log's last line for the terminal; evaluate's JSON becomes its APs."""
    try:
        result = json.loads(line)
    except ValueError:
        return line
    if not isinstance(result, dict):
        return line
    if "ap" in result:
        return "AP " + "  ".join(f"{k} {100 * result['ap'][k]:.1f}" for k in ("easy", "medium", "hard"))
    return f"VOC AP {100 * result['voc_ap']:.1f}" if "voc_ap" in result else line


class Progress:
    """Follows snakemake's output: a bar over jobs, one line per finished job."""

    JOB = re.compile(r"^(?:local)?rule (\w+):")
    FIELD = re.compile(r"^\s+(jobid|log|wildcards): (.*)$")
    DONE = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)")
    STEPS = re.compile(r"^(\d+) of (\d+) steps")

    def __init__(self, logfile):
        self.logfile = logfile
        self.bar = tqdm(total=None, unit="job", desc="DAG", dynamic_ncols=True)
        self.jobs: dict[str, dict[str, str]] = {}
        self.current: dict[str, str] | None = None

    def feed(self, line: str) -> None:
        self.logfile.write(line)
        line = line.rstrip("\n")
        if m := self.JOB.match(line):
            self.current = {"rule": m.group(1)}
        elif self.current is not None and (m := self.FIELD.match(line)):
            self.current[m.group(1)] = m.group(2)
            if m.group(1) == "jobid":
                self.jobs[m.group(2)] = self.current
        elif m := self.DONE.match(line):
            self.finished(self.jobs.get(m.group(1), {"rule": m.group(2)}))
        elif m := self.STEPS.match(line):
            self.bar.total = int(m.group(2))
            self.bar.n = int(m.group(1))
            self.bar.refresh()

    def finished(self, job: dict[str, str]) -> None:
        if job["rule"] == "all":
            return
        what = job.get("wildcards", "")
        last = ""
        log = Path(job.get("log", "").split(",")[0].strip()) if job.get("log") else None
        if log and log.is_file():
            lines = [ln.strip() for ln in re.split(r"[\r\n]", log.read_text(errors="replace")) if ln.strip()]
            last = summarise(lines[-1]) if lines else ""
        self.bar.write(f"{job['rule']:<15} {what:<60} {last}"[:200])


def available_mb() -> int:
    """80 % of the machine's memory in MB: the budget snakemake schedules jobs' mem_mb against."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(0.8 * total / 2**20)


def run(extra_args: list[str], config: dict[str, Any] | None, layout: Layout) -> int:
    """Run the DAG (config overrides written beside the demo log); returns snakemake's exit code."""
    demo_dir = layout.root / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    args = ["--cores", str(os.cpu_count() or 1), "--resources", f"mem_mb={available_mb()}", *extra_args]
    if config is not None:
        path = demo_dir / "config.yaml"
        write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
        args = ["--configfile", str(path), *args]
    with open(demo_dir / "snakemake.log", "w") as logfile:
        proc = subprocess.Popen(snakemake_command(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
        progress = Progress(logfile)
        assert proc.stdout is not None
        for line in proc.stdout:
            progress.feed(line)
        progress.bar.close()
        return proc.wait()


@click.command()
@click.argument("snakemake_args", nargs=-1, type=click.UNPROCESSED)
def cli(snakemake_args: tuple[str, ...]) -> None:
    """Run the demo DAG from the repository root; extra SNAKEMAKE_ARGS are passed through."""
    os.chdir(ROOT)
    layout = Layout.from_env()
    root = shared_dataset()
    if root is None:
        click.echo("demo: embedded dataset (confrank sample), MTCNN — config/config.yaml")
        config = None
    else:
        weights = Path(os.environ.get("CONFRANK_WEIGHTS", Path("..") / "shared" / "weights"))
        click.echo(f"demo: {root} with {', '.join(SHARED_DETECTORS)} (weights {weights}), "
                   f"original on every image, original + 8k on {EIGHT_K_IMAGES} images")
        config = shared_config(root, weights)
    start = time.perf_counter()
    code = run(list(snakemake_args), config, layout)
    minutes = (time.perf_counter() - start) / 60
    if code != 0:
        click.echo(f"demo failed after {minutes:.1f} min; see {layout.root / 'demo' / 'snakemake.log'} and logs/", err=True)
        sys.exit(code)
    report = layout.report_files().html
    click.echo(f"demo finished in {minutes:.1f} min; report: {report} (markdown: {report.with_suffix('.md')})")


if __name__ == "__main__":
    cli()
