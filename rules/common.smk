"""Helpers of the rules: the Layout paths with wildcards, the config's derived values, options.

Every path under the data folder comes from stages.layout.Layout (through ``T``); every rule
shells its stage's ``confrank`` command and declares the hash of that stage's code as a param
(pipeline.provenance.code_hash), so a change of the code reruns the rule.
"""

import json
import re
import shlex
import sys
from pathlib import Path

from pipeline.config import (
    detection_sets,
    expand as expand_results,
    fuses,
    ranker_settings,
    reads_features,
    ranker_args,
    resolve_ranker,
    used_rankers,
)
from pipeline.detectors.registry import DETECTORS
from pipeline.methods import Method, wildcard_pattern
from pipeline.provenance import code_hash
from pipeline.provenance import config_hash
from pipeline.scales import EIGHT_K, SCALE_SETS
from stages.layout import Layout

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
CONFRANK = shlex.quote(str(_exe)) if _exe.is_file() else f"{PYTHON} -m stages.cli"

SOFTWARE = "../envs/confrank.yaml"  # the rules' `conda:` (relative to rules/)


def confrank(rule_name, args, env="", device=False):
    """A rule's shell command: ``confrank ARGS`` (with ``--device`` from the config when
    ``device``), its output to the rule's log, the rule name (it goes into the outputs'
    provenance, pipeline.provenance) and the data folder in its environment, ``env`` before it.
    The config hash is not exported: it would make every job rerun on any config change."""
    data_dir = shlex.quote(str(L.root))
    device_flag = f" {DEVICE}" if device and DEVICE else ""
    return f"export CONFRANK_RULE={rule_name} CONFRANK_DATA_DIR={data_dir}; {env}{CONFRANK} {args}{device_flag} > {{log}} 2>&1"


# only detect reads weights; a `weights` param reruns it when the folder changes
WEIGHTS_ENV = "" if config["weights_dir"] is None else f"CONFRANK_WEIGHTS={shlex.quote(config['weights_dir'])} "
DEVICE = "" if config["device"] == "auto" else f"--device {config['device']}"
DASK = "" if config["dask_scheduler"] is None else f"--dask-scheduler {shlex.quote(config['dask_scheduler'])}"


def _alt(names):
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


def _sources(kind):
    """Names of the datasets whose ``source`` is ``kind`` (never matches when there are none)."""
    names = [name for name, ds in DATASETS.items() if ds["source"] == kind]
    return _alt(names) if names else "(?!)"


wildcard_constraints:
    dataset=_alt(DATASETS),
    detector=_alt(DETECTORS),
    scales=_alt(SCALE_SETS),
    ranker=_alt(RANKERS) if RANKERS else "(?!)",
    cv=_alt(CV) if CV else "(?!)",
    variant=r"[^/]+",
    shard=r"\d+",


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


def ranker_data(r):
    """The Layout folder kind a ranker (or cv variant) trains on: what its kind reads (the registry)."""
    return "features_dir" if reads_features(r) else "oracle_dir"


def settings_flags(r):
    """The ranker settings of a ranker (or cv variant) as ``confrank train``/``cv run`` options."""
    flags = []
    for key, value in ranker_args(r).items():
        if key == "evidence":  # the one evidence set of the features shards, below
            continue
        option = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{option}" if value else f"--no-{option}")
        else:
            flags.append(flag(option, ",".join(value) if isinstance(value, list) else value))
    if ranker_settings(r)[1].evidence_set:
        flags.append(flag("evidence", EVIDENCE))
    return flags


# ------------------------------------------------------------------------------ rules/data.smk


def index_input(wc):
    """The built demo dataset for ``source: sample``; nothing for a folder outside the data folder."""
    return [T("raw", wc.dataset)] if DATASETS[wc.dataset]["source"] == "sample" else []


def index_root(wc):
    ds = DATASETS[wc.dataset]
    return T("raw", wc.dataset) if ds["source"] == "sample" else ds["root"]


# ------------------------------------------------------------------------------ rules/ranker.smk


def evidence_dirs(ds, det, sset):
    """Oracle shards of the other evidence detectors: what a features job reads besides its own."""
    return [T("oracle_dir", ds, e, sset) for e in config["evidence"] if e != det]


def image_feature_dirs(r, datasets, detectors, sset):
    """The image evidence shards (rules/evidence.smk) of every dataset x detector when a ranker
    (or cv variant) reads the ``image`` feature group; none otherwise."""
    if not ranker_settings(r)[1].image_features:
        return []
    return [T("image_features_dir", ds, det, sset) for ds in datasets for det in detectors]


def train_input(wc):
    r = RANKERS[wc.ranker]
    kind = ranker_data(r)
    shards = [T(kind, ds, det, r["scales"]) for ds in r["datasets"] for det in r["detectors"]]
    return shards + image_feature_dirs(r, r["datasets"], r["detectors"], r["scales"])


def train_args(wc):
    r = RANKERS[wc.ranker]
    fixed = [
        flag("datasets", ",".join(r["datasets"])),
        flag("detectors", ",".join(r["detectors"])),
        flag("scales", r["scales"]),
    ]
    return " ".join(fixed + settings_flags(r))


def rerank_features(wc):
    """The features shards a ranker that reads features re-scores (and its image evidence
    shards when it reads the ``image`` group); none for the other rankers."""
    r = RANKERS[wc.ranker]
    if reads_features(r):
        features = [T("features_dir", wc.dataset, wc.detector, wc.scales)]
        return features + image_feature_dirs(r, [wc.dataset], [wc.detector], wc.scales)
    return []


def cv_input(wc):
    cv, v = CV[wc.cv], CV[wc.cv]["variants"][wc.variant]
    dets = list(dict.fromkeys(v.get("detectors") or cv["detectors"])) + list(v.get("train_detectors") or [])
    kind = ranker_data(v)
    shards = [T(kind, ds, det, cv["scales"]) for ds in cv["datasets"] for det in dict.fromkeys(dets)]
    shards += image_feature_dirs(v, cv["datasets"], list(dict.fromkeys(dets)), cv["scales"])
    return shards + [T("images", ds) for ds in cv["datasets"]]


def cv_args(wc):
    cv, v = CV[wc.cv], CV[wc.cv]["variants"][wc.variant]
    dets = v.get("detectors") or cv["detectors"]
    train_dets = ",".join(v["train_detectors"]) if v.get("train_detectors") else None
    fixed = [
        flag("pool", ",".join(cv["datasets"])),
        flag("detectors", ",".join(dets)),
        flag("scales", cv["scales"]),
        flag("folds", cv["folds"]),
        flag("train-detectors", train_dets),
    ]
    return " ".join(fixed + settings_flags({k: x for k, x in v.items() if k != "detectors"}))


# ------------------------------------------------------------------------------ rules/postprocess.smk

NMS_ARGS = " ".join(
    [
        flag("iou", POST["iou"]),
        flag("keep", POST["keep"]),
        "--keep-singletons" if POST["keep_singletons"] else "--drop-singletons",
    ]
)


#: the ``method`` wildcard of the nms and evaluate rules (``imported`` comes from ``confrank import``)
NMS_METHODS = wildcard_pattern(("single", "multi", "oracle", "ensemble", "rank"), RANKERS)


def nms_input(wc):
    """The shards a method reads: features (ensemble), re-ranked (rank-R), oracle, detections."""
    method = Method.parse(wc.method)
    if method.kind == "ensemble":
        return [T("features_dir", wc.dataset, wc.detector, wc.scales)]
    if method.kind == "rank":
        return [T("reranked_dir", method.ranker, wc.dataset, wc.detector, wc.scales)]
    if method.kind == "oracle":
        return [T("oracle_dir", wc.dataset, wc.detector, wc.scales)]
    return detection_shards(wc.dataset, wc.detector, wc.scales)


def method_args(wc):
    """``--method M`` or, for ``rank-R``, ``--method rank --ranker R``."""
    method = Method.parse(wc.method)
    return f"--method rank --ranker {method.ranker}" if method.kind == "rank" else f"--method {method.kind}"


#: fusions of several detectors, for fuse: the ``fusion`` wildcard and its methods; and the
#: ``detector`` and ``method`` wildcards of evaluate (a fused result is stored under its name)
FUSIONS = config["fusions"]
FUSION_NAMES = _alt(FUSIONS) if FUSIONS else "(?!)"
FUSE_METHODS = wildcard_pattern(("wbf", "rank"), [r for r in RANKERS if fuses(RANKERS[r])])
FINAL_DETECTORS = _alt([*DETECTORS, *FUSIONS])
FINAL_METHODS = f"{NMS_METHODS}|{FUSE_METHODS}"


def fuse_input(wc):
    """Detection shards of every detector of a fusion, and the images table (image sizes); for a
    learned fusion (``rank-R``) also their features shards and the ranker."""
    dets = FUSIONS[wc.fusion]["detectors"]
    shards = [p for det in dets for p in detection_shards(wc.dataset, det, wc.scales)] + [T("images", wc.dataset)]
    method = Method.parse(wc.method)
    if method.kind == "rank":
        shards += [T("features_dir", wc.dataset, det, wc.scales) for det in dets]
        shards.append(T("ranker_model", method.ranker))
    return shards


def fuse_args(wc):
    """A fusion's ``confrank fuse`` options: detectors, NMS settings, WBF settings (a learned
    fusion: the detectors and the boxes kept; its ranker holds the rest)."""
    fusion = FUSIONS[wc.fusion]
    if Method.parse(wc.method).kind == "rank":
        return " ".join([flag("detectors", ",".join(fusion["detectors"])), flag("keep", POST["keep"])])
    return " ".join(
        [
            flag("detectors", ",".join(fusion["detectors"])),
            flag("iou", POST["iou"]),
            flag("keep", POST["keep"]),
            flag("wbf-iou", fusion["iou_thr"]),
            flag("skip-box-thr", fusion["skip_box_thr"]),
            flag("conf-type", fusion["conf_type"]),
        ]
    )


# ------------------------------------------------------------------------------ rules/report.smk

REPORT_SETTINGS = {
    "postprocess": POST,
    "report": config["report"],
    "rankers": {name: RANKERS[name] for name in used_rankers(config)},
    "expected": [list(r) for r in RESULTS],
    "config_hash": CONFIG_HASH,
}
REPORT = L.report_files()
