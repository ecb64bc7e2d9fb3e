"""Every ranker setting, declared once: dataclasses whose fields carry their option.

A field made with :func:`option` is a user-facing setting: its metadata holds the option name
(``gbm_trees``; on the command line ``--gbm-trees``), a help text, the allowed values and the
bounds. From these declarations come

- the click options of ``confrank train`` and ``confrank cv run`` (``stages/ranker_options.py``),
- the settings a preset file or a config entry may set (:func:`option_specs`), and
- the JSON schema of a config's ranker entry (:func:`json_schema`; ``tests/test_ranker_registry.py``
  checks that ``config/config.schema.yaml`` holds exactly this).

One option name may belong to several settings classes (``seed``); it then has one default.
Loss names are :data:`LOSSES` everywhere (CLI, config, presets, checkpoints).

No torch or LightGBM is imported here: the config checks and the light commands use it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfrankError

#: losses of the network ranker (pipeline.ranker.losses implements them)
LOSSES = ("pairwise", "ce", "l1", "l2", "smoothl1")
#: image branches of the network ranker: seed 000's FPN, or none (the box-only model)
IMAGE_BRANCHES = ("fpn", "none")
#: backbones of the FPN image branch (pipeline.ranker.model.BACKBONES builds them)
BACKBONE_NAMES = ("resnet50", "mobilenet")
#: how the network's residual meets the detector confidence (see RankerConfig)
OUTPUTS = ("clip", "logit")
#: objectives of the feature ranker (pipeline.ranker.gbm)
OBJECTIVES = ("binary", "cross_entropy", "lambdarank", "rank_xendcg", "pairwise")
#: ranker kinds (pipeline.ranker.registry.KINDS implements each)
KIND_NAMES = ("network", "gbm", "fusion")
#: per-box feature groups of the feature ranker (pipeline.ranker.features)
FEATURE_GROUPS = ("own", "neighbours", "evidence", "image")


@dataclass(frozen=True)
class OptionSpec:
    """One user-facing setting: its option name, value type and what values it accepts."""

    name: str
    field: str
    type: str  # "int", "float", "str", "bool", "list"
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, where: str) -> None:
        """ConfrankError naming ``where`` when ``value`` is not allowed."""
        items = list(value) if self.type == "list" else [value]
        for item in items:
            if self.choices is not None and item not in self.choices:
                raise ConfrankError(f"{where}: {item!r} is not one of {', '.join(self.choices)}")
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                low_bad = self.minimum is not None and (item <= self.minimum if self.exclusive_minimum else item < self.minimum)
                if low_bad or (self.maximum is not None and item > self.maximum):
                    bound = f"{'>' if self.exclusive_minimum else '>='} {self.minimum}" if low_bad else f"<= {self.maximum}"
                    raise ConfrankError(f"{where}: {item!r} must be {bound}")


def option(default: Any, help: str, *, name: str | None = None, choices: Iterable[str] | None = None,
           minimum: float | None = None, maximum: float | None = None, exclusive_minimum: bool = False) -> Any:
    """A dataclass field that is also an option (``name`` defaults to the field's name)."""
    meta = {"option": {"name": name, "help": help, "choices": tuple(choices) if choices is not None else None,
                       "minimum": minimum, "maximum": maximum, "exclusive_minimum": exclusive_minimum}}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


_TYPES = {"int": "int", "float": "float", "str": "str", "bool": "bool"}


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return "list"
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _type_name(args[0])
    return _TYPES[annotation.__name__]


def specs_of(cls: type) -> list[OptionSpec]:
    """The :class:`OptionSpec` of every option field of dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("option")
        if meta is None:
            continue
        out.append(OptionSpec(name=meta["name"] or f.name, field=f.name, type=_type_name(hints[f.name]),
                              default=f.default, help=meta["help"], choices=meta["choices"], minimum=meta["minimum"],
                              maximum=meta["maximum"], exclusive_minimum=meta["exclusive_minimum"]))
    return out


def build(cls: type, values: Mapping[str, Any], where: str = "ranker settings"):
    """An instance of settings class ``cls`` from option values (option names as keys; the
    options ``values`` lacks keep their defaults, keys of other classes are ignored)."""
    kwargs = {}
    for spec in specs_of(cls):
        if spec.name in values and values[spec.name] is not None:
            value = values[spec.name]
            if spec.type == "list":
                value = tuple(parse_list(value))
            spec.check(value, f"{where}: {spec.name}")
            kwargs[spec.field] = value
    return cls(**kwargs)


def to_options(settings: Any) -> dict[str, Any]:
    """``{option name: value}`` of a settings instance (lists as lists): what a preset holds."""
    return {spec.name: list(getattr(settings, spec.field)) if spec.type == "list" else getattr(settings, spec.field)
            for spec in specs_of(type(settings))}


def parse_list(value: Any) -> list[str]:
    """A list option's value from a list/tuple or a comma-separated string ("" = empty)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


# ----------------------------------------------------------------------------- the settings classes


@dataclass(frozen=True)
class RankerConfig:
    """Everything needed to rebuild a ranker network (stored in model.pt).

    ``image_branch="none"`` selects the box-only model (``backbone`` is then unused).
    ``output`` is how the residual meets the detector confidence c: ``clip`` (the paper:
    clip(c + r, 0, 1)) or ``logit`` (sigmoid(logit(c) + r): never saturates, so no two boxes
    are tied at 0 or 1 and every box keeps a gradient).
    ``width`` is the FPN / confidence-module width (None: the backbone's default, 256 for
    resnet50, 64 for mobilenet). ``image_size`` is the letterbox side in pixels.
    """

    num_boxes: int = option(5000, "Boxes per image the network sees (N; the rest keep their score).", minimum=2)
    backbone: str = option("resnet50", "Backbone of the FPN image branch.", choices=BACKBONE_NAMES)
    image_branch: str = option("fpn", "fpn = seed 000's image branch; none = image-free per-box MLP on box statistics.",
                               choices=IMAGE_BRANCHES)
    width: int | None = None
    bpn_channels: int = 64
    bpn_layers: int = 9
    image_size: int = option(640, "Letterbox side in pixels (long side resized to it, then padded).", minimum=32)
    stats_topk: int = 4
    hidden: int = 64
    output: str = option("clip", "clip(c + r, 0, 1) as in the paper, or sigmoid(logit(c) + r), which never saturates.",
                         choices=OUTPUTS)

    def __post_init__(self) -> None:
        if self.image_branch not in IMAGE_BRANCHES:
            raise ConfrankError(f"image branch must be one of {IMAGE_BRANCHES}, got {self.image_branch!r}")
        if self.image_branch == "fpn" and self.backbone not in BACKBONE_NAMES:
            raise ConfrankError(f"backbone must be one of {sorted(BACKBONE_NAMES)}, got {self.backbone!r}")
        if self.output not in OUTPUTS:
            raise ConfrankError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.num_boxes < 2:
            raise ConfrankError(f"num_boxes must be at least 2, got {self.num_boxes}")
        if self.bpn_layers % 3 or self.bpn_layers < 3:
            raise ConfrankError(f"bpn_layers must be a positive multiple of 3, got {self.bpn_layers}")

    @property
    def uses_image(self) -> bool:
        return self.image_branch != "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of the network ranker (defaults: seed 000, section 4.2)."""

    iterations: int = option(100_000, "Training steps.", minimum=1)
    batch_size: int = option(32, "Samples (image x detector) per step.", minimum=1)
    lr: float = option(1e-3, "Adam learning rate at the first step.", minimum=0, exclusive_minimum=True)
    lr_final: float = option(1e-6, "Learning rate at the last step (exponential decay).", minimum=0,
                             exclusive_minimum=True)
    loss: str = option("pairwise", "pairwise = seed 000's ranking loss on neighbour pairs; ce / l1 / l2 / smoothl1 "
                       "regress the oracle confidence.", choices=LOSSES)
    n_pairs: int = option(10, "Pairwise loss: pairs (i, i+k) for k = 1..n.", minimum=1)
    margin: float = option(0.0, "Margin rescaling factor of the pairwise loss (0 = off; 1 is the usual choice).",
                           minimum=0)
    log_every: int = option(10, "Steps (network) or trees (gbm) between two rows of the training log.", minimum=1)
    seed: int = option(0, "Random seed of the model and the data order.")
    pretrained: bool = option(False, "Start the backbone from torchvision's ImageNet weights (torch hub cache or "
                              "download).")

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.iterations < 1 or self.batch_size < 1 or self.log_every < 1:
            raise ValueError("iterations, batch_size and log_every must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GbmConfig:
    """Settings of the feature ranker (gradient-boosted trees on per-box features); the
    defaults are the ``cpu`` preset's, chosen by cross-validation (docs/ranker-results.md)."""

    objective: str = option("binary", "binary: P(IoU with a face >= 0.5); cross_entropy: the IoU as a soft label; "
                            "lambdarank / rank_xendcg: LightGBM's rankers within an image; pairwise: seed 000's "
                            "pairwise loss on neighbour pairs within an image.", name="gbm_objective",
                            choices=OBJECTIVES)
    trees: int = option(150, "Boosting rounds.", name="gbm_trees", minimum=1)
    learning_rate: float = option(0.1, "Shrinkage of each tree.", name="gbm_learning_rate", minimum=0, maximum=1,
                                  exclusive_minimum=True)
    leaves: int = option(31, "Leaves per tree.", name="gbm_leaves", minimum=2)
    min_leaf: int = option(50, "Fewest boxes in a leaf.", name="gbm_min_leaf", minimum=1)
    feature_fraction: float = 0.9
    bagging_fraction: float = 0.8
    l2: float = 1.0
    max_bin: int = 63
    seed: int = option(0, "Random seed of the model and the data order.")
    #: detectors whose boxes are evidence for each other (a box's own detector is left out)
    evidence: tuple[str, ...] = option((), "Detectors whose boxes are evidence for each other's (comma-separated); "
                                       "empty = the box's own detector only.")
    #: the feature groups the trees read (pipeline.ranker.features.GROUPS)
    features: tuple[str, ...] = option(("own", "neighbours", "evidence"), "Feature groups the trees read "
                                       "(comma-separated): own, neighbours, evidence (needs --evidence), image "
                                       "(needs `confrank image-features` shards).", name="gbm_features",
                                       choices=FEATURE_GROUPS)
    #: pairwise objective: the margin of seed 000's table 1 (0 = off)
    pair_margin: float = option(0.0, "pairwise objective: margin rescaling of the pair loss (seed 000, table 1).",
                                name="gbm_pair_margin", minimum=0)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfrankError(f"gbm objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if (self.trees < 1 or self.leaves < 2 or self.min_leaf < 1 or self.max_bin < 2
                or not 0 < self.learning_rate <= 1):
            raise ConfrankError(f"gbm settings out of range: {self}")
        object.__setattr__(self, "evidence", tuple(self.evidence))
        object.__setattr__(self, "features", tuple(self.features))
        unknown = sorted(set(self.features) - set(FEATURE_GROUPS))
        if unknown or not self.features:
            raise ConfrankError(f"gbm features {list(self.features)}: expected one or more of {', '.join(FEATURE_GROUPS)}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["evidence"], out["features"] = list(self.evidence), list(self.features)
        return out

    @property
    def evidence_set(self) -> tuple[str, ...]:
        """The detectors whose boxes the rows it reads must be described with (none when the
        evidence group is not read)."""
        return self.evidence if "evidence" in self.features else ()

    @property
    def image_features(self) -> bool:
        """Whether it reads the image evidence columns (``confrank image-features``)."""
        return "image" in self.features


@dataclass(frozen=True)
class NetworkSettings:
    """The settings of a network ranker: the model's and the optimisation's."""

    model: RankerConfig = field(default_factory=RankerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evidence_set = ()
    image_features = False

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": self.train.to_dict()}


def network_settings(values: Mapping[str, Any], where: str = "ranker settings") -> NetworkSettings:
    """:class:`NetworkSettings` of option ``values``."""
    return NetworkSettings(build(RankerConfig, values, where), build(TrainConfig, values, where))


def gbm_settings(values: Mapping[str, Any], where: str = "ranker settings") -> GbmConfig:
    """:class:`GbmConfig` of option ``values``; ConfrankError when the evidence group is read
    without an evidence set (its columns would be zeros)."""
    config = build(GbmConfig, values, where)
    if "evidence" in config.features and not config.evidence:
        raise ConfrankError(f"{where}: the feature ranker reads the evidence group, so it needs --evidence (the "
                            "detectors whose boxes are evidence), or --gbm-features without 'evidence'")
    return config


@dataclass(frozen=True)
class FusionConfig:
    """The clustering of the learned fusion (pipeline.ranker.fusion)."""

    fusion_iou: float = option(0.55, "fusion: IoU (continuous) at or above which a box joins a cluster's best box "
                               "(WBF's iou_thr).", minimum=0, maximum=1, exclusive_minimum=True)


@dataclass(frozen=True)
class FusionSettings:
    """The settings of a learned fusion: its trees (``gbm``; ``evidence`` = the detectors fused),
    the clustering IoU and the NMS IoU before and after clustering (0.4, as ``confrank nms``)."""

    gbm: GbmConfig
    fusion_iou: float = 0.55
    nms_iou: float = 0.4
    image_features = False

    @property
    def evidence_set(self) -> tuple[str, ...]:
        return self.gbm.evidence

    def to_dict(self) -> dict[str, Any]:
        return {"gbm": self.gbm.to_dict(), "fusion_iou": self.fusion_iou, "nms_iou": self.nms_iou}


def fusion_settings(values: Mapping[str, Any], where: str = "ranker settings") -> FusionSettings:
    """:class:`FusionSettings` of option ``values``; ConfrankError without two detectors to fuse."""
    gbm = build(GbmConfig, values, where)
    if len(gbm.evidence) < 2:
        raise ConfrankError(f"{where}: a fusion ranker needs --evidence with the two or more detectors it fuses")
    return FusionSettings(gbm, build(FusionConfig, values, where).fusion_iou)


@dataclass(frozen=True)
class KindChoice:
    """The setting every ranker entry has: which kind of ranker it is."""

    model: str = option("network", "The ranker kind (pipeline.ranker.registry): network = seed 000's ranker network; "
                        "gbm = gradient-boosted trees on per-box features; fusion = a learned fusion of several detectors' "
                        "boxes (`confrank fuse`).", choices=KIND_NAMES)


#: every settings class, in the order their options are listed
SETTINGS_CLASSES: tuple[type, ...] = (KindChoice, GbmConfig, FusionConfig, RankerConfig, TrainConfig)


def option_specs() -> dict[str, OptionSpec]:
    """Every ranker option by name (one entry per name; shared names must agree on default)."""
    out: dict[str, OptionSpec] = {}
    for cls in SETTINGS_CLASSES:
        for spec in specs_of(cls):
            if spec.name in out and out[spec.name].default != spec.default:
                raise AssertionError(f"option {spec.name!r} has two defaults: {out[spec.name].default!r}, {spec.default!r}")
            out.setdefault(spec.name, spec)
    return out


def json_schema() -> dict[str, dict[str, Any]]:
    """The JSON schema (``properties``) of every ranker option, as config/config.schema.yaml
    declares them under ``$defs.ranker_settings``."""
    kinds = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}
    out = {}
    for name, spec in option_specs().items():
        if spec.type == "list":
            items: dict[str, Any] = {"type": "string"}
            if spec.choices is not None:
                items["enum"] = list(spec.choices)
            out[name] = {"type": "array", "items": items}
            continue
        entry: dict[str, Any] = {"type": kinds[spec.type]}
        if spec.choices is not None:
            entry["enum"] = list(spec.choices)
        if spec.minimum is not None:
            entry["exclusiveMinimum" if spec.exclusive_minimum else "minimum"] = spec.minimum
        if spec.maximum is not None:
            entry["maximum"] = spec.maximum
        out[name] = entry
    return out
