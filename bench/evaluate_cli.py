"""Benchmark: ``confrank evaluate`` of a full val submission, wall time including start-up.

Usage: ``python bench/evaluate_cli.py [--archive PATH] [--root DIR] [--repeats N]`` (defaults:
the thflgg133 submission and the official ground truth under ../shared/widerface).

Set-up (not timed): ``confrank index`` of the ground truth (no images: scoring only) and
``confrank import`` of the submission into a temporary data folder. Then, alternately, N runs
of each of

- the baseline, ``python -c "import pandas, pyarrow.parquet"``: what any command that reads a
  table pays before doing anything;
- ``confrank evaluate --method imported --format json`` in a fresh process: start-up, reading
  the boxes and the gt, the WiderFace protocol (AP, AP@[.5:.95], AP by attribute), the PR
  table and the JSON;
- the same with ``--plot`` (the PR plot PNG the DAG asks for: matplotlib's import and drawing).

Prints the median wall time of each, the ratios, and whether the evaluate process imported
torch (it must not: ``tests/test_light_commands.py``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "widerface"
CONFRANK = [sys.executable, "-m", "stages.cli"]
BASELINE = [sys.executable, "-c", "import pandas, pyarrow.parquet"]
#: evaluate as the confrank command runs it, then report whether torch was imported
PROBE = ("import sys; from stages.cli import main\n"
         "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
         "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)")


def run(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-2000:]}")
    return seconds, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=SHARED / "submissions" / "thflgg133.tar.gz")
    parser.add_argument("--root", type=Path, default=SHARED, help="WiderFace folder with ground_truth/*.mat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="confrank-bench-") as tmp:
        data, txt = Path(tmp) / "data", Path(tmp) / "txt"
        with tarfile.open(args.archive) as tar:
            tar.extractall(txt, filter="data")
        run([*CONFRANK, "index", "--name", "val", "--root", str(args.root), "--data-dir", str(data)])
        _, imported = run([*CONFRANK, "import", "--dataset", "val", "--detector", "sub", "--txt", str(txt), "--data-dir", str(data)])
        print(imported.stdout.strip())
        evaluate = [sys.executable, "-c", PROBE, "evaluate", "--dataset", "val", "--detector", "sub",
                    "--method", "imported", "--format", "json", "--data-dir", str(data)]
        base, ours, plotted = [], [], []
        for _ in range(args.repeats):
            base.append(run(BASELINE)[0])
            seconds, proc = run(evaluate)
            ours.append(seconds)
            plotted.append(run([*evaluate, "--plot"])[0])
        torch_line = proc.stderr.strip().splitlines()[-1]
    b = statistics.median(base)
    for label, times in (("baseline `import pandas, pyarrow.parquet`", base),
                         ("confrank evaluate, 3226-image submission", ours),
                         ("confrank evaluate --plot (PR plot PNG)", plotted)):
        print(f"{label:42s} {statistics.median(times):.2f} s (median of {args.repeats}; all {', '.join(f'{t:.2f}' for t in times)})")
    print(f"ratio evaluate / baseline: {statistics.median(ours) / b:.1f}x; with --plot {statistics.median(plotted) / b:.1f}x; {torch_line}")


if __name__ == "__main__":
    main()
