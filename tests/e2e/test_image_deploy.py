"""image-deploy: a VM PXE-boots the appliance's deploy initrd, which streams an OS image
onto its blank disk, checks the sha256 and reports the install finished.

Per test: the isolated boot network of tests/e2e/bootnet.py, a SeaBIOS VM with a blank
qcow2 disk (virtio), and an image made here: 16 MiB with a recognisable header, random
and compressible parts, compressed with zstd or gzip, imported into the appliance's image
store with ``appliance images import PATH --sha256 HEX``. The machine is enrolled and
configured with the CLI only (global profile keys, ``machine add``, ``machine set
--bootenv image-deploy --param image=... --param image_sha256=...``). Then

    DHCP -> iPXE script -> deploy kernel + initrd -> deploy.env -> image streamed through
    sha256sum and the decompressor onto /dev/vda -> log lines + done posted -> power off

and the test checks both ends: the console markers, the install-finished event, the
bootenv now ``local``, the posted log lines (with the warning that the image has no
/etc/cloud to write the cloud-init datasource config to), and the disk's first bytes
(read back with ``qemu-img convert``) equal to the image. With a wrong sha256 the deploy must fail
loudly: ``APPLIANCE-DEPLOY-FAILED`` naming the mismatch, the first MiB of the disk
wiped, no install-finished event, the bootenv still image-deploy.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ApplianceProcess
from tests.e2e import vm
from tests.e2e.bootnet import BRIDGE, serving
from tests.e2e.conftest import say

MIB = 1024 * 1024
IMAGE_SIZE = 16 * MIB
HEADER = b"APPLIANCE-E2E-DEPLOY-IMAGE v1\n"
#: QEMU start -> deploy done (or failed). TCG here: the BIOS PXE chain is 55-100 s, the
#: 16 MiB write a few seconds; generous because other tests may load the machine.
TIMEOUT = float(os.environ.get("APPLIANCE_E2E_DEPLOY_TIMEOUT", "420"))
KEYS = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2eDeployDeployDeployDeployDeployDeployDe e2e@deploy\n"


def _json(app: ApplianceProcess, *args: str):  # type: ignore[no-untyped-def]
    return json.loads(app.cli(*args, "--json").stdout)


def make_image(workdir: Path, compression: str) -> tuple[bytes, Path]:
    """(the raw image, the compressed file): a header sector, 6 MiB of random bytes, then
    a repeating pattern, so the decompressor has real work and nothing is all zeros."""
    rng = random.Random(f"appliance-e2e-{compression}")
    raw = HEADER.ljust(512, b"\0") + rng.randbytes(6 * MIB - 512)
    pattern = b"".join(i.to_bytes(4, "little") for i in range(1024))
    raw += (pattern * (IMAGE_SIZE // len(pattern)))[: IMAGE_SIZE - len(raw)]
    assert len(raw) == IMAGE_SIZE
    if compression == "zstd":
        path = workdir / "e2e-disk.raw.zst"
        subprocess.run(["zstd", "-q", "-3", "-f", "-o", str(path)], input=raw, check=True,
                       timeout=120)
    elif compression == "gzip":
        path = workdir / "e2e-disk.raw.gz"
        path.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
    else:
        raise ValueError(compression)
    return raw, path


@dataclass
class Deployed:
    machine: vm.VM
    app: ApplianceProcess
    finished: bool  # a DONE or FAILED marker appeared in time
    seconds: float
    serial: str
    events: list[dict]
    logs: list[dict]
    shown: dict
    disk: Path
    image: bytes
    image_sha256: str

    def context(self) -> str:
        return (f"\n--- serial console (tail), full log in {self.machine.serial_path} ---\n"
                f"{self.machine.serial_tail(50)}\n--- events ---\n"
                + "\n".join(f"{e['kind']}: {e['message']}" for e in self.events[-15:])
                + f"\n--- deploy log lines: {len(self.logs)} ---\n"
                + "\n".join(f"{x['program']}: {x['message']}" for x in self.logs[-15:])
                + f"\n--- qemu ---\n{self.machine.qemu_log()[-800:]}"
                + f"\n--- appliance log (tail), full log in {self.app.log_path} ---\n"
                + self.app.log()[-3000:])


def deploy(request: pytest.FixtureRequest, accel: vm.Accel, namespace, tmp_path: Path,  # type: ignore[no-untyped-def]
           deploy_images: Path, *, mac: str, compression: str,
           wrong_sha256: bool = False) -> Deployed:
    raw, compressed = make_image(tmp_path, compression)
    sha = hashlib.sha256(compressed.read_bytes()).hexdigest()
    ordered_sha = hashlib.sha256(b"not the image").hexdigest() if wrong_sha256 else sha
    keys = tmp_path / "authorized_keys"
    keys.write_text(KEYS)
    disk = vm.blank_disk(tmp_path / "disk.qcow2", "64M")
    name = f"e2e-{compression}"

    def setup(app: ApplianceProcess) -> None:
        app.cli("profile", "set", "global", "--param-file", f"ssh_authorized_keys={keys}")
        app.cli("images", "import", str(compressed), "--sha256", sha, "--name", name, "-q")
        (entry,) = [a for a in _json(app, "images", "list") if a["name"] == name]
        assert entry["state"] == "ok" and entry["sha256"] == sha, entry
        (image_path,) = [f["path"] for f in entry["files"]]
        app.cli("machine", "add", mac, "--hostname", f"deploy-{compression}")
        app.cli("machine", "set", mac, "--bootenv", "image-deploy",
                "--param", f"image={image_path}", "--param", f"image_sha256={ordered_sha}",
                "--param", "after_deploy=poweroff")
        # what the initrd will read, as an operator would check it
        orders = app.cli("render", mac, "deploy.env").stdout
        assert f"DEPLOY_SHA256={ordered_sha}\n" in orders, orders
        assert f"DEPLOY_COMPRESSION={compression}\n" in orders, orders
        (tmp_path / "deploy.env").write_text(orders)

    images = {f"deploy/{f}": deploy_images / f for f in ("vmlinuz", "initrd.img")}
    with serving(namespace, tmp_path, images, before_start=setup) as net:
        app = net.appliance
        tap = "aptapdeploy"
        vm.add_tap(net.ns, tap, BRIDGE)
        machine = vm.VM(net.ns, tmp_path, tap, mac, firmware="bios", accel=accel, disk=disk)
        machine.start()
        try:
            finished = machine.wait(
                lambda: re.search(r"APPLIANCE-DEPLOY-(DONE|FAILED)", machine.serial())
                is not None, TIMEOUT, interval=1)
            seconds = machine.elapsed()
            if finished and "APPLIANCE-DEPLOY-DONE" in machine.serial():
                machine.wait_exit(60)  # appliance.after=poweroff
            elif finished:
                machine.wait(lambda: False, 5)  # let the failure's log post land
            powered_off = not machine.running()
        finally:
            machine.stop()
        result = Deployed(
            machine=machine, app=app, finished=finished, seconds=seconds,
            serial=machine.serial(), events=_json(app, "events", "--machine", mac, "--limit",
                                                  "1000"),
            logs=_json(app, "logs", mac), shown=_json(app, "machine", "show", mac),
            disk=disk, image=raw, image_sha256=sha)
        result.shown["powered_off"] = powered_off
        outcome = "done" if "APPLIANCE-DEPLOY-DONE" in result.serial else "failed"
        say(request.config, f"e2e: image-deploy {compression} {mac}: QEMU start -> deploy "
                            f"{outcome} {seconds:.1f} s ({accel.name})")
        return result


@pytest.mark.parametrize("compression, mac", [("zstd", "52:54:00:40:00:21"),
                                               ("gzip", "52:54:00:40:00:22")])
def test_image_deploy_writes_the_image(request, vm_host, accel, namespace, tmp_path,  # type: ignore[no-untyped-def]
                                       deploy_images, compression, mac) -> None:
    r = deploy(request, accel, namespace, tmp_path, deploy_images, mac=mac,
               compression=compression)
    assert r.finished, f"no APPLIANCE-DEPLOY-DONE/FAILED within {TIMEOUT:.0f}s{r.context()}"
    assert "APPLIANCE-DEPLOY-FAILED" not in r.serial, f"the deploy failed{r.context()}"
    assert f"APPLIANCE-DEPLOY-DONE {mac}" in r.serial, r.context()
    assert "appliance-deploy: start" in r.serial, r.context()
    assert r.shown["powered_off"], f"appliance.after=poweroff: the VM still ran{r.context()}"

    # the appliance: orders served, install finished, the machine boots its disk next
    served = [e["details"]["file"] for e in r.events if e["kind"] == "answer-file"]
    assert "deploy.env" in served, r.context()
    finished = [e for e in r.events if e["kind"] == "install-finished"]
    assert len(finished) == 1, r.context()
    assert finished[0]["details"]["bootenv"] == "image-deploy", finished
    assert finished[0]["details"]["client"].startswith("10.250.40."), finished
    assert r.shown["bootenv"] == "local", r.shown

    # the lines the initrd posted, stored for this machine
    messages = [x["message"] for x in r.logs if x["program"] == "appliance-deploy"]
    assert any(m.startswith("attempt 1: writing http://") and "/dev/vda" in m
               for m in messages), f"{messages}{r.context()}"
    summary = [m for m in messages if m.startswith("image written:")]
    assert summary, f"no summary line posted: {messages}{r.context()}"
    assert f"sha256 {r.image_sha256} ok" in summary[0], summary
    assert f"{IMAGE_SIZE} bytes" in summary[0], summary
    assert f"({compression})" in summary[0], summary
    # no file system in the image, so no /etc/cloud for the datasource config: a warning
    # in the machine's log, and the deploy still done
    assert any(m.startswith("warning: no partition of /dev/vda has /etc/cloud")
               for m in messages), f"{messages}{r.context()}"

    # the disk holds the image, byte for byte
    written = vm.read_disk(r.disk, IMAGE_SIZE)
    assert written[: len(HEADER)] == HEADER, f"disk starts with {written[:64]!r}"
    assert hashlib.sha256(written).hexdigest() == hashlib.sha256(r.image).hexdigest(), (
        "the disk's first 16 MiB differ from the image")


def test_image_deploy_refuses_a_sha256_mismatch(request, vm_host, accel, namespace,  # type: ignore[no-untyped-def]
                                                tmp_path, deploy_images) -> None:
    mac = "52:54:00:40:00:23"
    r = deploy(request, accel, namespace, tmp_path, deploy_images, mac=mac,
               compression="zstd", wrong_sha256=True)
    assert r.finished, f"no APPLIANCE-DEPLOY-DONE/FAILED within {TIMEOUT:.0f}s{r.context()}"
    assert "APPLIANCE-DEPLOY-DONE" not in r.serial, r.context()
    failed = re.findall(r"APPLIANCE-DEPLOY-FAILED ([^\n]*)", r.serial)
    assert failed and "sha256 mismatch" in failed[0], r.context()
    assert r.image_sha256 in failed[0], failed  # names what it got...
    assert hashlib.sha256(b"not the image").hexdigest() in failed[0], failed  # ...and wanted
    assert not r.shown["powered_off"], "a failed deploy must wait and retry, not power off"

    # the appliance: the error was posted, the install is not finished
    messages = [x["message"] for x in r.logs if x["program"] == "appliance-deploy"]
    assert any(m.startswith("APPLIANCE-DEPLOY-FAILED sha256 mismatch") for m in messages), (
        f"{messages}{r.context()}")
    assert not [e for e in r.events if e["kind"] == "install-finished"], r.context()
    assert r.shown["bootenv"] == "image-deploy", r.shown

    # the unverified image cannot boot: its first MiB is wiped
    written = vm.read_disk(r.disk, 2 * MIB)
    assert written[:MIB] == bytes(MIB), f"first MiB not wiped: {written[:64]!r}"
