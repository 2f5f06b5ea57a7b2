"""Fixtures of the VM boot tests: the discovery and deploy images (one initrd built once
by images/build-initrd.sh, cached outside the repository), the accelerator (KVM if a probe
boot proves it works, else TCG), and a summary of what ran at the end of the pytest
output."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.e2e import vm
from tests.e2e.bmcvm import bmc_vm_factory  # noqa: F401 - a fixture for the tests

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "images" / "build-discovery.sh"
DEPLOY_BUILD_SCRIPT = REPO / "images" / "build-deploy.sh"
OS_IMAGE_BUILD_SCRIPT = REPO / "images" / "build-debian-image.sh"
#: Seconds the OS image build may take (mmdebstrap from the mirror: about 2.5 min here;
#: from the cache: seconds).
OS_IMAGE_BUILD_TIMEOUT = float(os.environ.get("APPLIANCE_E2E_OS_IMAGE_BUILD_TIMEOUT", "1800"))

#: Lines printed in the terminal summary (accelerator, boot times).
SUMMARY: list[str] = []


def say(config: pytest.Config, line: str) -> None:
    """Print a line now, even with output capture on, and again in the summary."""
    SUMMARY.append(line)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(line)
    else:
        print(line)


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if SUMMARY:
        terminalreporter.section("e2e")
        for line in SUMMARY:
            terminalreporter.write_line(line)


def _missing_or_skip(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"e2e prerequisite missing: {what}")
    pytest.skip(f"e2e prerequisite missing: {what}")


@pytest.fixture(scope="session")
def vm_host() -> None:
    """Root, QEMU, OVMF and Debian's iPXE loaders are there (CI fails, a developer skips)."""
    require_root()
    if shutil.which(vm.QEMU) is None:
        _missing_or_skip("qemu-system-x86_64 (apt-get install qemu-system-x86)")
    for path, pkg in ((vm.OVMF_CODE, "ovmf"), (vm.OVMF_VARS, "ovmf"),
                      (Path("/usr/lib/ipxe/undionly.kpxe"), "ipxe"),
                      (Path("/usr/lib/ipxe/ipxe.efi"), "ipxe"),
                      (Path("/usr/lib/ipxe/qemu/pxe-virtio.rom"), "ipxe-qemu")):
        if not path.exists():
            _missing_or_skip(f"{path} (apt-get install {pkg})")


def _build_images(script: Path, what: str, tmp_path_factory, pytestconfig) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp(f"{what}-images")
    proc = subprocess.run(["bash", str(script), str(out)], capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    for line in proc.stdout.split("\n"):
        if line.strip():
            say(pytestconfig, f"e2e: {what} image {line.strip()}")
    for name in ("vmlinuz", "initrd.img"):
        assert (out / name).stat().st_size > 0, f"{name} not built"
    return out


@pytest.fixture(scope="session")
def discovery_images(vm_host, tmp_path_factory, pytestconfig) -> Path:  # type: ignore[no-untyped-def]
    """vmlinuz + initrd.img built by images/build-discovery.sh (cached across runs in
    $APPLIANCE_BUILD_CACHE, default /var/cache/appliance-build)."""
    return _build_images(BUILD_SCRIPT, "discovery", tmp_path_factory, pytestconfig)


@pytest.fixture(scope="session")
def deploy_images(vm_host, tmp_path_factory, pytestconfig) -> Path:  # type: ignore[no-untyped-def]
    """vmlinuz + initrd.img of the image-deploy bootenv, built by images/build-deploy.sh
    (the same initrd as discovery, so a second build is only a reinstall from the cache)."""
    return _build_images(DEPLOY_BUILD_SCRIPT, "deploy", tmp_path_factory, pytestconfig)


@dataclass(frozen=True)
class OSImage:
    """An OS disk image for image-deploy: the file and the sha256 of its bytes."""

    path: Path
    sha256: str
    buildinfo: dict[str, str]


def build_debian_image(outdir: Path) -> tuple[OSImage, str]:
    """Run images/build-debian-image.sh into ``outdir`` (cached in $APPLIANCE_BUILD_CACHE:
    seconds when its inputs did not change); return the image and the build's stderr."""
    proc = subprocess.run(["bash", str(OS_IMAGE_BUILD_SCRIPT), str(outdir)],
                          capture_output=True, text=True, timeout=OS_IMAGE_BUILD_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{OS_IMAGE_BUILD_SCRIPT} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    (line,) = [x for x in proc.stdout.splitlines() if x.strip()][-1:]
    sha256, name = line.split()
    path = outdir / name
    assert len(sha256) == 64 and path.stat().st_size > 0, line
    info = {}
    for row in (outdir / "debian-12-amd64.buildinfo").read_text().splitlines():
        key, _, value = row.partition("=")
        if key not in ("package", "source"):  # (one line per package, per source)
            info[key] = value
    return OSImage(path, sha256, info), proc.stderr


@pytest.fixture(scope="session")
def debian_image(vm_host, tmp_path_factory, pytestconfig) -> OSImage:  # type: ignore[no-untyped-def]
    """A minimal Debian 12 OS image (raw MBR/ext4 disk, extlinux, cloud-init, growpart),
    zstd-compressed, built by images/build-debian-image.sh: ``.path`` (the .raw.zst to
    import with ``appliance images import PATH --sha256 HEX``), ``.sha256``, ``.buildinfo``
    (raw_bytes, raw_sha256, kernel_release, ...)."""
    try:
        image, _ = build_debian_image(tmp_path_factory.mktemp("os-image"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    say(pytestconfig, f"e2e: OS image {image.path.name} {image.sha256} "
                      f"({image.path.stat().st_size // 1048576} MiB, raw "
                      f"{int(image.buildinfo['raw_bytes']) // 1048576} MiB)")
    return image


@pytest.fixture(scope="session")
def accel(discovery_images, tmp_path_factory, pytestconfig) -> vm.Accel:  # type: ignore[no-untyped-def]
    chosen = vm.choose_accel(discovery_images, tmp_path_factory.mktemp("accel-probe"))
    say(pytestconfig, chosen.banner())
    return chosen


@pytest.fixture
def bootnet(vm_host, discovery_images, namespace, tmp_path):  # type: ignore[no-untyped-def]
    """The isolated boot network with the appliance serving the discovery image on it."""
    from tests.e2e.bootnet import serving

    images = {f"discovery/{name}": discovery_images / name
              for name in ("vmlinuz", "initrd.img")}
    with serving(namespace, tmp_path, images) as net:
        yield net
