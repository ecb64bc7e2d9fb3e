"""``confrank weights fetch|add|verify|list`` and ``confrank detectors``.

The cache folder is ``--cache-dir``, else ``$CONFRANK_WEIGHTS``, else the user cache
(``~/.cache/confrank/weights``); see :mod:`pipeline.detectors.weights`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.detectors import weights as W
from pipeline.detectors.registry import DETECTORS, DetectorInfo
from pipeline.errors import ConfrankError

cache_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help=f"Weights cache folder [default: ${W.CACHE_ENV}, else ~/.cache/confrank/weights].",
)


def _root(cache_dir: Path | None) -> Path:
    return W.cache_dir() if cache_dir is None else cache_dir


@click.group("weights")
def cli() -> None:
    """Fetch, add, verify or list detector weights (every file is pinned by sha256)."""


@cli.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--all", "fetch_all", is_flag=True, help="Fetch every entry that has a download source.")
@click.option("--force", is_flag=True, help="Download again even when a verified file is present.")
@cache_option
def fetch_cmd(names: tuple[str, ...], fetch_all: bool, force: bool, cache_dir: Path | None) -> None:
    """Download weights NAMES into the cache and verify their sha256."""
    if fetch_all == bool(names):
        raise click.UsageError("give weights names or --all (not both)")
    if fetch_all:
        names = tuple(n for n, e in W.REGISTRY.items() if e.sources)
    for name, path in W.fetch_many(names, _root(cache_dir), force=force).items():
        click.echo(f"{name}\t{path}")


@cli.command("add")
@click.option("--name", required=True, help="Registry name, e.g. Resnet50_Final.")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@cache_option
def add_cmd(name: str, path: Path, cache_dir: Path | None) -> None:
    """Copy a local weights file into the cache (pinning it when the registry has no sha256)."""
    dest = W.add(name, path, _root(cache_dir))
    click.echo(f"{name}\t{dest}\tsha256 {W.expected_sha256(name, dest.parent)}")


@cli.command("verify")
@click.argument("names", nargs=-1)
@cache_option
def verify_cmd(names: tuple[str, ...], cache_dir: Path | None) -> None:
    """Check sha256 of NAMES (default: every file present in the cache).

    Exits 1 when a file does not match, or when a NAME given is missing.
    """
    root = _root(cache_dir)
    statuses = W.verify(names or None, root)
    if not names:
        statuses = [s for s in statuses if s.state != "missing"]
    for s in statuses:
        click.echo(f"{s.name}\t{s.state}\t{s.path}")
    bad = [s for s in statuses if s.state != "ok"]
    if bad:
        raise ConfrankError(bad[0].message() + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    if not statuses:
        click.echo(f"no weights in {root}")


@cli.command("list")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@cache_option
def list_cmd(fmt: str, cache_dir: Path | None) -> None:
    """Every registry entry: file, pinned sha256, sources and its state in the cache."""
    root = _root(cache_dir)
    rows = []
    for st in W.verify(None, root):
        e = W.entry(st.name)
        rows.append({
            "name": e.name, "file": e.filename, "state": st.state,
            "sha256": st.expected, "pinned": e.sha256 is not None,
            "sources": [s.describe() for s in e.sources], "description": e.description,
        })
    if fmt == "json":
        click.echo(json.dumps({"cache": str(root), "weights": rows}, indent=2))
        return
    click.echo(f"cache: {root}")
    for r in rows:
        source = ", ".join(r["sources"]) or "add by hand"
        click.echo(f"{r['name']:32s} {r['state']:9s} {(r['sha256'] or '(pinned on add)')[:16]:16s} {source}")


def detector_status(info: DetectorInfo, root: Path) -> tuple[str, str]:
    """(state, detail) of one detector: ready / missing / mismatch / unavailable."""
    reason = info.unavailable_reason()
    if reason:
        return "unavailable", reason
    statuses = W.verify(info.weights, root)
    wrong = [s for s in statuses if s.state == "mismatch"]
    if wrong:
        return "mismatch", "; ".join(f"{s.path.name}: expected sha256 {s.expected}, got {s.actual}" for s in wrong)
    missing = [s for s in statuses if s.state != "ok"]
    if missing:
        return "missing", "; ".join(f"{s.name}: {W.how_to_get(s.name)}" for s in missing)
    return "ready", ", ".join(f"{s.name} verified" for s in statuses) or "no weights needed"


@click.command("detectors")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@cache_option
def detectors_cli(fmt: str, cache_dir: Path | None) -> None:
    """List every detector with the status of its weights in the cache."""
    root = _root(cache_dir)
    rows = []
    for info in DETECTORS.values():
        state, detail = detector_status(info, root)
        rows.append({"detector": info.name, "state": state, "detail": detail,
                     "weights": list(info.weights), "cpu_only": info.cpu_only,
                     "description": info.description})
    if fmt == "json":
        click.echo(json.dumps({"cache": str(root), "detectors": rows}, indent=2))
        return
    click.echo(f"weights cache: {root}")
    for r in rows:
        click.echo(f"{r['detector']:24s} {r['state']:11s} {r['detail']}")
