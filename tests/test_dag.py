"""The Snakemake DAG: rerun triggers, code-change triggers, the SLURM profile, and a real run.

Every test runs the ``snakemake`` CLI in a subprocess in ``tmp_path`` with the repository's
Snakefile. Rerun triggers are checked on a workflow whose outputs were marked complete with
``--touch`` (snakemake records params and code for them), then re-planned with ``--dry-run``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.provenance import code_hash, module_closure
from pipeline.tables import path_keys, read_metadata
from stages.layout import Layout
from stages.common import ROOT, snakemake_command
from tests.test_table_trees import assert_tree_opens_everywhere

# slow: every test but one runs snakemake (about 7 s a call on the 2-core machine)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dag")]

TRIGGER_CONFIG = {
    "datasets": {"sample": {"source": "sample", "max_images": 2}},
    "rankers": {"small": {"datasets": ["sample"], "detectors": ["mtcnn", "slim"], "scales": "original",
                          "iterations": 10, "backbone": "mobilenet", "image_branch": "none"}},
    "experiments": [
        {"dataset": "sample", "detectors": ["mtcnn"], "scales": ["original"]},
        {"dataset": "sample", "detectors": ["slim"], "scales": ["original"]},
    ],
}


def snakemake(workdir: Path, *args: str, check: bool = True, code: Path = ROOT) -> str:
    """Run snakemake in ``workdir`` with the Snakefile (and the code) under ``code``."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(code)}
    command = snakemake_command(["--configfile", "config.yaml", *args, "--snakefile", str(code / "Snakefile")])
    proc = subprocess.run(command, cwd=workdir,
                          capture_output=True, text=True, env=env, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def planned_jobs(output: str) -> list[dict[str, str]]:
    """(rule, wildcards, reason) of every job a dry-run plans."""
    jobs = []
    for block in re.split(r"\n(?=\[.*\]\n(?:local)?rule )", output):
        match = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if not match:
            continue
        job = {"rule": match.group(1)}
        for key in ("wildcards", "reason", "resources", "threads"):
            found = re.search(rf"^\s+{key}: (.*)$", block, re.M)
            job[key] = found.group(1) if found else ""
        jobs.append(job)
    return jobs


def materialise(workdir: Path, code: Path = ROOT) -> None:
    """Create every output of the plan as an empty file (or folder) and mark the plan done."""
    summary = snakemake(workdir, "--summary", code=code)
    for line in summary.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0] == "output_file":
            continue
        path = workdir / fields[0]
        if not path.suffix:  # folder outputs (oracle, rerank, sample, figures) have no suffix
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    snakemake(workdir, "--touch", "--cores", "1", code=code)
    assert planned_jobs(snakemake(workdir, "-n", code=code)) == []


def copy_code(dest: Path) -> Path:
    """A copy of the Snakefile, rules, envs, config, profiles and the .py files of pipeline/ and stages/."""
    dest.mkdir(parents=True)
    for item in ("Snakefile", "rules", "envs", "config", "profiles"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / item)
    for package in ("pipeline", "stages"):
        for src in (ROOT / package).rglob("*.py"):
            target = dest / src.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, target)
    return dest


@pytest.fixture(scope="module")
def completed(tmp_path_factory) -> Path:
    """A completed plan of TRIGGER_CONFIG (work/) made with a frozen copy of the code (code/)."""
    base = tmp_path_factory.mktemp("completed")
    code = copy_code(base / "code")
    work = base / "work"
    work.mkdir()
    write_config(work, TRIGGER_CONFIG)
    materialise(work, code)
    return base


@pytest.fixture
def touched(completed: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(workdir, code): a private copy of ``completed`` (mtimes and snakemake metadata kept)."""
    shutil.copytree(completed, tmp_path / "copy", symlinks=True)
    return tmp_path / "copy" / "work", tmp_path / "copy" / "code"


def test_ranker_setting_reruns_train_and_downstream_never_detect(touched):
    touched, code = touched
    config = yaml.safe_load((touched / "config.yaml").read_text())
    config["rankers"]["small"]["n_pairs"] = 5
    write_config(touched, config)
    jobs = planned_jobs(snakemake(touched, "-n", code=code))
    rules = sorted({j["rule"] for j in jobs})
    assert rules == ["all", "evaluate", "nms", "report", "rerank", "train"]
    (train,) = [j for j in jobs if j["rule"] == "train"]
    assert "Params have changed" in train["reason"]
    evaluated = sorted(j["wildcards"] for j in jobs if j["rule"] == "evaluate")
    assert evaluated == [f"dataset=sample, detector={d}, scales=original, method=rank-small" for d in ("mtcnn", "slim")]


def test_scale_set_change_reruns_only_that_detectors_branch(touched):
    touched, code = touched
    config = yaml.safe_load((touched / "config.yaml").read_text())
    config["experiments"][1]["scales"] = ["8k"]
    write_config(touched, config)
    jobs = planned_jobs(snakemake(touched, "-n", code=code))
    branch = [j for j in jobs if j["rule"] not in ("all", "report")]
    assert {j["rule"] for j in branch} == {"detect", "oracle", "rerank", "nms", "evaluate"}
    for job in branch:
        assert "detector=slim" in job["wildcards"] and "scales=8k" in job["wildcards"], job
    assert "train" not in {j["rule"] for j in jobs}


def test_stage_code_change_reruns_its_rule_only(touched):
    work, code = touched
    nms = code / "stages" / "nms.py"
    nms.write_text((nms.read_text() if nms.is_file() else "") + "\n# a change to the NMS stage\n")
    jobs = planned_jobs(snakemake(work, "-n", code=code))
    rules = {j["rule"] for j in jobs}
    assert rules == {"nms", "evaluate", "report", "all"}
    assert all("Params have changed" in j["reason"] for j in jobs if j["rule"] == "nms")


def test_module_closure_follows_imports_and_registry_strings(tmp_path: Path):
    pkg = tmp_path / "pipeline"
    (tmp_path / "stages").mkdir()
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (tmp_path / "stages" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pipeline import b\nFACTORY = 'pipeline.c:build'\n")
    (pkg / "b.py").write_text("import numpy\n")
    (pkg / "c.py").write_text("def build():\n    from .d import x\n")
    (pkg / "d.py").write_text("x = 1\n")
    (pkg / "unused.py").write_text("")
    (tmp_path / "stages" / "s.py").write_text("import pipeline.a\n")
    names = [p.relative_to(tmp_path).as_posix() for p in module_closure("stages.s", tmp_path)]
    assert names == ["pipeline/__init__.py", "pipeline/a.py", "pipeline/b.py", "pipeline/c.py",
                     "pipeline/d.py", "stages/__init__.py", "stages/s.py"]
    first = code_hash("stages.s", root=tmp_path)
    (pkg / "unused.py").write_text("y = 2\n")
    assert code_hash.__wrapped__("stages.s", root=tmp_path) == first
    (pkg / "d.py").write_text("x = 2\n")
    assert code_hash.__wrapped__("stages.s", root=tmp_path) != first


def test_slurm_profile_plans_gpu_and_cpu_jobs(tmp_path: Path):
    write_config(tmp_path, TRIGGER_CONFIG)
    # the profile names the plugin's executor (a dev dependency), so this also loads the plugin
    out = snakemake(tmp_path, "--profile", str(ROOT / "profiles" / "slurm"), "--workflow-profile", "none",
                    "--executor", "slurm", "-n", "--cores", "64")
    jobs = {j["rule"]: j for j in planned_jobs(out)}
    detect = jobs["detect"]
    assert "gpu=1" in detect["resources"] and "slurm_partition=gpu" in detect["resources"]
    assert "runtime=240" in detect["resources"] and detect["threads"] == "8"
    assert "gpu=1" in jobs["train"]["resources"]
    for cpu_rule in ("oracle", "nms", "evaluate"):
        assert "slurm_partition=cpu" in jobs[cpu_rule]["resources"] and "gpu" not in jobs[cpu_rule]["resources"]
        assert jobs[cpu_rule]["threads"] == "8"


def test_cv_config_plans_features_cv_and_summary(tmp_path: Path):
    config = yaml.safe_load((ROOT / "config" / "cv.yaml").read_text())
    write_config(tmp_path, config)
    out = snakemake(tmp_path, "-n", "-p", "cv_all")
    jobs = planned_jobs(out)
    rules = ("features", "image_features", "cv", "cv_summary", "detect", "train")
    counts = {rule: sum(j["rule"] == rule for j in jobs) for rule in rules}
    # 4 pool datasets x 3 detectors, one job per variant, no train job (cv trains its own folds);
    # image evidence for the single-detector experiment, whose rankers read the image group
    variants = sum(len(cv["variants"]) for cv in config["cv"].values())
    assert counts == {"features": 12, "image_features": 12, "cv": variants, "cv_summary": len(config["cv"]),
                      "detect": 12, "train": 0}
    commands = [line for line in out.splitlines() if "confrank cv run" in line]
    cpu = next(c for c in commands if "--variant cpu " in c)
    assert "--preset cpu" in cpu and "--evidence retinaface-mnet025,slim,rfb" in cpu and "--folds 5" in cpu
    lodo = next(c for c in commands if "--variant cpu-without-slim " in c)
    assert "--detectors slim " in lodo and "--train-detectors retinaface-mnet025,rfb" in lodo
    network = next(c for c in commands if "--variant paper-mobilenet " in c)
    assert "--preset paper" in network and "--evidence" not in network
    single = next(c for c in commands if "--name single --variant cpu-single " in c)
    assert "--preset cpu-single" in single and "--evidence" not in single and "--folds 5" in single
    box_only = next(c for c in commands if "--variant box-only " in c)
    assert "--gbm-features own,neighbours" in box_only


def test_image_evidence_ranker_plans_image_features_before_train_and_rerank(tmp_path: Path):
    rankers = {"single": {"datasets": ["sample"], "detectors": ["slim"], "scales": "original", "preset": "cpu-single"},
               "boxes": {"datasets": ["sample"], "detectors": ["slim"], "scales": "original", "preset": "cpu-single",
                         "gbm_features": ["own", "neighbours"]}}
    write_config(tmp_path, {"datasets": {"sample": {"source": "sample", "max_images": 2}}, "rankers": rankers,
                            "experiments": [{"dataset": "sample", "detectors": ["slim"], "scales": ["original"],
                                             "methods": ["rank"], "rankers": list(rankers)}]})
    out = snakemake(tmp_path, "-n", "--forceall")
    jobs = planned_jobs(out)
    assert [j["wildcards"] for j in jobs if j["rule"] == "image_features"] == [
        "dataset=sample, detector=slim, scales=original"]
    # the ranker that reads the image group trains and re-scores on the image features; the other does not
    evidence = str(Layout(Path("data")).image_features_dir("sample", "slim", "original"))
    inputs = {}
    for block in re.split(r"\n(?=\[.*\]\n(?:local)?rule )", out):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        wildcards = re.search(r"^\s+wildcards: .*ranker=(\w+)", block, re.M)
        if rule and wildcards and rule.group(1) in ("train", "rerank"):
            inputs[(rule.group(1), wildcards.group(1))] = re.search(r"^\s+input: (.*)$", block, re.M).group(1).split(", ")
    for name in rankers:
        for rule in ("train", "rerank"):
            assert (evidence in inputs[(rule, name)]) == (name == "single"), (rule, name)


def test_table4_config_plans_8k_and_8k_multi_with_single_detector_rankers(tmp_path: Path):
    config = yaml.safe_load((ROOT / "config" / "table4.yaml").read_text())
    write_config(tmp_path, config)
    out = snakemake(tmp_path, "-n", "-p", "cv_all", "evaluate_all")
    jobs = planned_jobs(out)
    wildcards = [dict(kv.split("=", 1) for kv in j["wildcards"].split(", ")) for j in jobs if j["rule"] == "detect"]
    detect = sorted((w["dataset"], w["detector"], w["scales"]) for w in wildcards)
    # every detector at original on the four datasets (the ranker trains on three of them), 8k and
    # 8k-multi on widerface-val34 only
    assert len(detect) == 4 * 3 + 3 + 3
    assert {d for d, _, s in detect if s != "original"} == {"widerface-val34"}
    commands = [line for line in out.splitlines() if "confrank " in line]
    cv = [c for c in commands if "confrank cv run" in c]
    assert len(cv) == 1 and "--folds 2" in cv[0] and "--preset cpu-single" in cv[0]
    assert "--scales 8k " in cv[0] and "--pool widerface-val34 " in cv[0]
    # rank: trained at original on the other datasets (never on widerface-val34), applied at 8K
    train = [c for c in commands if "confrank train" in c]
    assert len(train) == 1 and "--datasets widerface416,widerface416-extra,widerface-orig21 " in train[0]
    assert "--scales original" in train[0] and "--preset cpu-single" in train[0]
    reranks = sorted(j["wildcards"] for j in jobs if j["rule"] == "rerank")
    assert sum("scales=8k," in w or w.endswith("scales=8k") for w in reranks) == 3
    assert sum("scales=8k-multi" in w for w in reranks) == 3
    # the image evidence of every ranker's boxes, with the config's network and input size
    evidence = [c for c in commands if "confrank image-features" in c]
    assert evidence and all("--evidence-net retinaface-mnet025 --max-side 1024" in c for c in evidence)
    config["image_evidence"] = {"max_side": 512}
    write_config(tmp_path, config)
    out = snakemake(tmp_path, "-n", "-p", "cv_all", "evaluate_all")
    evidence = [line for line in out.splitlines() if "confrank image-features" in line]
    assert evidence and all("--evidence-net retinaface-mnet025 --max-side 512" in c for c in evidence)


FUSION_CONFIG = {
    "datasets": {"sample": {"source": "sample", "max_images": 2, "shards": 2}},
    "fusions": {"mtcnn+slim": {"detectors": ["mtcnn", "slim"]}},
    "experiments": [{"dataset": "sample", "detectors": ["mtcnn"], "scales": ["original"], "methods": ["single", "wbf"]}],
}


def test_wbf_fusion_plans_fuse_and_evaluate_and_reruns_on_its_settings(tmp_path: Path):
    code, work = copy_code(tmp_path / "code"), tmp_path / "work"  # frozen code: its hashes cannot move
    work.mkdir()
    write_config(work, FUSION_CONFIG)
    out = snakemake(work, "-n", "-p", code=code)
    jobs = planned_jobs(out)
    (fuse,) = [j for j in jobs if j["rule"] == "fuse"]
    assert fuse["wildcards"] == "dataset=sample, fusion=mtcnn+slim, scales=original, method=wbf"
    evaluated = sorted(j["wildcards"] for j in jobs if j["rule"] == "evaluate")
    assert evaluated == ["dataset=sample, detector=mtcnn+slim, scales=original, method=wbf",
                         "dataset=sample, detector=mtcnn, scales=original, method=single"]
    # both detectors are detected (slim only for the fusion), every shard; no nms of slim
    detect = sorted(j["wildcards"] for j in jobs if j["rule"] == "detect")
    assert len(detect) == 4 and sum("detector=slim" in w for w in detect) == 2
    assert [j["wildcards"] for j in jobs if j["rule"] == "nms"] == ["dataset=sample, detector=mtcnn, scales=original, method=single"]
    (command,) = [line for line in out.splitlines() if "confrank fuse" in line]
    assert "--name mtcnn+slim " in command and "--detectors mtcnn,slim " in command and "--method wbf " in command
    assert "--iou 0.4 --keep 750 --wbf-iou 0.55 --skip-box-thr 0.02 --conf-type avg" in command
    # a fusion setting reruns fuse and what reads it, nothing upstream
    materialise(work, code)
    config = copy.deepcopy(FUSION_CONFIG)
    config["fusions"]["mtcnn+slim"]["iou_thr"] = 0.6
    write_config(work, config)
    jobs = planned_jobs(snakemake(work, "-n", code=code))
    assert sorted(j["rule"] for j in jobs) == ["all", "evaluate", "fuse", "report"]
    assert "Params have changed" in next(j for j in jobs if j["rule"] == "fuse")["reason"]


def assert_by_hand_detect_skips(data: Path) -> None:
    """The shards snakemake wrote are up to date for the same command run by hand, from
    another folder and without the rule name: both use the same code hash (the rule's
    ``code`` param) and the same up-to-date keys."""
    from stages.common import pick_device
    from stages.detect import run_detect

    shards = sorted((data / "interim" / "detections").rglob("part-*.parquet"))
    assert shards
    for path in shards:
        keys, meta = path_keys(path), read_metadata(path)
        assert meta["code"] == code_hash("stages.detect") and meta["rule"] == "detect"
        shard = (meta["config"]["shard"], meta["config"]["n_shards"])
        _, computed = run_detect(keys["dataset"], keys["detector"], keys["scales"], shard, Layout(data),
                                 pick_device(None), workers=0)
        assert not computed, path


@pytest.mark.slow
def test_tiny_dag_end_to_end(tmp_path: Path):
    shutil.copy(ROOT / "config" / "test.yaml", tmp_path / "config.yaml")
    out = snakemake(tmp_path, "--cores", "2", check=False)
    logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((tmp_path / "logs").rglob("*.log")))
    assert "steps (100%) done" in out, out[-4000:] + logs
    report = tmp_path / "data" / "processed" / "report"
    html = (report / "report.html").read_text()
    assert "mtcnn" in html and "rank-small" in html and "keep_singletons" in html
    assert "single" in (report / "report.md").read_text()
    voted = json.loads((tmp_path / "data" / "processed" / "metrics" / "sample1" / "mtcnn" / "wider-multi" / "multi.json").read_text())
    assert voted["postprocess"]["fusion"] == "voting" and voted["n_images"] == 1 and voted["n_detections"] > 0
    assert planned_jobs(snakemake(tmp_path, "-n")) == []
    assert_by_hand_detect_skips(tmp_path / "data")
    for table, kind in (("detections", "detections"), ("latency", "latency"), ("oracle", "detections"),
                        ("reranked", "detections")):
        assert_tree_opens_everywhere(tmp_path / "data" / "interim" / table, kind, "detector")
    # a changed ranker setting really reruns: train replaces its finished run's checkpoint,
    # and nothing upstream of train runs again
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["rankers"]["small"]["iterations"] += 1
    write_config(tmp_path, config)
    out = snakemake(tmp_path, "--cores", "2", check=False)
    assert "steps (100%) done" in out, out[-4000:]
    ran = {job["rule"] for job in planned_jobs(out)}
    assert {"train", "rerank", "nms", "report"} <= ran and not ran & {"sample", "index", "subset", "detect", "oracle"}
    log = pd.read_parquet(tmp_path / "data" / "processed" / "rankers" / "small" / "train_log.parquet")
    assert log.step.max() == config["rankers"]["small"]["iterations"]


def test_learned_fusion_plans_features_train_fuse_and_evaluate(tmp_path: Path):
    config = copy.deepcopy(FUSION_CONFIG)
    config["evidence"] = ["mtcnn", "slim"]
    config["rankers"] = {"f": {"datasets": ["sample"], "detectors": ["mtcnn", "slim"], "scales": "original",
                               "preset": "fuse", "evidence": ["mtcnn", "slim"], "gbm_trees": 5}}
    config["experiments"][0].update(methods=["single", "wbf", "rank"], rankers=["f"])
    write_config(tmp_path, config)
    out = snakemake(tmp_path, "-n", "-p")
    jobs = planned_jobs(out)
    fuses = sorted(j["wildcards"] for j in jobs if j["rule"] == "fuse")
    assert fuses == ["dataset=sample, fusion=mtcnn+slim, scales=original, method=rank-f",
                     "dataset=sample, fusion=mtcnn+slim, scales=original, method=wbf"]
    assert sorted(j["wildcards"] for j in jobs if j["rule"] == "features") == [
        "dataset=sample, detector=mtcnn, scales=original", "dataset=sample, detector=slim, scales=original"]
    assert [j["rule"] for j in jobs].count("train") == 1 and "rerank" not in [j["rule"] for j in jobs]
    (command,) = [line for line in out.splitlines() if "confrank fuse" in line and "rank-f" in line]
    assert "--detectors mtcnn,slim " in command and "--keep 750" in command
