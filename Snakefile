"""confrank: the whole experiment as one DAG (see the README, "Running the whole experiment").

Only wiring lives here: every rule shells the `confrank` command of its stage, every path
comes from stages.layout.Layout, and what to compute comes from pipeline.config.expand.

Targets: all (default: the report and every configured table), detect, train, evaluate, report.
"""

import json
import re
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

from pipeline.config import (SCALE_SETS, cv_detectors, cv_jobs, detection_sets, expand as expand_results, feature_sets,
                             is_gbm, ranker_args, resolve_ranker, used_rankers, validate_config)
from pipeline.detectors.registry import DETECTORS
from pipeline.provenance import code_hash
from pipeline.shards import config_hash
from stages.layout import Layout
from stages.run import SCHEMA, load_schema


configfile: str(Path(workflow.basedir) / "config" / "config.yaml")


# readable messages first (names, references), then snakemake's own schema check
validate_config(config, load_schema(), source="config")
validate(config, str(SCHEMA))

L = Layout.from_env(config["data_dir"])
DATASETS = config["datasets"]
RANKERS = config["rankers"]
CV = config["cv"]
EVIDENCE = ",".join(config["evidence"])
POST = config["postprocess"]
RESULTS = expand_results(config)
CONFIG_HASH = config_hash(config)

_exe = Path(sys.executable).with_name("confrank")
PYTHON = shlex.quote(sys.executable)
CONFRANK = shlex.quote(str(_exe)) if _exe.is_file() else f"{PYTHON} -m pipeline.cli"

# every shell command: the rule name goes into the outputs' provenance (pipeline.shards);
# the config hash is not exported: it would make every job rerun on any config change
ENV = (
    "export CONFRANK_RULE={rule}"
    + " CONFRANK_DATA_DIR=" + shlex.quote(str(L.root))
    + "; "
)
# only detect reads weights; a `weights` param reruns it when the folder changes
WEIGHTS_ENV = "" if config["weights_dir"] is None else "CONFRANK_WEIGHTS=" + shlex.quote(config["weights_dir"]) + " "
DEVICE = "" if config["device"] == "auto" else f"--device {config['device']}"
DASK = "" if config["dask_scheduler"] is None else f"--dask-scheduler {shlex.quote(config['dask_scheduler'])}"


def _alt(names):
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


wildcard_constraints:
    dataset=_alt(DATASETS),
    detector=_alt(DETECTORS),
    scales=_alt(SCALE_SETS),
    ranker=_alt(RANKERS) if RANKERS else "(?!)",
    cv=_alt(CV) if CV else "(?!)",
    variant=r"[^/]+",
    shard=r"\d+",


# ------------------------------------------------------------------------------ helpers


def T(method, *args):
    """A Layout path with snakemake wildcards, e.g. T("final", "{dataset}", ...)."""
    return str(getattr(L, method)(*args))


def detection_shards(ds, det, sset):
    return [T("detections", ds, det, sset, k) for k in range(DATASETS[ds]["shards"])]


def metrics_files(results):
    return [T("metrics", *r) for r in results]


def flag(name, value):
    """A command-line option string, empty when ``value`` is None."""
    return "" if value is None else f"--{name} {shlex.quote(str(value))}"


# ------------------------------------------------------------------------------ targets


rule all:
    input:
        metrics_files(RESULTS),
        [T("cv_summary", name) for name in CV],
        T("report_dir") + "/report.html",


rule cv_all:
    input:
        [T("cv_summary", name) for name in CV],


rule detect:
    input:
        [p for s in detection_sets(config) for p in detection_shards(*s)],


rule train:
    input:
        [T("ranker_model", r) for r in used_rankers(config)],


rule evaluate:
    input:
        metrics_files(RESULTS),


# ------------------------------------------------------------------------------ stages


rule sample:
    output:
        directory(str(L.root / "raw" / "{dataset}")),
    params:
        images=lambda wc: flag("images", DATASETS[wc.dataset]["max_images"]),
        code=code_hash("stages.sample"),
    log:
        "logs/sample/{dataset}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        ENV + "{CONFRANK} sample --out {output} {params.images} > {log} 2>&1"


def index_input(wc):
    ds = DATASETS[wc.dataset]
    if ds["source"] == "sample":
        return [str(L.root / "raw" / wc.dataset)]
    if ds["source"] == "subset":
        return [T("images", ds["subset_of"]), T("gt", ds["subset_of"])]
    return []


def index_command(wc):
    ds = DATASETS[wc.dataset]
    if ds["source"] == "subset":
        return " ".join([
            f"{CONFRANK} subset --parent {ds['subset_of']} --name {wc.dataset}",
            flag("half", ds.get("half")), flag("max-images", ds.get("max_images")),
        ])
    root = L.root / "raw" / wc.dataset if ds["source"] == "sample" else ds["root"]
    return " ".join([
        f"{CONFRANK} index --name {wc.dataset}", flag("root", root), flag("format", ds["format"]),
        flag("split", ds["split"]),
    ])


rule index:
    input:
        index_input,
    output:
        images=T("images", "{dataset}"),
        gt=T("gt", "{dataset}"),
    params:
        command=index_command,
        code=lambda wc: code_hash("stages.subset" if DATASETS[wc.dataset]["source"] == "subset" else "stages.index"),
    log:
        "logs/index/{dataset}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        ENV + "{params.command} > {log} 2>&1"


rule detect_shard:
    input:
        images=T("images", "{dataset}"),
    output:
        detections=T("detections", "{dataset}", "{detector}", "{scales}", "{shard}"),
        latency=T("latency", "{dataset}", "{detector}", "{scales}", "{shard}"),
    params:
        shards=lambda wc: DATASETS[wc.dataset]["shards"],
        batch=lambda wc: flag("batch-size", config["detect"]["batch_size"].get(wc.scales)),
        weights=config["weights_dir"],
        code=code_hash("stages.detect"),
    log:
        "logs/detect/{dataset}/{detector}/{scales}/part-{shard}.log",
    threads: 2
    resources:
        gpu=1,
        # an 8K frame's activations take GBs on a CPU: with --resources mem_mb=... (the demo
        # sets it) snakemake runs no more 8K shards at once than memory allows
        mem_mb=lambda wc: 12000 if wc.scales.startswith("8k") else 4000,
        runtime=120,
    shell:
        ENV + WEIGHTS_ENV + "{CONFRANK} detect --dataset {wildcards.dataset} --detector {wildcards.detector}"
        " --scales {wildcards.scales} --shard {wildcards.shard}/{params.shards} {params.batch} {DEVICE} > {log} 2>&1"


rule oracle:
    input:
        detections=lambda wc: detection_shards(wc.dataset, wc.detector, wc.scales),
        gt=T("gt", "{dataset}"),
    output:
        directory(T("oracle_dir", "{dataset}", "{detector}", "{scales}")),
    params:
        dask=DASK,
        code=code_hash("stages.oracle"),
    log:
        "logs/oracle/{dataset}/{detector}/{scales}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        ENV + "{CONFRANK} oracle --dataset {wildcards.dataset} --detector {wildcards.detector}"
        " --scales {wildcards.scales} {params.dask} > {log} 2>&1"


def evidence_dirs(ds, det, sset):
    """Oracle shards of the other evidence detectors: what a features job reads besides its own."""
    return [T("oracle_dir", ds, e, sset) for e in config["evidence"] if e != det]


rule features:
    input:
        own=T("oracle_dir", "{dataset}", "{detector}", "{scales}"),
        evidence=lambda wc: evidence_dirs(wc.dataset, wc.detector, wc.scales),
        images=T("images", "{dataset}"),
    output:
        directory(T("features_dir", "{dataset}", "{detector}", "{scales}")),
    params:
        evidence=EVIDENCE,
        code=code_hash("stages.features"),
    log:
        "logs/features/{dataset}/{detector}/{scales}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        ENV + "{CONFRANK} features --dataset {wildcards.dataset} --detector {wildcards.detector}"
        " --scales {wildcards.scales} --evidence {params.evidence} > {log} 2>&1"


def ranker_data(r):
    """The Layout folder kind a ranker (or cv variant) trains on: features for a feature ranker."""
    return "features_dir" if is_gbm(r) else "oracle_dir"


def train_input(wc):
    r = RANKERS[wc.ranker]
    kind = ranker_data(r)
    return [T(kind, ds, det, r["scales"]) for ds in r["datasets"] for det in r["detectors"]]


def train_args(wc):
    r = RANKERS[wc.ranker]
    fixed = [flag("datasets", ",".join(r["datasets"])), flag("detectors", ",".join(r["detectors"])),
             flag("scales", r["scales"])]
    return " ".join(fixed + settings_flags(r))


def settings_flags(r):
    flags = []
    for key, value in ranker_args(r).items():
        if key == "evidence":  # the one evidence set of the features shards, below
            continue
        if isinstance(value, bool):
            flags.append(f"--{key.replace('_', '-')}" if value else f"--no-{key.replace('_', '-')}")
        else:
            flags.append(flag(key.replace("_", "-"), ",".join(value) if isinstance(value, list) else value))
    if is_gbm(r):
        flags.append(flag("evidence", EVIDENCE))
    return flags


rule train_ranker:
    input:
        train_input,
    output:
        model=T("ranker_model", "{ranker}"),
        log=T("ranker_dir", "{ranker}") + "/train_log.parquet",
    params:
        args=train_args,
        settings=lambda wc: json.dumps(resolve_ranker(RANKERS[wc.ranker]), sort_keys=True),
        code=code_hash("stages.train"),
    log:
        "logs/train/{ranker}.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=1440,
    shell:
        ENV + "{CONFRANK} train --ranker {wildcards.ranker} {params.args} {DEVICE} > {log} 2>&1"


rule rerank:
    input:
        model=T("ranker_model", "{ranker}"),
        oracle=T("oracle_dir", "{dataset}", "{detector}", "{scales}"),
        features=lambda wc: [T("features_dir", wc.dataset, wc.detector, wc.scales)] if is_gbm(RANKERS[wc.ranker]) else [],
        detections=lambda wc: detection_shards(wc.dataset, wc.detector, wc.scales),
    output:
        directory(T("reranked_dir", "{ranker}", "{dataset}", "{detector}", "{scales}")),
    params:
        code=code_hash("stages.rerank"),
    log:
        "logs/rerank/{ranker}/{dataset}/{detector}/{scales}.log",
    benchmark:
        str(L.root / "processed" / "benchmarks" / "rerank" / "{ranker}" / "{dataset}" / "{detector}" / "{scales}.tsv")
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    shell:
        ENV + "{CONFRANK} rerank --dataset {wildcards.dataset} --detector {wildcards.detector}"
        " --scales {wildcards.scales} --ranker {wildcards.ranker} {DEVICE} > {log} 2>&1"


NMS_ARGS = " ".join([
    flag("iou", POST["iou"]), flag("keep", POST["keep"]),
    "--keep-singletons" if POST["keep_singletons"] else "--drop-singletons",
])


def nms_input(wc):
    if wc.method == "ensemble":
        return [T("features_dir", wc.dataset, wc.detector, wc.scales)]
    if wc.method == "oracle":
        return [T("oracle_dir", wc.dataset, wc.detector, wc.scales)]
    return detection_shards(wc.dataset, wc.detector, wc.scales)


rule nms:
    input:
        nms_input,
    output:
        T("final", "{dataset}", "{detector}", "{scales}", "{method}"),
    wildcard_constraints:
        method="single|multi|oracle|ensemble",
    params:
        args=NMS_ARGS,
        dask=DASK,
        code=code_hash("stages.nms"),
    log:
        "logs/nms/{dataset}/{detector}/{scales}/{method}.log",
    benchmark:
        str(L.root / "processed" / "benchmarks" / "nms" / "{dataset}" / "{detector}" / "{scales}" / "{method}.tsv")
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        ENV + "{CONFRANK} nms --dataset {wildcards.dataset} --detector {wildcards.detector}"
        " --scales {wildcards.scales} --method {wildcards.method} {params.args} {params.dask} > {log} 2>&1"


rule nms_rank:
    input:
        T("reranked_dir", "{ranker}", "{dataset}", "{detector}", "{scales}"),
    output:
        T("final", "{dataset}", "{detector}", "{scales}", "rank-{ranker}"),
    params:
        args=NMS_ARGS,
        dask=DASK,
        code=code_hash("stages.nms"),
    log:
        "logs/nms/{dataset}/{detector}/{scales}/rank-{ranker}.log",
    benchmark:
        str(L.root / "processed" / "benchmarks" / "nms" / "{dataset}" / "{detector}" / "{scales}" / "rank-{ranker}.tsv")
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        ENV + "{CONFRANK} nms --dataset {wildcards.dataset} --detector {wildcards.detector}"
        " --scales {wildcards.scales} --method rank --ranker {wildcards.ranker} {params.args} {params.dask} > {log} 2>&1"


def evaluate_method_args(wc):
    if wc.method.startswith("rank-"):
        return f"--method rank --ranker {wc.method[len('rank-'):]}"
    return f"--method {wc.method}"


rule evaluate_method:
    input:
        final=T("final", "{dataset}", "{detector}", "{scales}", "{method}"),
        gt=T("gt", "{dataset}"),
        images=T("images", "{dataset}"),
    output:
        metrics=T("metrics", "{dataset}", "{detector}", "{scales}", "{method}"),
        pr=T("pr_curves", "{dataset}", "{detector}", "{scales}", "{method}"),
        plot=report(
            T("pr_plot", "{dataset}", "{detector}", "{scales}", "{method}"),
            category="PR curves",
            subcategory="{dataset}",
            labels={"detector": "{detector}", "scales": "{scales}", "method": "{method}"},
        ),
    wildcard_constraints:
        method=r"single|multi|oracle|ensemble|rank-[^/]+",
    params:
        method=evaluate_method_args,
        code=code_hash("stages.evaluate"),
    log:
        "logs/evaluate/{dataset}/{detector}/{scales}/{method}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        ENV + "{CONFRANK} evaluate --dataset {wildcards.dataset} --detector {wildcards.detector}"
        " --scales {wildcards.scales} {params.method} --format json > {log} 2>&1"


def cv_input(wc):
    cv, v = CV[wc.cv], CV[wc.cv]["variants"][wc.variant]
    dets = list(dict.fromkeys(v.get("detectors") or cv["detectors"])) + list(v.get("train_detectors") or [])
    kind = ranker_data(v)
    return [T(kind, ds, det, cv["scales"]) for ds in cv["datasets"] for det in dict.fromkeys(dets)] + [
        T("images", ds) for ds in cv["datasets"]]


def cv_args(wc):
    cv, v = CV[wc.cv], CV[wc.cv]["variants"][wc.variant]
    dets = v.get("detectors") or cv["detectors"]
    fixed = [flag("pool", ",".join(cv["datasets"])), flag("detectors", ",".join(dets)), flag("scales", cv["scales"]),
             flag("folds", cv["folds"]), flag("train-detectors", ",".join(v["train_detectors"]) if v.get("train_detectors") else None)]
    return " ".join(fixed + settings_flags({k: x for k, x in v.items() if k != "detectors"}))


rule cv:
    input:
        cv_input,
    output:
        T("cv_deltas", "{cv}", "{variant}"),
    params:
        args=cv_args,
        settings=lambda wc: json.dumps(resolve_ranker(CV[wc.cv]["variants"][wc.variant]), sort_keys=True),
        code=code_hash("stages.cv"),
    log:
        "logs/cv/{cv}/{variant}.log",
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=1440,
    shell:
        ENV + "{CONFRANK} cv run --name {wildcards.cv} --variant {wildcards.variant} {params.args} {DEVICE} > {log} 2>&1"


rule cv_summary:
    input:
        lambda wc: [T("cv_deltas", wc.cv, v) for v in CV[wc.cv]["variants"]],
    output:
        deltas=T("cv_deltas", "{cv}"),
        summary=T("cv_summary", "{cv}"),
    params:
        variants=lambda wc: ",".join(CV[wc.cv]["variants"]),
        code=code_hash("stages.cv"),
    log:
        "logs/cv/{cv}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        ENV + "{CONFRANK} cv summary --name {wildcards.cv} --variants {params.variants} > {log} 2>&1"


REPORT_SETTINGS = {
    "postprocess": POST,
    "report": config["report"],
    "rankers": {name: RANKERS[name] for name in used_rankers(config)},
    "expected": [list(r) for r in RESULTS],
    "config_hash": CONFIG_HASH,
}


rule report:
    input:
        metrics=metrics_files(RESULTS),
        rankers=[T("ranker_dir", r) + "/train_log.parquet" for r in used_rankers(config)],
        cv=[T("cv_deltas", name) for name in CV],
    output:
        html=report(T("report_dir") + "/report.html", category="Report"),
        md=T("report_dir") + "/report.md",
        figures=report(directory(T("report_dir") + "/figures"), patterns=["{name}.png"], category="Figures"),
    params:
        out=shlex.quote(T("report_dir")),
        settings=shlex.quote(json.dumps(REPORT_SETTINGS, sort_keys=True)),
        code=code_hash("stages.report"),
    log:
        "logs/report.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    shell:
        ENV + "{CONFRANK} report --out {params.out} --settings {params.settings} > {log} 2>&1"
