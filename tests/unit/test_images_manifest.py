"""The artifact catalog: manifest parsing, declaration errors, merging with bootenvs."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.images.manifest import catalog, load_manifest, shipped_manifest
from appliance.images.spec import ArtifactError, ArtifactSpec, parse_artifact

SHA = "ab" * 32
OTHER_SHA = "cd" * 32


def entry(**over: object) -> dict[str, object]:
    data: dict[str, object] = {"name": "kernel", "source": "https://example.test/k/vmlinuz",
                               "sha256": SHA}
    data.update(over)
    return data


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("over", "needle"), [
    ({"sha256": "AB" * 32}, "field 'sha256': expected 64 lowercase hex digits"),
    ({"sha256": "ab" * 31}, "field 'sha256'"),
    ({"sha256": "md5:" + "ab" * 30}, "field 'sha256'"),
    ({"source": "relative/path.iso"}, "field 'source'"),
    ({"source": "ftp://example.test/x"}, "field 'source'"),
    ({"size": -1}, "field 'size'"),
    ({"size": True}, "field 'size'"),
    ({"path": "../escape"}, "field 'path'"),
    ({"path": "/abs/file"}, "field 'path'"),
    ({"extract": {"casper/vmlinuz": "a/../../b"}}, "field 'extract.casper/vmlinuz'"),
    ({"extract": ["casper/vmlinuz"]}, "field 'extract'"),
    ({"name": "bad name"}, "field 'name'"),
    ({"checksum": SHA}, "unknown field(s): checksum"),
])
def test_bad_declaration_names_entry_and_field(over: dict[str, object], needle: str) -> None:
    with pytest.raises(ArtifactError) as err:
        parse_artifact(entry(**over), "manifest.yaml: artifacts[3]")
    assert "manifest.yaml: artifacts[3]" in str(err.value)
    assert needle in str(err.value)


@pytest.mark.parametrize("missing", ["name", "source", "sha256"])
def test_missing_required_field(missing: str) -> None:
    data = entry()
    del data[missing]
    with pytest.raises(ArtifactError, match=f"field '{missing}'"):
        parse_artifact(data, "here")


def test_default_path_is_name_and_file_name() -> None:
    spec = parse_artifact(entry(), "here")
    assert spec.path == "kernel/vmlinuz"
    assert spec.is_url


def test_bad_entry_refused_others_load(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
artifacts:
  - name: good
    source: /srv/good.img
    sha256: {SHA}
  - name: bad
    source: /srv/bad.img
    sha256: not-a-checksum
  - name: also-good
    source: https://example.test/x.iso
    sha256: {OTHER_SHA}
    size: 10
""")
    specs, errors = load_manifest(path)
    assert [s.name for s in specs] == ["good", "also-good"]
    assert len(errors) == 1
    assert f"{path}: artifacts[1] (artifact bad): field 'sha256'" in errors[0]


def test_duplicate_name_in_manifest(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
artifacts:
  - {{name: twin, source: /srv/a.img, sha256: {SHA}}}
  - {{name: twin, source: /srv/b.img, sha256: {OTHER_SHA}}}
""")
    specs, errors = load_manifest(path)
    assert [s.source for s in specs] == ["/srv/a.img"]
    assert errors == [f"{path}: artifacts[1]: artifact 'twin' is already declared at "
                      f"artifacts[0]; the second is refused"]


@pytest.mark.parametrize(("text", "needle"), [
    ("artifacts: [\n", "cannot read manifest"),
    ("- a\n- b\n", "expected a mapping"),
    ("artifacts: {a: 1}\n", "field 'artifacts': expected a list"),
])
def test_broken_manifest_file(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    specs, errors = load_manifest(path)
    assert specs == []
    assert len(errors) == 1 and str(path) in errors[0] and needle in errors[0]


def test_unknown_top_level_key_reported(tmp_path: Path) -> None:
    path = write(tmp_path, f"artefacts: []\nartifacts:\n  - {{name: a, source: /x, "
                           f"sha256: {SHA}}}\n")
    specs, errors = load_manifest(path)
    assert [s.name for s in specs] == ["a"]
    assert errors == [f"{path}: unknown top-level field(s): artefacts"]


def test_missing_or_empty_manifest_is_empty(tmp_path: Path) -> None:
    assert load_manifest(tmp_path / "none.yaml") == ([], [])
    assert load_manifest(write(tmp_path, "")) == ([], [])


def spec(name: str, source: str = "/srv/x", sha: str = SHA, **kw: object) -> ArtifactSpec:
    return parse_artifact({"name": name, "source": source, "sha256": sha, **kw}, "test")


def test_catalog_merges_and_accepts_identical_duplicates() -> None:
    shared = spec("iso", "https://example.test/os.iso")
    found, errors = catalog([spec("tool")], {"rocky-9": [shared], "alma-9": [shared]})
    assert errors == []
    assert set(found) == {"tool", "iso"}


def test_catalog_conflicting_duplicate_names_both_places() -> None:
    found, errors = catalog([spec("iso", sha=SHA)], {"rocky-9": [spec("iso", sha=OTHER_SHA)]},
                            manifest_where="images/manifest.yaml")
    assert found["iso"].sha256 == SHA
    assert errors == ["artifact 'iso' is declared differently in images/manifest.yaml and in "
                      "bootenv rocky-9; the one in bootenv rocky-9 is refused"]


def test_catalog_refuses_two_artifacts_writing_one_file() -> None:
    a = spec("a", extract={"casper/vmlinuz": "shared/vmlinuz"})
    b = spec("b", path="shared/vmlinuz")
    found, errors = catalog([a], {"ubuntu-24.04": [b]}, manifest_where="m.yaml")
    assert set(found) == {"a"}
    assert errors == ["bootenv ubuntu-24.04: artifact 'b' would write 'shared/vmlinuz', which "
                      "artifact 'a' of m.yaml writes; refused"]


def test_shipped_manifest_is_valid() -> None:
    path = shipped_manifest()
    assert path is not None and path.is_file()
    specs, errors = load_manifest(path)
    assert errors == []
    assert specs, "the shipped manifest declares at least one artifact"
    found, errors = catalog(specs, {})
    assert errors == []
