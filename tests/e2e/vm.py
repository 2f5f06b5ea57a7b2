"""QEMU virtual machines for the e2e tests: a tap on the test bridge, firmware, accelerator.

A VM here is a PXE client and nothing else: its only NIC is a tap enslaved to a bridge
inside the test's network namespace (``-netdev tap``, never ``-netdev user``, which
would forward the guest's traffic out of the namespace), it has no disk unless the test
gives it one (``disk``: an image file attached as a virtio disk, e.g. a blank qcow2 from
``blank_disk``), its serial console goes to a file that the test keeps, and QEMU is
tracked and killed by PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests import netns

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
QEMU = "qemu-system-x86_64"

#: Environment variable asking for an accelerator ("auto", "kvm" or "tcg"; default auto).
ACCEL_ENV = "APPLIANCE_E2E_ACCEL"


def add_tap(ns: netns.Namespace, tap: str, bridge: str) -> None:
    """A tap device in ``ns``, enslaved to ``bridge`` and up (QEMU opens it by name)."""
    ns.ip("tuntap", "add", "dev", tap, "mode", "tap")
    ns.ip("link", "set", tap, "master", bridge)
    ns.ip("link", "set", tap, "up")


@dataclass
class Accel:
    """The accelerator the VMs run with, and why it was chosen (printed by the tests)."""

    name: str  # "tcg" or "kvm"
    reason: str

    def qemu_args(self) -> list[str]:
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", "tcg"]

    def banner(self) -> str:
        if self.name == "kvm":
            return f"e2e: using KVM ({self.reason})"
        return f"e2e: using TCG ({self.reason})"


@dataclass
class VM:
    """One QEMU VM PXE-booting from a tap in ``ns``."""

    ns: netns.Namespace
    workdir: Path
    tap: str
    mac: str
    firmware: str = "bios"  # "bios" (SeaBIOS + the NIC's iPXE ROM) or "uefi" (OVMF)
    accel: Accel = field(default_factory=lambda: Accel("tcg", "default"))
    memory_mb: int = 512
    nic: str = "virtio-net-pci"
    #: NIC option ROM: None keeps QEMU's (iPXE), "" removes it (firmware's own PXE).
    romfile: str | None = None
    #: An image file attached as the VM's disk (None: no disk); it still boots from the
    #: network first (``-boot n``).
    disk: Path | None = None
    disk_format: str = "qcow2"
    disk_interface: str = "virtio"
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    exited_at: float | None = None

    @property
    def serial_path(self) -> Path:
        return self.workdir / f"serial-{self.firmware}-{self.mac.replace(':', '')}.log"

    @property
    def qemu_log_path(self) -> Path:
        return self.workdir / f"qemu-{self.firmware}-{self.mac.replace(':', '')}.log"

    def command(self) -> list[str]:
        dev = f"{self.nic},netdev=n0,mac={self.mac}"
        if self.romfile is not None:
            dev += f",romfile={self.romfile}"
        cmd = [QEMU, *self.accel.qemu_args(), "-m", str(self.memory_mb), "-smp", "1",
               "-nodefaults", "-nographic", "-display", "none", "-monitor", "none",
               "-no-reboot", "-serial", f"file:{self.serial_path}", "-boot", "n",
               "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
               "-device", dev]
        if self.disk is not None:
            cmd += ["-drive", f"file={self.disk},format={self.disk_format},"
                              f"if={self.disk_interface},cache=writeback"]
        if self.firmware == "uefi":
            vars_copy = self.workdir / f"OVMF_VARS-{self.mac.replace(':', '')}.fd"
            shutil.copyfile(OVMF_VARS, vars_copy)
            cmd += ["-machine", "q35",
                    "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
        elif self.firmware != "bios":
            raise ValueError(f"unknown firmware {self.firmware!r}")
        return cmd

    def start(self) -> None:
        self.serial_path.write_bytes(b"")
        self.started_at = time.monotonic()
        self.exited_at = None
        self.proc = self.ns.popen(self.command(), log=self.qemu_log_path)

    def running(self) -> bool:
        if self.proc is None:
            return False
        if self.proc.poll() is None:
            return True
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        return False

    def serial(self) -> str:
        if not self.serial_path.exists():
            return ""
        return self.serial_path.read_bytes().decode(errors="replace").replace("\r", "")

    def serial_tail(self, lines: int = 60) -> str:
        return "\n".join(self.serial().splitlines()[-lines:])

    def qemu_log(self) -> str:
        if not self.qemu_log_path.exists():
            return ""
        return self.qemu_log_path.read_text(errors="replace")

    def wait(self, predicate, timeout: float, interval: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
        """Wait until ``predicate()`` is true or QEMU has exited; return the predicate."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if not self.running():
                return bool(predicate())
            time.sleep(interval)
        return bool(predicate())

    def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                return True
            time.sleep(0.2)
        return not self.running()

    def elapsed(self) -> float:
        end = self.exited_at if self.exited_at is not None else time.monotonic()
        return end - self.started_at

    def stop(self) -> None:
        if self.proc is not None:
            self.running()
            self.ns.stop(self.proc, timeout=5)
            self.proc = None


def blank_disk(path: Path, size: str = "64M") -> Path:
    """A new, empty qcow2 disk image at ``path`` (``qemu-img create``)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True,
                   capture_output=True, timeout=60)
    return path


def read_disk(path: Path, length: int, fmt: str = "qcow2") -> bytes:
    """The first ``length`` bytes of a disk image as the guest sees them."""
    raw = path.with_name(path.name + ".raw")
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(raw)],
                   check=True, capture_output=True, timeout=120)
    try:
        with raw.open("rb") as f:
            return f.read(length)
    finally:
        raw.unlink()


def probe_boot(images: Path, workdir: Path, accel: Accel, timeout: float = 40) -> tuple[bool, str]:
    """Does ``accel`` boot a Linux guest here? Boot the discovery kernel + initrd directly.

    ``/dev/kvm`` existing proves little: on some hosts (nested PVM backends) QEMU starts
    with KVM and the guest kernel hangs after the decompressor. So boot for real, with
    no network at all (``-nic none``), and look for the initrd's first line; the initrd
    then finds no ``appliance.url`` and powers the VM off.
    """
    serial = workdir / f"probe-{accel.name}-serial.log"
    serial.write_bytes(b"")
    cmd = [QEMU, *accel.qemu_args(), "-m", "256", "-smp", "1", "-nodefaults",
           "-nographic", "-display", "none", "-monitor", "none", "-no-reboot", "-nic", "none",
           "-serial", f"file:{serial}", "-kernel", str(images / "vmlinuz"),
           "-initrd", str(images / "initrd.img"), "-append", "console=ttyS0,115200 panic=-1"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    ok = False
    try:
        while time.monotonic() < deadline:
            if b"appliance-discovery: start" in serial.read_bytes():
                ok = True
                break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()  # by the PID we started, nothing else
        _, err = proc.communicate(timeout=10)
    if ok:
        return True, f"a probe VM booted Linux under {accel.name.upper()}"
    if proc.returncode not in (None, 0, -9) and err:
        return False, f"QEMU failed: {err.decode(errors='replace').strip()[-200:]}"
    return False, (f"a probe VM under {accel.name.upper()} did not reach the initrd in "
                   f"{timeout:.0f}s (serial: {serial})")


def choose_accel(images: Path, workdir: Path) -> Accel:
    """KVM when a probe boot proves it works, TCG otherwise (and say why).

    ``APPLIANCE_E2E_ACCEL``: ``auto`` (default: probe KVM when ``/dev/kvm`` exists),
    ``kvm`` (the same, with a longer probe), ``tcg`` (no probe).
    """
    wanted = os.environ.get(ACCEL_ENV, "auto").strip().lower() or "auto"
    if wanted not in ("auto", "kvm", "tcg"):
        raise ValueError(f"{ACCEL_ENV}={wanted!r}: expected 'auto', 'kvm' or 'tcg'")
    if wanted == "tcg":
        return Accel("tcg", f"{ACCEL_ENV}=tcg asked for TCG")
    if not os.path.exists("/dev/kvm"):
        return Accel("tcg", "KVM not usable here: /dev/kvm does not exist")
    # A working KVM reaches the initrd in a few seconds; a hung one never does.
    ok, why = probe_boot(images, workdir, Accel("kvm", "probe"),
                         timeout=40 if wanted == "kvm" else 20)
    if ok:
        return Accel("kvm", why)
    return Accel("tcg", f"KVM not usable here: {why}")
