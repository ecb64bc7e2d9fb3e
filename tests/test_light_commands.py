"""The light commands run without importing torch (they only read and write tables).

index, import, export, evaluate, inspect and report are run for real, one after another, in
one fresh interpreter on a 2-image embedded dataset; after each, ``sys.modules`` must hold
neither torch nor torchvision (importing them costs seconds per command and per DAG job).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import ROOT, run_cli

LIGHT = ("index", "import", "export", "evaluate", "inspect", "report")

SCRIPT = r"""
import json, sys
from pathlib import Path
from stages.cli import main

data, raw = Path(sys.argv[1]), Path(sys.argv[2])
steps = {
    "index": ["index", "--name", "s", "--root", raw],
    "import": ["import", "--dataset", "s", "--detector", "sub", "--txt", data.parent / "sub"],
    "export": ["export", "--dataset", "s", "--detector", "sub", "--method", "imported", "--txt", data.parent / "out"],
    "evaluate": ["evaluate", "--dataset", "s", "--detector", "sub", "--method", "imported", "--format", "json"],
    "inspect": ["inspect", data / "interim" / "detections"],
    "report": ["report"],
}
heavy = {}
for name, args in steps.items():
    if name == "import":  # a submission of the ground-truth boxes
        import pandas as pd
        from pipeline.submission import format_submission
        gt = pd.read_parquet(data / "interim" / "index" / "s" / "gt.parquet")
        for image_id, boxes in gt.groupby(gt["image_id"].astype(str)):
            path = data.parent / "sub" / f"{image_id}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(format_submission(image_id, boxes.assign(score=1.0)))
    try:
        main([str(a) for a in [*args, "--data-dir", data]] if name != "inspect" else [str(a) for a in args])
    except SystemExit as exc:
        if exc.code:
            raise
    heavy[name] = sorted(m for m in ("torch", "torchvision") if m in sys.modules)
print("HEAVY " + json.dumps(heavy))
"""


def test_light_commands_do_not_import_torch(tmp_path, capsys):
    code, _, err = run_cli(["sample", "--out", tmp_path / "raw", "--images", "2"], capsys)
    assert code == 0, err
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data"), str(tmp_path / "raw")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY "))
    heavy = json.loads(line.removeprefix("HEAVY "))
    assert list(heavy) == list(LIGHT)
    assert heavy == {name: [] for name in LIGHT}, heavy
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))
    assert result["n_detections"] == result["n_faces"] > 0  # the gt itself, as a submission
