"""Pre-emption of `confrank train`, done for real: SIGKILL between two checkpoints and in the
middle of writing a checkpoint; rerunning the same command resumes from the last complete
checkpoint and ends with a model byte-identical (CPU) to an uninterrupted run.

The ranker is the image-free one (``--image-branch none``) on the small synthetic oracle
shards of test_ranker_train.py: 6 steps, a checkpoint every 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.cli import main
from stages.layout import Layout
from tests.support import ROOT, kill_when_reached
from tests.test_ranker_train import make_dataset

ITERATIONS, EVERY = 6, 2


def train_args(data: Path) -> list[str]:
    return ["train", "--datasets", "toy", "--detectors", "detA,detB", "--scales", "original", "--ranker", "r",
            "--image-branch", "none", "--backbone", "mobilenet", "--iterations", str(ITERATIONS),
            "--batch-size", "2", "--num-boxes", "32", "--checkpoint-every", str(EVERY), "--log-every", "1",
            "--workers", "0", "--device", "cpu", "--data-dir", str(data)]


#: the real CLI in a child process with one hook that announces a point of the run on stderr
#: and waits there to be killed
CHILD = r"""
import sys, time
HOOK, AT = sys.argv.pop(1), int(sys.argv.pop(1))

def pause():
    print("confrank-test: reached", HOOK, AT, file=sys.stderr, flush=True)
    time.sleep(300)

if HOOK == "before-step":            # AT - 1 steps done (and checkpointed when due)
    from pipeline.ranker.train import Trainer
    original = Trainer.train_step
    def train_step(self, batch):
        if self.step + 1 == AT:
            pause()
        return original(self, batch)
    Trainer.train_step = train_step
elif HOOK == "checkpoint-write":     # the AT-th checkpoint is half on disk
    import os, torch
    original = torch.save
    count = [0]
    def save(obj, where, *args, **kwargs):
        original(obj, where, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("format") == "confrank-ranker-checkpoint":
            count[0] += 1
            if count[0] == AT:
                if hasattr(where, "write"):
                    where.flush()
                    where.truncate(where.tell() // 2)
                    where.flush()
                else:
                    with open(where, "r+b") as fh:
                        fh.truncate(os.path.getsize(where) // 2)
                pause()
    torch.save = save

from stages.cli import main
main(sys.argv[1:])
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def kill_at(hook: str, at: int, data: Path) -> None:
    kill_when_reached([sys.executable, "-c", CHILD, hook, str(at), *train_args(data)], env(), f"train (hook {hook} {at})")


def train_by_hand(data: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "stages.cli", *train_args(data)], capture_output=True, text=True,
                          env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["trainer"]["step"]


@pytest.fixture
def reference(tmp_path, capsys, one_torch_thread) -> Layout:
    """An uninterrupted run, in this process (one thread, as the children)."""
    layout = Layout(tmp_path / "reference")
    make_dataset(tmp_path / "raw-reference", layout)
    main(train_args(layout.root))
    assert f"{ITERATIONS} steps" in capsys.readouterr().out
    return layout


def assert_same_model(got: Layout, expected: Layout) -> None:
    a, b = (torch.load(x.ranker_model("r"), map_location="cpu", weights_only=True) for x in (got, expected))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    versions = a["extra"].pop("code_version"), b["extra"].pop("code_version")
    assert {k: v for k, v in a.items() if k != "state_dict"} == {k: v for k, v in b.items() if k != "state_dict"}
    if versions[0] == versions[1]:  # differs only when the sources were edited between the two runs
        assert got.ranker_model("r").read_bytes() == expected.ranker_model("r").read_bytes()
    from pipeline.tables import read_table

    cols = ["step", "loss", "lr", "pair_accuracy"]  # samples_per_s is a measured speed
    log_got = read_table(got.ranker_dir("r") / "train_log.parquet", "train_log")[cols]
    log_expected = read_table(expected.ranker_dir("r") / "train_log.parquet", "train_log")[cols]
    assert log_got.equals(log_expected) and log_got["step"].tolist() == list(range(1, ITERATIONS + 1))


@pytest.mark.slow
def test_kill_between_checkpoints_resumes_to_an_identical_model(tmp_path, reference):
    layout = Layout(tmp_path / "killed")
    make_dataset(tmp_path / "raw", layout)
    kill_at("before-step", 4, layout.root)  # steps 1-3 done, checkpoint of step 2 on disk
    ckpt = layout.ranker_dir("r") / "checkpoint.pt"
    assert checkpoint_step(ckpt) == 2
    assert not layout.ranker_model("r").exists() and not (layout.ranker_dir("r") / "train_log.parquet").exists()
    train_by_hand(layout.root)
    assert_same_model(layout, reference)
    assert checkpoint_step(ckpt) == ITERATIONS


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, reference):
    layout = Layout(tmp_path / "killed")
    make_dataset(tmp_path / "raw", layout)
    kill_at("checkpoint-write", 2, layout.root)  # the checkpoint of step 4 is half written
    folder = layout.ranker_dir("r")
    stale = sorted(folder.glob(".checkpoint.pt.*.tmp"))
    assert len(stale) == 1
    assert checkpoint_step(folder / "checkpoint.pt") == 2  # the final name holds the complete older one
    train_by_hand(layout.root)
    assert_same_model(layout, reference)
    assert stale[0].exists() and sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "checkpoint.pt", "loss.png", "model.pt", "train_images.txt", "train_log.parquet"]
