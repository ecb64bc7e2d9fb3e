"""The ranker options of ``confrank train`` and ``confrank cv run``, made from the settings
declarations (:mod:`pipeline.ranker.settings`), and ``--preset``.

Every option of every ranker kind is generated here from its dataclass field (name, type,
default, allowed values, bounds, help); a preset file sets any of them by option name, and
options given on the command line override the preset. The values reach the registry
(:func:`pipeline.ranker.registry.settings_of`) as ``{option name: value}``: a preset's list
stays a list, a list option typed on the command line is split at commas, once.
"""

from __future__ import annotations

from typing import Any

import click

from pipeline.config import preset_path, read_preset
from pipeline.errors import ConfrankError
from pipeline.ranker.settings import OptionSpec, option_specs, parse_list


class NameList(click.ParamType):
    """A comma-separated list of names (or a list, from a preset); checked against ``choices``."""

    name = "names"

    def __init__(self, choices: tuple[str, ...] | None = None):
        self.choices = choices

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        names = tuple(parse_list(value))
        bad = [n for n in names if self.choices is not None and n not in self.choices]
        if bad:
            self.fail(f"{bad[0]!r} is not one of {', '.join(self.choices)}", param, ctx)
        return names


def _click_type(spec: OptionSpec) -> click.ParamType:
    if spec.type == "list":
        return NameList(spec.choices)
    if spec.choices is not None:
        return click.Choice(spec.choices)
    if spec.type in ("int", "float"):
        kind = click.IntRange if spec.type == "int" else click.FloatRange
        if spec.minimum is None and spec.maximum is None:
            return click.INT if spec.type == "int" else click.FLOAT
        kwargs = {"min": spec.minimum, "max": spec.maximum}
        if spec.type == "float":
            kwargs["min_open"] = spec.exclusive_minimum
        return kind(**kwargs)
    return click.STRING


def _option(spec: OptionSpec):
    if spec.type == "bool":
        return click.option(f"{spec.flag}/--no-{spec.flag[2:]}", spec.name, default=spec.default, show_default=True,
                            help=spec.help)
    default = ",".join(spec.default) if spec.type == "list" else spec.default
    return click.option(spec.flag, spec.name, type=_click_type(spec), default=default, show_default=True,
                        help=spec.help)


def preset_values(value: str) -> dict[str, Any]:
    """Preset ``value`` (:func:`pipeline.config.read_preset`) as ``{option name: value}``;
    BadParameter naming the file on a missing or malformed file or on an unknown option name."""
    try:
        values = read_preset(value)
    except ConfrankError as exc:
        raise click.BadParameter(str(exc), param_hint="--preset") from exc
    known = option_specs()
    out = {}
    for key, item in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise click.BadParameter(f"{preset_path(value)}: {key!r} is not a ranker option "
                                     f"(known: {', '.join(sorted(known))})", param_hint="--preset")
        out[name] = item
    return out


def _apply_preset(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **preset_values(value)}
    return value


PRESET_OPTION = click.option(
    "--preset", callback=_apply_preset, is_eager=True,
    help="Fill every ranker option from config/presets/NAME.yaml (or a .yaml path); options given on the command "
         "line override it. cpu = the feature ranker with other detectors' evidence; cpu-single = one detector's "
         "boxes and its image; paper = seed 000 4.2.")


def ranker_options(func):
    """``--preset`` and every ranker option (:func:`pipeline.ranker.settings.option_specs`) on a command."""
    for spec in reversed(list(option_specs().values())):
        func = _option(spec)(func)
    return PRESET_OPTION(func)


def ranker_values(params: dict[str, Any]) -> dict[str, Any]:
    """The ranker option values among a command's parameters (``{option name: value}``)."""
    return {name: params[name] for name in option_specs() if name in params}
