"""TFTP path policy: what a requested name may resolve to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.tftp.paths import (
    ACCESS_VIOLATION,
    FILE_NOT_FOUND,
    PathPolicy,
    Refused,
    check_name,
    split_targets,
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "undionly.kpxe").write_bytes(b"loader")
    (root / "sub" / "file.bin").write_bytes(b"x" * 10)
    (tmp_path / "secret").write_text("top secret")
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "ipxe.efi").write_bytes(b"efi")
    os.symlink(tmp_path / "secret", root / "escape")
    os.symlink("sub/file.bin", root / "inside-link")
    os.symlink(tmp_path / "allowed" / "ipxe.efi", root / "ipxe.efi")
    os.symlink(tmp_path, root / "dirlink")
    return root


def refused(policy: PathPolicy, name: str) -> Refused:
    with pytest.raises(Refused) as info:
        policy.resolve(name)
    return info.value


def test_plain_and_nested_names_resolve(tree: Path) -> None:
    policy = PathPolicy(str(tree))
    assert policy.resolve("undionly.kpxe").size == 6
    assert policy.resolve("sub/file.bin").size == 10
    assert policy.resolve("./sub//file.bin").path == str(tree / "sub" / "file.bin")
    # Windows-style separators are accepted as separators
    assert policy.resolve("sub\\file.bin").size == 10


@pytest.mark.parametrize("name", [
    "../secret", "sub/../../secret", "..", "sub/..", "..\\secret", "sub\\..\\..\\secret",
])
def test_dotdot_is_an_access_violation(tree: Path, name: str) -> None:
    assert refused(PathPolicy(str(tree)), name).code == ACCESS_VIOLATION


@pytest.mark.parametrize("name", ["/etc/passwd", "//etc/passwd", "\\etc\\passwd", "C:\\x",
                                  "c:/boot.ini"])
def test_absolute_paths_are_access_violations(tree: Path, name: str) -> None:
    assert refused(PathPolicy(str(tree)), name).code == ACCESS_VIOLATION


def test_absolute_path_inside_root_is_still_refused(tree: Path) -> None:
    # tftpy's stock server accepts names that start with the root; we do not.
    exc = refused(PathPolicy(str(tree)), str(tree / "undionly.kpxe"))
    assert exc.code == ACCESS_VIOLATION


def test_nul_byte_refused(tree: Path) -> None:
    assert refused(PathPolicy(str(tree)), "undionly.kpxe\0../../secret").code == ACCESS_VIOLATION


def test_symlink_escaping_root_refused(tree: Path) -> None:
    policy = PathPolicy(str(tree))
    assert refused(policy, "escape").code == ACCESS_VIOLATION
    assert refused(policy, "dirlink/secret").code == ACCESS_VIOLATION
    assert refused(policy, "ipxe.efi").code == ACCESS_VIOLATION   # not allowed by default


def test_symlink_inside_root_and_to_allowed_target(tree: Path) -> None:
    allowed = split_targets(str(tree.parent / "allowed" / "ipxe.efi"))
    policy = PathPolicy(str(tree), allowed)
    assert policy.resolve("inside-link").size == 10
    assert policy.resolve("ipxe.efi").size == 3
    # Allowing one file does not open its directory or anything else
    assert refused(policy, "escape").code == ACCESS_VIOLATION
    assert refused(policy, "dirlink/secret").code == ACCESS_VIOLATION
    # What counts is the real file: reaching the allowed one by another link is fine
    assert policy.resolve("dirlink/allowed/ipxe.efi").size == 3


def test_allowed_target_directory_covers_its_contents(tree: Path) -> None:
    policy = PathPolicy(str(tree), split_targets(str(tree.parent / "allowed")))
    assert policy.resolve("ipxe.efi").size == 3
    assert refused(policy, "escape").code == ACCESS_VIOLATION


def test_missing_directory_and_empty_are_not_found(tree: Path) -> None:
    policy = PathPolicy(str(tree))
    assert refused(policy, "nope.bin").code == FILE_NOT_FOUND
    assert refused(policy, "sub").code == FILE_NOT_FOUND
    assert refused(policy, "").code == FILE_NOT_FOUND
    assert refused(policy, "./").code == FILE_NOT_FOUND


def test_check_name_returns_components() -> None:
    assert check_name("a/./b//c") == ["a", "b", "c"]
    assert check_name("a\\b") == ["a", "b"]


def test_debian_ipxe_default_targets_are_allowed() -> None:
    from appliance.config import TftpConfig

    cfg = TftpConfig()
    policy = PathPolicy(cfg.root, split_targets(cfg.symlink_targets))
    if not os.path.exists("/usr/lib/ipxe/ipxe.efi"):
        pytest.skip("Debian's ipxe package is not installed")
    assert policy.resolve("ipxe.efi").size > 0          # a symlink into /boot
    assert policy.resolve("undionly.kpxe").size > 0
