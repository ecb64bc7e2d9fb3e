"""Experiment configuration: validation with readable messages, and what the DAG must compute.

A config is a plain mapping (as loaded from ``config/config.yaml``; its JSON schema is
``config/config.schema.yaml``). :func:`validate_config` checks it against that schema and
against what the code knows (detector names, scale sets, methods, references between
sections), filling schema defaults in place. :func:`expand` lists the results an
experiment section asks for as :class:`Result` tuples; the Snakefile turns them into paths.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema

from pipeline.errors import ConfrankError, FormatError
from pipeline.methods import rank, ranker_of
from pipeline.scales import SCALE_SETS

#: the NMS method that turns a scale set's raw boxes into final boxes, by ``ScaleSet.multi``
BASE_METHOD = {False: "single", True: "multi"}


class ConfigError(ConfrankError):
    """The configuration is invalid; the message names the offending key and what was expected."""


class Result(NamedTuple):
    """One evaluated result: final boxes and metrics of one method (for ``wbf``, ``detector`` is
    the name of a fusion in the config's ``fusions``)."""

    dataset: str
    detector: str
    scales: str
    method: str  # a stored method name (pipeline.methods): single, multi, oracle, ensemble, wbf or rank-{ranker}

    @property
    def ranker(self) -> str | None:
        return ranker_of(self.method)


def _where(path: Any) -> str:
    parts = []
    for item in path:
        parts.append(f"[{item}]" if isinstance(item, int) else (f".{item}" if parts else str(item)))
    return "".join(parts) or "<top level>"


def _schema_errors(config: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_where(e.absolute_path)}: {e.message}" for e in errors]


def _fill_defaults(config: dict[str, Any], schema: Mapping[str, Any]) -> None:
    """Insert schema ``default`` values for missing keys, recursively (objects and arrays)."""
    if not isinstance(config, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in config and "default" in sub:
            config[key] = copy.deepcopy(sub["default"])
        _fill_child(config.get(key), sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in config.items():
            if key not in schema.get("properties", {}):
                _fill_child(value, extra)


def _fill_child(value: Any, schema: Mapping[str, Any]) -> None:
    if isinstance(value, dict):
        _fill_defaults(value, schema)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _fill_child(item, schema["items"])


def validate_config(config: dict[str, Any], schema: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Check ``config`` against ``schema`` and the code's names; fill defaults in place.

    Raises :class:`ConfigError` listing every problem as ``<source>: <key path>: <message>``.
    """
    problems = _schema_errors(config, schema)
    if not problems:
        _fill_defaults(config, schema)
        problems = _semantic_errors(config)
    if problems:
        raise ConfigError(f"{source} is invalid:\n  " + "\n  ".join(f"{source}: {p}" for p in problems))
    return config


def _known(kind: str, name: str, known: Any) -> str:
    return f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}"


def _semantic_errors(config: Mapping[str, Any]) -> list[str]:
    from pipeline.detectors.registry import DETECTORS

    problems = []
    datasets, rankers = config["datasets"], config.get("rankers", {})
    for name, ds in datasets.items():
        if ds["source"] == "folder" and "root" not in ds:
            problems.append(f"datasets.{name}: source 'folder' needs a 'root'")
        if ds["source"] == "subset":
            parent = ds.get("subset_of")
            if parent not in datasets or parent == name:
                problems.append(f"datasets.{name}.subset_of: {_known('dataset', str(parent), set(datasets) - {name})}")
            if ds.get("max_images") is None and ds.get("half") is None:
                problems.append(f"datasets.{name}: source 'subset' needs 'half', 'max_images' or both")

    def check_names(where: str, detectors: list[str], scales: list[str], dsets: list[str]) -> None:
        for i, det in enumerate(detectors):
            if det not in DETECTORS:
                problems.append(f"{where}.detectors[{i}]: {_known('detector', det, DETECTORS)}")
        for i, sset in enumerate(scales):
            if sset not in SCALE_SETS:
                problems.append(f"{where}.scales[{i}]: {_known('scale set', sset, SCALE_SETS)}")
        for i, ds in enumerate(dsets):
            if ds not in datasets:
                problems.append(f"{where}.datasets[{i}]: {_known('dataset', ds, datasets)}")

    evidence = config.get("evidence") or []
    check_names("evidence", evidence, [], [])

    def check_ranker(where: str, ranker: Mapping[str, Any]) -> None:
        for key in ("train_detectors", "evidence"):
            check_names(f"{where}.{key}", ranker.get(key) or [], [], [])
        preset = ranker.get("preset")
        if preset is not None and preset not in preset_names():
            problems.append(f"{where}.preset: {_known('preset', preset, preset_names())}")
            return
        try:
            kind, settings = ranker_settings(ranker, where)
        except ConfrankError as exc:
            problems.append(str(exc))
            return
        if settings.evidence_set:
            if not evidence:
                problems.append(f"{where}: a {kind.name} ranker that reads other detectors' boxes needs the top-level "
                                "'evidence' list (its features' evidence set)")
            elif sorted(settings.evidence_set) != sorted(evidence):
                problems.append(f"{where}.evidence: {list(settings.evidence_set)} differs from the top-level evidence "
                                f"{evidence}; the features shards of a dataset have one evidence set")

    for name, ranker in rankers.items():
        check_names(f"rankers.{name}", ranker["detectors"], [ranker["scales"]], ranker["datasets"])
        check_ranker(f"rankers.{name}", ranker)
        for key in SEARCH_KEYS:
            if key in ranker:
                problems.append(f"rankers.{name}.{key}: only a cv variant is cross-validated over a grid")
    for name, cv in (config.get("cv") or {}).items():
        check_names(f"cv.{name}", cv["detectors"], [cv["scales"]], cv["datasets"])
        for variant, settings in cv["variants"].items():
            check_ranker(f"cv.{name}.variants.{variant}", settings)
            grid = settings.get("grid")
            if grid is not None and grid not in grid_names():
                problems.append(f"cv.{name}.variants.{variant}.grid: {_known('grid', grid, grid_names())}")
    for i, exp in enumerate(config["experiments"]):
        where = f"experiments[{i}]"
        check_names(where, exp["detectors"], exp["scales"], [])
        if exp["dataset"] not in datasets:
            problems.append(f"{where}.dataset: {_known('dataset', exp['dataset'], datasets)}")
        for j, rname in enumerate(exp.get("rankers") or []):
            if rname not in rankers:
                problems.append(f"{where}.rankers[{j}]: {_known('ranker', rname, rankers)}")
        if "rank" in exp["methods"] and not _experiment_rankers(exp, rankers):
            problems.append(f"{where}.methods: 'rank' needs at least one ranker in 'rankers'")
        if "ensemble" in exp["methods"] and not evidence:
            problems.append(f"{where}.methods: 'ensemble' needs the top-level 'evidence' list of detectors")
        fusions = config.get("fusions") or {}
        for j, fname in enumerate(exp.get("fusions") or []):
            if fname not in fusions:
                problems.append(f"{where}.fusions[{j}]: {_known('fusion', fname, fusions)}")
        if "wbf" in exp["methods"] and not _experiment_fusions(exp, fusions):
            problems.append(f"{where}.methods: 'wbf' needs at least one fusion in the top-level 'fusions'")
        if "rank" in exp["methods"]:
            problems += _fusing_ranker_errors(where, exp, rankers, fusions)
    for name, fusion in (config.get("fusions") or {}).items():
        check_names(f"fusions.{name}", fusion["detectors"], [], [])
        if name in DETECTORS:
            problems.append(f"fusions.{name}: a fusion cannot be named like a detector (its result is stored under its name)")
    return problems


def _fusing_ranker_errors(where: str, exp: Mapping[str, Any], rankers: Mapping[str, Any],
                          fusions: Mapping[str, Any]) -> list[str]:
    """A ranker that fuses needs fusions in the experiment, each of exactly its detectors."""
    problems = []
    for name in _experiment_rankers(exp, rankers):
        try:
            if name not in rankers or not fuses(rankers[name]):
                continue
        except ConfrankError:  # a bad ranker entry: reported where the ranker is checked
            continue
        chosen = _experiment_fusions(exp, fusions)
        if not chosen:
            problems.append(f"{where}: ranker {name!r} fuses detectors; the experiment needs a fusion in 'fusions'")
        wanted = sorted(ranker_settings(rankers[name])[1].evidence_set)
        for fname in chosen:
            if fname in fusions and sorted(fusions[fname]["detectors"]) != wanted:
                problems.append(f"{where}: fusion {fname!r} of {fusions[fname]['detectors']} cannot be made by ranker "
                                f"{name!r}, which fuses {wanted}")
    return problems


def _experiment_rankers(exp: Mapping[str, Any], rankers: Mapping[str, Any]) -> list[str]:
    chosen = exp.get("rankers")
    return list(rankers) if chosen is None else list(chosen)


def expand(config: Mapping[str, Any]) -> list[Result]:
    """Every result the experiments ask for, without duplicates, in config order.

    ``single`` applies only to single-scale sets and ``multi`` only to multi-scale sets;
    ``rank`` becomes one ``rank-{ranker}`` result per ranker of the experiment; ``wbf`` one
    result per fusion of the experiment (its detector is the fusion's name), per scale set.
    """
    seen: dict[Result, None] = {}
    for exp in config["experiments"]:
        for det in exp["detectors"]:
            for sset in exp["scales"]:
                for method in _methods(exp, sset, config.get("rankers", {})):
                    seen.setdefault(Result(exp["dataset"], det, sset, method))
        fusing = [rank(r) for r in _experiment_rankers(exp, config.get("rankers", {}))
                  if "rank" in exp["methods"] and fuses(config["rankers"][r])]
        methods = (["wbf"] if "wbf" in exp["methods"] else []) + fusing
        for fusion in _experiment_fusions(exp, config.get("fusions") or {}) if methods else []:
            for sset in exp["scales"]:
                for method in methods:
                    seen.setdefault(Result(exp["dataset"], fusion, sset, method))
    return list(seen)


def _experiment_fusions(exp: Mapping[str, Any], fusions: Mapping[str, Any]) -> list[str]:
    chosen = exp.get("fusions")
    return list(fusions) if chosen is None else list(chosen)


def fusion_detectors(config: Mapping[str, Any], result: Result) -> list[str]:
    """The detectors whose boxes a result reads: a fusion's detectors for a result of a fusion
    (``wbf``, or ``rank-R`` of a ranker that fuses), else its own."""
    fusions = config.get("fusions") or {}
    return list(fusions[result.detector]["detectors"]) if result.detector in fusions else [result.detector]


def _methods(exp: Mapping[str, Any], scales: str, rankers: Mapping[str, Any]) -> Iterator[str]:
    for method in exp["methods"]:
        if method in ("single", "multi"):
            if BASE_METHOD[SCALE_SETS[scales].multi] == method:
                yield method
        elif method == "rank":  # a ranker that fuses gives results of the experiment's fusions (expand)
            yield from (rank(r) for r in _experiment_rankers(exp, rankers) if not fuses(rankers[r]))
        elif method != "wbf":  # a result of the experiment's fusions, not of each detector (expand)
            yield method


def detection_sets(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(dataset, detector, scales) of every detection run the results and rankers need."""
    seen: dict[tuple[str, str, str], None] = {}
    for res in expand(config):
        for det in fusion_detectors(config, res):
            seen.setdefault((res.dataset, det, res.scales))
    for name in used_rankers(config):
        ranker = config["rankers"][name]
        for ds in ranker["datasets"]:
            for det in ranker["detectors"]:
                seen.setdefault((ds, det, ranker["scales"]))
    for cv in (config.get("cv") or {}).values():
        for ds in cv["datasets"]:
            for det in cv_detectors(cv):
                seen.setdefault((ds, det, cv["scales"]))
    for ds, _, sset in feature_sets(config):
        for det in config.get("evidence") or []:
            seen.setdefault((ds, det, sset))
    return list(seen)


def feature_sets(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(dataset, detector, scales) of every features job: the ensemble results, the feature
    rankers' training data and every cross-validation pool (when ``evidence`` is set)."""
    seen: dict[tuple[str, str, str], None] = {}
    for res in expand(config):
        if res.method == "ensemble" or (res.ranker and reads_features(config["rankers"][res.ranker])):
            for det in fusion_detectors(config, res):
                seen.setdefault((res.dataset, det, res.scales))
    for name in used_rankers(config):
        ranker = config["rankers"][name]
        if reads_features(ranker):
            for ds in ranker["datasets"]:
                for det in ranker["detectors"]:
                    seen.setdefault((ds, det, ranker["scales"]))
    for cv in (config.get("cv") or {}).values():
        if any(reads_features(v) for v in cv["variants"].values()) and config.get("evidence"):
            for ds in cv["datasets"]:
                for det in cv_detectors(cv):
                    seen.setdefault((ds, det, cv["scales"]))
    return list(seen)


def cv_detectors(cv: Mapping[str, Any]) -> list[str]:
    """Every detector a cross-validation experiment evaluates or trains on, in order."""
    names = list(cv["detectors"])
    for variant in cv["variants"].values():
        names += [d for d in variant.get("train_detectors") or variant.get("detectors") or [] if d not in names]
    return names


def cv_jobs(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(experiment, variant) of every cross-validation job."""
    return [(name, variant) for name, cv in (config.get("cv") or {}).items() for variant in cv["variants"]]


def used_rankers(config: Mapping[str, Any]) -> list[str]:
    """Rankers some result needs, in config order."""
    needed = {res.ranker for res in expand(config)}
    return [name for name in config.get("rankers", {}) if name in needed]


#: preset files of ``confrank train --preset NAME`` (one YAML mapping of option names each)
PRESET_DIR = Path(__file__).resolve().parents[1] / "config" / "presets"
#: keys of a ranker entry that say what it trains on, not how
DATA_KEYS = ("datasets", "detectors", "train_detectors", "scales")
#: keys of a cv variant that say how it is cross-validated (nested, over a grid of candidates)
SEARCH_KEYS = ("grid", "inner_folds")


#: grids of candidate settings of ``confrank cv run --grid NAME`` (nested cross-validation)
GRID_DIR = PRESET_DIR.parent / "grids"


def grid_names() -> list[str]:
    """The grids shipped in :data:`GRID_DIR`, by name, sorted."""
    return sorted(p.stem for p in GRID_DIR.glob("*.yaml"))


def preset_names() -> list[str]:
    """The presets shipped in :data:`PRESET_DIR`, by name, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(value: str) -> Path:
    """The file of preset ``value``: a name in :data:`PRESET_DIR`, or a path to a .yaml file.

    Raises ConfrankError naming the file and the known presets when there is none.
    """
    path = Path(value)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{value}.yaml"
    if not path.is_file():
        raise ConfrankError(f"{path}: no such preset (known: {', '.join(preset_names())})")
    return path


def read_preset(value: str) -> dict[str, Any]:
    """The settings of preset ``value`` (see :func:`preset_path`) as a mapping of option names
    (as written in the file) to values; FormatError naming the file when it is not a YAML
    mapping. The one reader of presets: ``confrank train/rerank/cv --preset`` and the DAG."""
    import yaml

    path = preset_path(value)
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FormatError(path, "valid YAML", got=str(exc).splitlines()[0]) from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise FormatError(path, "a mapping of option names to values", got=type(values).__name__)
    return values


def resolve_ranker(ranker: Mapping[str, Any]) -> dict[str, Any]:
    """A ranker's effective settings: its preset's values, overridden by its own keys."""
    base = read_preset(ranker["preset"]) if ranker.get("preset") else {}
    return {**base, **{k: v for k, v in ranker.items() if k != "preset"}}


def ranker_settings(ranker: Mapping[str, Any], where: str = "ranker") -> tuple[Any, Any]:
    """(kind, settings) of a ranker entry (or cv variant) from the registry
    (:func:`pipeline.ranker.registry.settings_of`; imports no torch); ConfrankError naming
    ``where`` and the option when a value is not allowed."""
    from pipeline.ranker.registry import settings_of

    values = {k: v for k, v in resolve_ranker(ranker).items()
              if k not in DATA_KEYS and k not in SEARCH_KEYS and k != "split_half"}
    return settings_of(values, where)


def fuses(ranker: Mapping[str, Any]) -> bool:
    """Whether a ranker entry fuses several detectors' boxes (``confrank fuse``) rather than
    re-scoring one detector's (``confrank rerank``): what its kind declares in the registry."""
    return ranker_settings(ranker)[0].fuses


def reads_features(ranker: Mapping[str, Any]) -> bool:
    """Whether a ranker entry (or cv variant) reads per-box feature rows (``confrank features``)."""
    return ranker_settings(ranker)[0].reads == "features"


def ranker_args(ranker: Mapping[str, Any]) -> dict[str, Any]:
    """The command-line settings of a ranker: its own keys (the preset by name; the train
    rule's params also carry :func:`resolve_ranker`, so editing a preset file reruns it)."""
    return {k: v for k, v in ranker.items() if k not in DATA_KEYS}
