"""The data folder of a fresh clone: data/README.md is tracked and describes stages/layout.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from stages.layout import Layout
from tests.support import ROOT

README = ROOT / "data" / "README.md"


def _every_layout_path(layout: Layout) -> list[Path]:
    """One path of each kind Layout builds (every public method)."""
    return [
        layout.images("D"), layout.gt("D"), layout.detections("D", "DET", "S", 0), layout.latency("D", "DET", "S", 0),
        layout.oracle("D", "DET", "S", 0), layout.reranked("R", "D", "DET", "S", 0), layout.ranker_model("R"),
        layout.final("D", "DET", "S", "M"), layout.metrics("D", "DET", "S", "M"), layout.pr_curves("D", "DET", "S", "M"),
        layout.pr_plot("D", "DET", "S", "M"), layout.report_dir() / "report.html",
    ]


def test_data_readme_names_every_folder_the_layout_writes():
    text = README.read_text()
    for top in ("raw/", "interim/", "processed/"):
        assert f"\n{top}" in text
    layout = Layout(Path("DATA"))
    for path in _every_layout_path(layout):
        top, folder = path.relative_to(layout.root).parts[:2]
        assert f"\n{top}/" in text and f"  {folder}" in text, path


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def test_data_readme_tracked_and_outputs_ignored():
    if shutil.which("git") is None or _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    assert _git("check-ignore", "-q", "data/README.md").returncode == 1  # not ignored
    assert _git("ls-files", "--error-unmatch", "data/README.md").returncode == 0, "data/README.md is not committed"
    layout = Layout(Path("data"))
    outputs = [*_every_layout_path(layout), Path("data/raw/sample/x.jpg"), Path("data/demo/snakemake.log")]
    for path in outputs:
        assert _git("check-ignore", "-q", "--no-index", str(path)).returncode == 0, f"{path} is not ignored"
