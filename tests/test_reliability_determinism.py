"""Determinism: the whole chain run twice on CPU, in two data folders, gives byte-identical
files, except the two tables that hold measured wall times (documented in the README, "Failure behaviour"):
the latency side table of detect (``latency_ms``) and the train log (``samples_per_s``),
whose other columns must still be equal.

index -> detect (2 shards) -> oracle -> nms single/oracle -> train (box-only ranker) ->
rerank -> nms rank -> evaluate, on 6 real widerface416 images with the slim detector.
A second test runs oracle -> nms -> rerank (box-only and image-branch rankers) -> nms rank ->
evaluate in two separate interpreters with different hash seeds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.cli import main
from pipeline.tables import read_table
from tests.support import ROOT, need_shared
from tests.test_reliability_inputs import copy_widerface

#: files holding measured times, and the columns that are measured
MEASURED = {"latency": "latency_ms", "train_log.parquet": "samples_per_s"}
#: keys of the training checkpoint (its copy of the log and the running sums) that are measured
MEASURED_KEYS = {"samples_per_s", "seconds"}


def run(args: list, capsys) -> str:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        pytest.fail(f"confrank {args[0]} exited {exc.code}: {capsys.readouterr().err}")
    return capsys.readouterr().out


def whole_chain(root: Path, data: Path, capsys) -> dict[str, bytes]:
    common = ["--data-dir", data]
    sel = ["--dataset", "x", "--detector", "slim", "--scales", "original"]
    run(["index", "--name", "x", "--root", root, *common], capsys)
    for k in range(2):
        run(["detect", *sel, "--shard", f"{k}/2", "--device", "cpu", "--workers", "0", *common], capsys)
    run(["oracle", *sel, *common], capsys)
    for method in ("single", "oracle"):
        run(["nms", *sel, "--method", method, *common], capsys)
    run(["train", "--datasets", "x", "--detectors", "slim", "--scales", "original", "--ranker", "r",
         "--image-branch", "none", "--backbone", "mobilenet", "--iterations", "3", "--batch-size", "2",
         "--num-boxes", "64", "--checkpoint-every", "2", "--log-every", "1", "--workers", "0", "--device", "cpu",
         *common], capsys)
    run(["rerank", *sel, "--ranker", "r", "--device", "cpu", *common], capsys)
    run(["nms", *sel, "--method", "rank", "--ranker", "r", *common], capsys)
    for method in ("single", "oracle", "rank-r"):
        run(["evaluate", "--dataset", "x", "--detector", "slim", "--scales", "original", "--method", method,
             "--format", "json", *common], capsys)
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}


def same_except_measured(a, b) -> bool:
    """Equal nested checkpoint contents (tensors exactly), ignoring MEASURED_KEYS."""
    if isinstance(a, dict):
        keys = set(a) - MEASURED_KEYS
        return keys == set(b) - MEASURED_KEYS and all(same_except_measured(a[k], b[k]) for k in keys)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_except_measured(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def measured_column(rel: str) -> str | None:
    return next((col for key, col in MEASURED.items() if key in rel.split("/")[-1] or rel.startswith(f"interim/{key}/")),
                None)


def test_same_inputs_give_byte_identical_outputs(tmp_path, capsys, weights_dir, monkeypatch, one_torch_thread):
    monkeypatch.setenv("CONFRANK_WEIGHTS", str(weights_dir))
    need_shared("widerface416")
    root, _ = copy_widerface(tmp_path / "ds", n=6)
    a = whole_chain(root, tmp_path / "a", capsys)
    b = whole_chain(root, tmp_path / "b", capsys)
    assert sorted(a) == sorted(b)
    kinds = {rel.split("/")[1] if rel.startswith("interim/") else rel.rsplit(".", 1)[-1] for rel in a}
    assert {"index", "detections", "latency", "oracle", "reranked", "parquet", "json", "pt", "png"} <= kinds
    differ = sorted(rel for rel in a if a[rel] != b[rel])
    checkpoint = "processed/rankers/r/checkpoint.pt"
    if checkpoint in differ:  # the resume file carries the log, with its measured speeds
        differ.remove(checkpoint)
        loaded = [torch.load(tmp_path / x / checkpoint, map_location="cpu", weights_only=True) for x in "ab"]
        assert same_except_measured(*loaded)
    assert all(measured_column(rel) for rel in differ), f"not byte-identical: {differ}"
    for rel in differ:  # only the measured column may differ
        column = measured_column(rel)
        kind = "latency" if column == "latency_ms" else "train_log"
        left = read_table(tmp_path / "a" / rel, kind).drop(columns=column)
        right = read_table(tmp_path / "b" / rel, kind).drop(columns=column)
        assert left.equals(right), rel


#: ``python -c`` program: run ``confrank`` once per argument list of the JSON in argv[1]
CHAIN = "import json, sys\nfrom stages.cli import main\nfor args in json.loads(sys.argv[1]):\n    main(args)\n"


@pytest.mark.slow
def test_oracle_nms_rerank_evaluate_are_identical_across_processes(tmp_path, capsys, weights_dir, monkeypatch,
                                                                     one_torch_thread):
    """The CPU stages after detect, each chain in its own interpreter (another hash seed):
    oracle, nms single/oracle, rerank with a box-only and an image-branch (FPN) ranker, nms
    rank, evaluate. Detections and rankers are made once, in this process, and copied."""
    monkeypatch.setenv("CONFRANK_WEIGHTS", str(weights_dir))
    root, _ = copy_widerface(tmp_path / "ds", n=4)
    data = tmp_path / "made" / "data"
    sel = ["--dataset", "x", "--detector", "slim", "--scales", "original"]
    run(["index", "--name", "x", "--root", root, "--data-dir", data], capsys)
    for k in range(2):
        run(["detect", *sel, "--shard", f"{k}/2", "--device", "cpu", "--workers", "0", "--data-dir", data], capsys)
    run(["oracle", *sel, "--data-dir", data], capsys)
    rankers = {"box": ["--image-branch", "none"], "img": ["--image-branch", "fpn", "--image-size", "64", "--no-pretrained"]}
    for name, branch in rankers.items():
        run(["train", "--datasets", "x", "--detectors", "slim", "--scales", "original", "--ranker", name, *branch,
             "--backbone", "mobilenet", "--iterations", "2", "--batch-size", "2", "--num-boxes", "64", "--workers", "0",
             "--device", "cpu", "--data-dir", data], capsys)
    shutil.rmtree(data / "interim" / "oracle")  # recomputed in each chain
    chain = [["oracle", *sel], *[["nms", *sel, "--method", m] for m in ("single", "oracle")]]
    for name in rankers:
        chain += [["rerank", *sel, "--ranker", name, "--device", "cpu"], ["nms", *sel, "--method", "rank", "--ranker", name]]
    chain += [["evaluate", *sel, "--method", m, "--format", "json", "--plot"] for m in ("single", "oracle", "rank-box", "rank-img")]
    chain = [[*args, "--data-dir", "data"] for args in chain]
    procs = []
    for folder, seed in (("a", "1"), ("b", "2")):
        shutil.copytree(tmp_path / "made", tmp_path / folder)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", CHAIN, json.dumps(chain)], cwd=tmp_path / folder, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    files = {x: {p.relative_to(tmp_path / x): p.read_bytes() for p in sorted((tmp_path / x).rglob("*")) if p.is_file()}
             for x in "ab"}
    assert files["a"].keys() == files["b"].keys()
    made = {p.relative_to(tmp_path / "made") for p in (tmp_path / "made").rglob("*") if p.is_file()}
    computed = sorted(str(rel) for rel in files["a"].keys() - made)
    for part in ("interim/oracle/", "interim/reranked/ranker=box/", "interim/reranked/ranker=img/", "/single.parquet",
                 "/oracle.parquet", "/rank-box.parquet", "/rank-img.json", "/rank-img.png"):
        assert any(part in rel for rel in computed), (part, computed)
    assert [rel for rel in computed if files["a"][Path(rel)] != files["b"][Path(rel)]] == []
