"""Config validation (readable messages) and the expansion of experiments into results."""

from __future__ import annotations

import copy

import pytest
import yaml
from snakemake.utils import update_config

from pipeline.config import (ConfigError, preset_names, Result, cv_jobs, detection_sets, expand, feature_sets, used_rankers,
                             validate_config)
from stages.common import DEFAULT_CONFIG, ROOT, load_config, load_schema

SCHEMA = load_schema()


def base() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def test_shipped_configs_are_valid():
    shipped = sorted(p.name for p in (ROOT / "config").glob("*.yaml") if p.name != "config.schema.yaml")
    assert {"config.yaml", "test.yaml", "heldout416.yaml", "cv.yaml", "table4.yaml"} <= set(shipped)
    for name in shipped:
        merged = base()  # --configfile merges over config.yaml key by key, as snakemake does
        update_config(merged, yaml.safe_load((ROOT / "config" / name).read_text()))
        validate_config(merged, SCHEMA, source=name)
    config = load_config(DEFAULT_CONFIG)
    assert config["postprocess"] == {"iou": 0.4, "keep": 750, "keep_singletons": False}
    assert config["datasets"]["sample"]["max_images"] is None  # schema default filled in


def test_wrong_type_is_named_with_its_key_path():
    config = base()
    config["datasets"]["sample"]["shards"] = "two"
    with pytest.raises(ConfigError) as err:
        validate_config(config, SCHEMA, source="my.yaml")
    assert "my.yaml: datasets.sample.shards: 'two' is not of type 'integer'" in str(err.value)


def test_unknown_detector_lists_the_known_ones():
    config = base()
    config["experiments"][0]["detectors"] = ["mtcnn", "yolo-face"]
    with pytest.raises(ConfigError) as err:
        validate_config(config, SCHEMA)
    msg = str(err.value)
    assert "experiments[0].detectors[1]: unknown detector 'yolo-face'" in msg
    assert "retinaface-mnet025" in msg and "slim" in msg


def test_bad_references_are_all_reported():
    config = base()
    config["experiments"][0]["scales"] = ["4k"]
    config["experiments"][0]["dataset"] = "nope"
    config["rankers"]["small"]["datasets"] = ["missing"]
    config["datasets"]["sub"] = {"source": "subset", "subset_of": "elsewhere"}
    with pytest.raises(ConfigError) as err:
        validate_config(config, SCHEMA)
    msg = str(err.value)
    for part in ("experiments[0].scales[0]: unknown scale set '4k'",
                 "experiments[0].dataset: unknown dataset 'nope'",
                 "rankers.small.datasets[0]: unknown dataset 'missing'",
                 "datasets.sub.subset_of: unknown dataset 'elsewhere'",
                 "datasets.sub: source 'subset' needs 'half', 'max_images' or both"):
        assert part in msg


def test_unknown_key_is_rejected():
    config = base()
    config["postprocess"]["nms_threshold"] = 0.5
    with pytest.raises(ConfigError, match="postprocess: Additional properties are not allowed"):
        validate_config(config, SCHEMA)


def test_expand_matches_methods_to_scale_sets():
    config = validate_config({
        "datasets": {"d": {"root": "x"}},
        "rankers": {"r1": {"datasets": ["d"], "detectors": ["slim"], "scales": "original"},
                    "r2": {"datasets": ["d"], "detectors": ["slim"], "scales": "8k"}},
        "experiments": [{"dataset": "d", "detectors": ["slim"], "scales": ["8k", "8k-multi"],
                         "rankers": ["r2"]}],
    }, copy.deepcopy(SCHEMA))
    assert expand(config) == [
        Result("d", "slim", "8k", "single"), Result("d", "slim", "8k", "oracle"),
        Result("d", "slim", "8k", "rank-r2"), Result("d", "slim", "8k-multi", "multi"),
        Result("d", "slim", "8k-multi", "oracle"), Result("d", "slim", "8k-multi", "rank-r2"),
    ]
    assert Result("d", "slim", "8k", "rank-r2").ranker == "r2"
    assert used_rankers(config) == ["r2"]
    # r1 is configured but unused: nothing is detected for it
    assert detection_sets(config) == [("d", "slim", "8k"), ("d", "slim", "8k-multi")]


def test_feature_ranker_settings_are_checked():
    config = base()
    config["rankers"]["g"] = {"datasets": ["sample"], "detectors": ["mtcnn"], "scales": "original", "preset": "cpu"}
    config["experiments"][0]["methods"] = ["single", "ensemble", "rank"]
    with pytest.raises(ConfigError) as err:
        validate_config(config, SCHEMA, source="c.yaml")
    text = str(err.value)
    assert "c.yaml: rankers.g: a gbm ranker that reads other detectors' boxes needs the top-level 'evidence' list" in text
    assert "c.yaml: experiments[0].methods: 'ensemble' needs the top-level 'evidence' list" in text
    config["evidence"] = ["mtcnn", "slim"]
    with pytest.raises(ConfigError, match=r"rankers.g.evidence: \['retinaface-mnet025', 'slim', 'rfb'\] differs"):
        validate_config(copy.deepcopy(config), SCHEMA, source="c.yaml")
    config["rankers"]["g"]["preset"] = "fast"
    with pytest.raises(ConfigError, match=r"rankers.g.preset: unknown preset 'fast'; known: " + ", ".join(preset_names())):
        validate_config(copy.deepcopy(config), SCHEMA, source="c.yaml")


def test_cv_variants_expand_into_jobs_and_detections():
    config = base()
    config["evidence"] = ["mtcnn", "slim"]
    config["cv"] = {"x": {"datasets": ["sample"], "detectors": ["mtcnn"], "scales": "original",
                          "variants": {"a": {"preset": "cpu", "evidence": ["mtcnn", "slim"]},
                                       "b": {"model": "network", "image_branch": "none", "train_detectors": ["slim"]}}}}
    validate_config(config, SCHEMA, source="c.yaml")
    assert config["cv"]["x"]["folds"] == 5
    assert cv_jobs(config) == [("x", "a"), ("x", "b")]
    assert ("sample", "slim", "original") in detection_sets(config)
    assert ("sample", "mtcnn", "original") in feature_sets(config)


def test_fusions_expand_into_wbf_results_stored_under_their_names():
    config = base()
    config["fusions"] = {"mt+slim": {"detectors": ["mtcnn", "slim"]}, "three": {"detectors": ["mtcnn", "slim", "rfb"]}}
    config["experiments"] = [{"dataset": "sample", "detectors": ["mtcnn"], "scales": ["original", "8k"],
                              "methods": ["single", "wbf"], "fusions": ["mt+slim"]}]
    validate_config(config, SCHEMA)
    assert config["fusions"]["mt+slim"] == {"detectors": ["mtcnn", "slim"], "iou_thr": 0.55, "skip_box_thr": 0.02,
                                            "conf_type": "avg"}
    assert expand(config) == [Result("sample", "mtcnn", "original", "single"), Result("sample", "mtcnn", "8k", "single"),
                              Result("sample", "mt+slim", "original", "wbf"), Result("sample", "mt+slim", "8k", "wbf")]
    # the fusion's detectors are detected; the fusion's name is not a detection run
    assert detection_sets(config) == [("sample", "mtcnn", "original"), ("sample", "mtcnn", "8k"),
                                      ("sample", "slim", "original"), ("sample", "slim", "8k")]
    config["experiments"][0]["fusions"] = None  # every configured fusion
    assert [r.detector for r in expand(config) if r.method == "wbf"] == ["mt+slim", "mt+slim", "three", "three"]


def test_fusion_mistakes_are_named():
    config = base()
    config["fusions"] = {"slim": {"detectors": ["mtcnn", "yolo"]}}
    config["experiments"][0]["methods"] = ["wbf"]
    config["experiments"][0]["fusions"] = ["nope"]
    with pytest.raises(ConfigError) as err:
        validate_config(copy.deepcopy(config), SCHEMA, source="c.yaml")
    text = str(err.value)
    for part in ("c.yaml: fusions.slim.detectors[1]: unknown detector 'yolo'",
                 "c.yaml: fusions.slim: a fusion cannot be named like a detector",
                 "c.yaml: experiments[0].fusions[0]: unknown fusion 'nope'; known: slim"):
        assert part in text
    config["experiments"][0]["fusions"] = []
    with pytest.raises(ConfigError, match=r"experiments\[0\].methods: 'wbf' needs at least one fusion"):
        validate_config(copy.deepcopy(config), SCHEMA, source="c.yaml")
    config["fusions"] = {"a/b": {"detectors": ["mtcnn"], "conf_type": "mean"}}
    with pytest.raises(ConfigError) as err:
        validate_config(copy.deepcopy(config), SCHEMA, source="c.yaml")
    text = str(err.value)
    assert "'a/b' does not match" in text and "is too short" in text and "'mean' is not one of" in text


def test_a_fusing_ranker_gives_results_of_the_experiments_fusions():
    config = base()
    dets = ["retinaface-mnet025", "slim", "rfb"]
    config["evidence"] = dets
    config["fusions"] = {"trio": {"detectors": dets}}
    config["rankers"] = {"f": {"datasets": ["sample"], "detectors": dets, "scales": "original", "preset": "fuse"}}
    config["experiments"] = [{"dataset": "sample", "detectors": dets, "scales": ["original"],
                              "methods": ["single", "wbf", "rank"]}]
    validate_config(config, SCHEMA, source="c.yaml")
    results = expand(config)
    assert Result("sample", "trio", "original", "rank-f") in results and Result("sample", "trio", "original", "wbf") in results
    assert not [r for r in results if r.detector in dets and r.method == "rank-f"]
    assert {("sample", d, "original") for d in dets} <= set(feature_sets(config))
    assert used_rankers(config) == ["f"]
    config["fusions"]["pair"] = {"detectors": dets[:2]}
    with pytest.raises(ConfigError, match=r"fusion 'pair' of \['retinaface-mnet025', 'slim'\] cannot be made by ranker 'f'"):
        validate_config(copy.deepcopy(config), SCHEMA, source="c.yaml")
    del config["fusions"]["pair"]
    config["rankers"]["f"]["grid"] = "fuse"
    with pytest.raises(ConfigError, match=r"rankers.f.grid: only a cv variant"):
        validate_config(copy.deepcopy(config), SCHEMA, source="c.yaml")
