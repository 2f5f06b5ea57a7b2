"""A QEMU VM behind its own BMC (``qemu_bmc.py``: pyghmi's ``bmc.Bmc`` driving QEMU
through QMP), for the e2e tests that power and boot VMs through the appliance: the
:class:`BmcVm` helper and the ``bmc_vm_factory`` fixture (in conftest)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.e2e import vm
from tests.e2e.bootnet import BRIDGE

QEMU_BMC = Path(__file__).with_name("qemu_bmc.py")
BMC_PORT = 6230
BMC_USER = "admin"
BMC_PASSWORD = "e2e-bmc-Secret1"

#: pyghmi's client, run inside the namespace: ``[[method, kwargs], ...]`` -> JSON results.
PYGHMI_CLIENT = r"""
import json, sys
from pyghmi.ipmi import command
port, user, password, calls = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
c = command.Command(bmc="127.0.0.1", port=port, userid=user, password=password)
out = [getattr(c, name)(**kwargs) for name, kwargs in calls]
c.ipmi_session.logout()
print(json.dumps(out, default=lambda o: list(o) if isinstance(o, (bytes, bytearray)) else str(o)))
"""

SEABIOS_DISK = "Booting from Hard Disk"
IPXE_STARTED = "iPXE initialising devices"
#: What the firmware prints when it tries the (blank) disk, and when it starts a network
#: boot: SeaBIOS + the NIC's iPXE ROM; OVMF's own PXE (no NIC option ROM, as in
#: test_pxe_boot), which falls through to its built-in shell after a blank disk.
DISK_MARK = {"bios": SEABIOS_DISK, "uefi": '"EFI Internal Shell"'}
NET_MARK = {"bios": IPXE_STARTED, "uefi": "Start PXE over IPv4"}


@dataclass
class BmcVm:
    """One QEMU VM (NIC on a tap, blank virtio disk) behind its qemu_bmc.py BMC."""

    ns: netns.Namespace
    workdir: Path
    tap: str
    mac: str
    accel: vm.Accel
    port: int = BMC_PORT
    once_settle: float = 15.0
    firmware: str = "bios"  # "bios" (SeaBIOS + iPXE ROM) or "uefi" (OVMF, firmware PXE)
    memory_mib: int = 512
    disk_size: str = "64M"
    proc: Any = None
    offsets: dict[str, int] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.workdir / f"bmcvm-{self.mac.replace(':', '')}-{name}"

    @property
    def serial_path(self) -> Path:
        return self.path("serial.log")

    @property
    def log_path(self) -> Path:
        return self.path("bmc.jsonl")

    def qemu_argv(self) -> list[str]:
        """The VM without any boot order (the BMC adds it). The serial console file is
        appended to, so it spans every QEMU process the BMC starts (UEFI: and so do the
        firmware's variables)."""
        nic = f"virtio-net-pci,netdev=n0,mac={self.mac},id=nic0"
        firmware: list[str] = []
        if self.firmware == "uefi":
            nic += ",romfile="
            firmware = ["-machine", "q35",
                        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={vm.OVMF_CODE}",
                        "-drive", f"if=pflash,format=raw,unit=1,file={self.path('vars.fd')}"]
        elif self.firmware != "bios":
            raise ValueError(f"unknown firmware {self.firmware!r}")
        return [vm.QEMU, *self.accel.qemu_args(), "-m", str(self.memory_mib), "-smp", "1",
                "-nodefaults", "-nographic", "-display", "none", "-monitor", "none", *firmware,
                "-chardev", f"file,id=ser0,path={self.serial_path},append=on",
                "-serial", "chardev:ser0",
                "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
                "-device", nic,
                "-drive", f"file={self.path('disk.qcow2')},format=qcow2,if=none,id=drv0,"
                          "cache=writeback",
                "-device", "virtio-blk-pci,drive=drv0,id=disk0"]

    def start(self, boot_device: str = "hd", power_on: bool = False) -> None:
        vm.blank_disk(self.path("disk.qcow2"), self.disk_size)
        if self.firmware == "uefi":
            shutil.copyfile(vm.OVMF_VARS, self.path("vars.fd"))
        self.serial_path.write_bytes(b"")
        self.path("argv.json").write_text(json.dumps(self.qemu_argv()))
        cmd = [sys.executable, str(QEMU_BMC), "--argv", str(self.path("argv.json")),
               "--qmp", str(self.path("qmp.sock")), "--log", str(self.log_path),
               "--qemu-log", str(self.path("qemu.log")), "--address", "127.0.0.1",
               "--port", str(self.port), "--username", BMC_USER, "--password", BMC_PASSWORD,
               "--nic", "nic0", "--disk", "disk0", "--boot-device", boot_device,
               "--once-settle", str(self.once_settle)]
        if power_on:
            cmd.append("--power-on")
        self.proc = self.ns.popen(cmd, log=self.path("bmc.stderr"))
        wanted = "qemu-start" if power_on else "listening"
        netns.wait_for(lambda: self.records(wanted) or self.proc.poll() is not None,
                       30, interval=0.2, what=f"the BMC's {wanted!r} record")
        assert self.proc.poll() is None, f"the BMC exited:\n{self.stderr()}"

    def stderr(self) -> str:
        path = self.path("bmc.stderr")
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def records(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text().splitlines():
            rec = json.loads(line)
            if event is not None and rec.get("event") != event:
                continue
            if all(rec.get(k) == v for k, v in match.items()):
                out.append(rec)
        return out

    def requests(self, request: str) -> list[dict[str, Any]]:
        return [r for r in self.records("request") if r.get("request") == request]

    def ipmitool(self, *args: str, check: bool = True) -> Any:
        return self.ns.exec(["ipmitool", "-I", "lanplus", "-C", "3", "-H", "127.0.0.1",
                             "-p", str(self.port), "-U", BMC_USER, "-P", BMC_PASSWORD, *args],
                            check=check, timeout=60)

    def ipmi_power(self) -> str:
        out = self.ipmitool("chassis", "power", "status").stdout
        match = re.search(r"Chassis Power is (on|off)", out)
        assert match, out
        return match.group(1)

    def pyghmi(self, *calls: tuple[str, dict[str, Any]]) -> list[Any]:
        out = self.ns.exec([sys.executable, "-c", PYGHMI_CLIENT, str(self.port), BMC_USER,
                            BMC_PASSWORD, json.dumps(calls)], timeout=120)
        return json.loads(out.stdout)

    def serial(self) -> str:
        if not self.serial_path.exists():
            return ""
        text = self.serial_path.read_bytes().decode(errors="replace")
        return text.replace("\r", "").replace("\b", "")

    def mark(self, name: str) -> None:
        """Remember where the serial console is now (``since(name)`` reads from there)."""
        self.offsets[name] = len(self.serial())

    def since(self, name: str) -> str:
        return self.serial()[self.offsets[name]:]

    def wait_serial(self, needle: str, timeout: float, since: str | None = None) -> bool:
        def seen() -> bool:
            return needle in (self.since(since) if since else self.serial())
        try:
            netns.wait_for(seen, timeout, interval=0.5, what=needle)
            return True
        except TimeoutError:
            return False

    def context(self) -> str:
        tail = "\n".join(self.serial().splitlines()[-40:])
        log = self.log_path.read_text()[-4000:] if self.log_path.exists() else ""
        return (f"\n--- VM serial (tail), full: {self.serial_path} ---\n{tail}"
                f"\n--- BMC log (tail), full: {self.log_path} ---\n{log}"
                f"\n--- BMC stderr ---\n{self.stderr()[-1500:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.ns.stop(self.proc, timeout=20)  # SIGTERM to the BMC's group (QEMU in it)
            self.proc = None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and ") Z " not in stat.read_text()


@pytest.fixture
def bmc_vm_factory(namespace, tmp_path) -> Iterator[Callable[..., BmcVm]]:  # type: ignore[no-untyped-def]
    if shutil.which("ipmitool") is None:
        missing = "e2e prerequisite missing: ipmitool (apt-get install ipmitool)"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    made: list[BmcVm] = []

    def make(tap: str, mac: str, accel: vm.Accel, **kw: Any) -> BmcVm:
        vm.add_tap(namespace, tap, BRIDGE)
        item = BmcVm(namespace, tmp_path, tap, mac, accel, **kw)
        made.append(item)
        return item

    try:
        yield make
    finally:
        for item in made:
            item.stop()
