"""confrank: the whole experiment as one DAG (docs/dag.md).

Laid out as the Snakemake catalog workflows: this file holds the config, its validation,
the includes and the target rules. rules/common.smk has the helpers (every path comes from
stages.layout.Layout); one .smk per stage family holds its rules, each named after the
`confrank` command it shells: data (sample, index, subset), detect (detect, oracle), ranker
(features, train, rerank, cv, cv_summary), evidence (image_features), postprocess (nms, evaluate),
report (report).

Targets: all (default: the report and every configured table), detect_all, train_all,
evaluate_all, cv_all, report.
"""

from pathlib import Path

from snakemake.utils import validate

from pipeline.config import validate_config
from stages.common import SCHEMA, load_schema


configfile: str(Path(workflow.basedir) / "config" / "config.yaml")


# readable messages first (names, references), then snakemake's own schema check
validate_config(config, load_schema(), source="config")
validate(config, str(SCHEMA))


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/detect.smk"
include: "rules/ranker.smk"
include: "rules/evidence.smk"
include: "rules/postprocess.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        metrics_files(RESULTS),
        [T("cv_summary", name) for name in CV],
        str(L.report_files().html),


rule detect_all:
    input:
        [p for s in detection_sets(config) for p in detection_shards(*s)],


rule train_all:
    input:
        [T("ranker_model", r) for r in used_rankers(config)],


rule evaluate_all:
    input:
        metrics_files(RESULTS),


rule cv_all:
    input:
        [T("cv_summary", name) for name in CV],
