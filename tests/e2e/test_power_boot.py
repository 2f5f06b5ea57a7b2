"""Power and boot control through a BMC, seen in the VM test bed.

The VM's BMC is ``tests/e2e/qemu_bmc.py``: an IPMI 2.0 (lanplus) BMC built on
``pyghmi.ipmi.bmc.Bmc`` that drives one QEMU VM through QMP (power on starts QEMU with
the boot order of the boot device in force, off is QMP ``quit``, reset is ``qom-set``
of the devices' ``bootindex`` plus ``system_reset``; every request is a JSON line in
its log). It runs inside the test's network namespace on 127.0.0.1, next to
``appliance serve``.

(a) The BMC on its own, with ipmitool (``-I lanplus -C 3``) and pyghmi's client: power
    status/on/off/cycle/reset/soft-off, boot device once and persistent, the EFI flag,
    a once override taken back after its boot, identify, and SIGTERM stopping the VM.
(b) The issue's end-to-end case: a VM set to boot from its (blank) disk does not
    network boot; after ``appliance boot vm pxe`` + ``appliance power vm cycle`` it
    PXE-boots through the appliance into the discovery initrd, which checks in with the
    VM's MAC; the BMC's log shows the network order applied once, and ipmitool and
    ``appliance power vm status`` agree on the power state.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest

from tests import netns
from tests.conftest import ApplianceProcess
from tests.e2e.bmcvm import (
    BMC_PASSWORD,
    BMC_USER,
    DISK_MARK,
    IPXE_STARTED,
    NET_MARK,
    SEABIOS_DISK,
    pid_alive,
)
from tests.e2e.bootnet import BRIDGE
from tests.e2e.conftest import say
from tests.e2e.qemu_bmc import qmp

#: Seconds from the power cycle to the check-in (TCG: BIOS discovery boot 40-100 s).
BOOT_TIMEOUT = float(os.environ.get("APPLIANCE_E2E_BOOT_TIMEOUT", "300"))
#: Seconds a VM set to boot from its blank disk is watched for a network boot.
NO_NETBOOT_WINDOW = 20.0
#: Seconds SeaBIOS may take (TCG, busy machine) to print its boot device.
FIRMWARE_TIMEOUT = 90.0
# -- (a) the BMC on its own ------------------------------------------------------------


def test_qemu_bmc_ipmitool_and_pyghmi(request, vm_host, accel, namespace,  # type: ignore[no-untyped-def]
                                      bmc_vm_factory) -> None:
    """Power and boot flags through ipmitool and pyghmi; what QEMU did, from its log and
    its serial console. No appliance and no DHCP server: the VM only gets as far as
    iPXE (network) or SeaBIOS's "not a bootable disk" (the blank disk)."""
    netns.bridge(namespace, BRIDGE, None)
    bvm = bmc_vm_factory("aptapbmc0", "52:54:00:40:10:01", accel, once_settle=5.0)
    bvm.start(boot_device="hd")
    t0 = time.monotonic()

    # off until told otherwise; on = QEMU with only the disk in the boot order
    assert bvm.ipmi_power() == "off"
    assert "Up/On" in bvm.ipmitool("chassis", "power", "on").stdout
    assert bvm.ipmi_power() == "on"
    start = bvm.records("qemu-start")[-1]
    assert start["boot_order"] == ["disk0"] and start["boot_device"] == "hd", start
    argv = start["qemu_argv"]
    assert "virtio-blk-pci,drive=drv0,id=disk0,bootindex=1" in argv, argv
    assert not any("bootindex" in a for a in argv if "id=nic0" in a), argv
    assert argv[argv.index("-boot") + 1] == "strict=on", argv
    assert bvm.wait_serial(SEABIOS_DISK, FIRMWARE_TIMEOUT), f"no disk boot{bvm.context()}"
    assert IPXE_STARTED not in bvm.serial(), f"network boot with disk order{bvm.context()}"

    # a once override through pyghmi's client (which needs the SHA-1 fallback), EFI flag
    got = bvm.pyghmi(("set_bootdev", {"bootdev": "network", "persist": False,
                                      "uefiboot": True}),
                     ("get_bootdev", {}))
    assert got[1] == {"bootdev": "network", "persistent": False, "uefimode": True}, got
    bootparam = bvm.ipmitool("chassis", "bootparam", "get", "5").stdout
    assert "Force PXE" in bootparam and "only next boot" in bootparam, bootparam
    assert "BIOS EFI boot" in bootparam, bootparam

    # reset honours it (qom-set bootindex + system_reset), and consumes it
    bvm.mark("reset")
    assert "Reset" in bvm.ipmitool("chassis", "power", "reset").stdout
    reset = bvm.records("qemu-reset")[-1]
    assert reset["boot_order"] == ["nic0", "disk0"] and reset["once"] is True, reset
    assert reset["efi"] is True and reset["once_consumed"] == "network", reset
    assert reset["qom_set"] == {"nic0": 1, "disk0": 2}, reset
    assert bvm.wait_serial(IPXE_STARTED, FIRMWARE_TIMEOUT, since="reset"), (
        f"reset with a PXE override did not start iPXE{bvm.context()}")
    assert SEABIOS_DISK not in bvm.since("reset"), bvm.context()
    bootparam = bvm.ipmitool("chassis", "bootparam", "get", "5").stdout
    assert "Force Boot from default Hard-Drive" in bootparam, bootparam
    assert "all future boots" in bootparam, bootparam

    # after the settle time the running VM has the persistent order back: a reset the
    # BMC did not ask for (as when the guest reboots itself) boots the disk again
    netns.wait_for(lambda: bvm.records("once-revert"), bvm.once_settle + 20, interval=0.5,
                   what="the once override taken back from the running VM")
    assert bvm.records("once-revert")[-1]["qom_set"] == {"nic0": -1, "disk0": 1}
    bvm.mark("guest-reset")
    qmp(str(bvm.path("qmp.sock")), "system_reset")
    assert bvm.wait_serial(SEABIOS_DISK, FIRMWARE_TIMEOUT, since="guest-reset"), (
        f"the reboot after a once PXE boot did not go back to the disk{bvm.context()}")
    assert IPXE_STARTED not in bvm.since("guest-reset"), bvm.context()

    # persistent network boot; cycle = a new QEMU process with the NIC order
    got = bvm.pyghmi(("set_bootdev", {"bootdev": "network", "persist": True}),
                     ("get_bootdev", {}))
    assert got[1] == {"bootdev": "network", "persistent": True, "uefimode": False}, got
    old_pid = bvm.records("qemu-start")[-1]["pid"]
    bvm.mark("cycle")
    assert "Cycle" in bvm.ipmitool("chassis", "power", "cycle").stdout
    assert bvm.ipmi_power() == "on"
    stop, start = bvm.records("qemu-stop")[-1], bvm.records("qemu-start")[-1]
    assert stop["reason"] == "power cycle" and stop["via"] == "qmp quit", stop
    assert start["reason"] == "power cycle" and start["pid"] != old_pid, start
    assert start["boot_order"] == ["nic0", "disk0"] and start["once"] is False, start
    assert not pid_alive(old_pid)
    assert bvm.wait_serial(IPXE_STARTED, FIRMWARE_TIMEOUT, since="cycle"), bvm.context()
    got = bvm.pyghmi(("get_bootdev", {}))
    assert got[0]["bootdev"] == "network" and got[0]["persistent"] is True, got

    # soft-off is the ACPI button (SeaBIOS/iPXE ignore it); off; reset/cycle when off
    assert "Soft" in bvm.ipmitool("chassis", "power", "soft").stdout
    assert bvm.records("request", request="chassis control power_shutdown")[-1]["code"] == 0
    assert "Down/Off" in bvm.ipmitool("chassis", "power", "off").stdout
    assert bvm.ipmi_power() == "off"
    assert bvm.records("qemu-stop")[-1]["via"] == "qmp quit"
    refused = bvm.ipmitool("chassis", "power", "reset", check=False)
    assert refused.returncode != 0, refused.stdout
    assert bvm.requests("chassis control power_reset")[-1]["code"] == 0xD5
    got = bvm.pyghmi(("set_power", {"powerstate": "on", "wait": 30}),
                     ("raw_command", {"netfn": 0, "command": 4, "data": [0, 1]}),
                     ("set_bootdev", {"bootdev": "default"}),
                     ("get_bootdev", {}))
    assert got[0] == {"powerstate": "on"}, got
    assert bvm.requests("chassis identify")[-1]["identify"] == "indefinite"
    assert got[3]["bootdev"] == "default", got
    assert bvm.records("qemu-start")[-1]["boot_order"] == ["nic0", "disk0"]  # persistent network

    # SIGTERM to the BMC alone: it stops its QEMU (by PID) and exits
    qemu_pid = bvm.records("qemu-start")[-1]["pid"]
    assert pid_alive(qemu_pid)
    os.kill(bvm.proc.pid, signal.SIGTERM)
    assert bvm.proc.wait(30) == 0, bvm.stderr()
    assert bvm.records("qemu-stop")[-1]["reason"] == "BMC stopping"
    assert bvm.records("stopped"), bvm.context()
    assert not pid_alive(qemu_pid)
    bvm.proc = None
    say(request.config, f"e2e: qemu_bmc with ipmitool and pyghmi: {time.monotonic() - t0:.1f} s "
                        f"({accel.name})")


# -- (b) appliance boot + power -> network boot ----------------------------------------


def _cli_json(app: ApplianceProcess, *args: str) -> Any:
    return json.loads(app.cli(*args, "--json").stdout)


def _power_call(app: ApplianceProcess, *args: str) -> dict[str, Any]:
    """``appliance power|boot ...`` through the running ``power`` part; must succeed."""
    proc = app.cli(*args, "--json", check=False, timeout=150)
    assert proc.returncode == 0, (
        f"appliance {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        f"\n--- appliance log ---\n{app.log()[-3000:]}")
    summary = json.loads(proc.stdout)
    assert summary["state"] == "succeeded", summary
    return summary


def _checked_in(app: ApplianceProcess, mac: str) -> list[dict]:
    return [e for e in _cli_json(app, "events", "--limit", "1000")
            if e.get("kind") == "checkin" and e.get("mac") == mac]


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_boot_pxe_and_power_cycle_network_boot(request, bootnet, accel, firmware,  # type: ignore[no-untyped-def]
                                               bmc_vm_factory) -> None:
    """`appliance boot vm pxe` + `appliance power vm cycle` reboot a disk-booting VM
    into a network boot: the discovery initrd checks in with the VM's MAC. UEFI: with
    ``--mode uefi``, which the BMC must be told as the EFI flag."""
    app = bootnet.appliance
    mac = {"bios": "52:54:00:40:10:0a", "uefi": "52:54:00:40:10:0b"}[firmware]
    bvm = bmc_vm_factory(f"aptapbmc{firmware}", mac, accel, firmware=firmware)
    disk_mark, net_mark = DISK_MARK[firmware], NET_MARK[firmware]

    # 1. the BMC boots the VM from its blank disk (persistent): no network boot
    bvm.start(boot_device="hd", power_on=True)
    powered_on = time.monotonic()
    start = bvm.records("qemu-start")[-1]
    assert start["boot_order"] == ["disk0"] and start["boot_device"] == "hd", start
    assert bvm.wait_serial(disk_mark, FIRMWARE_TIMEOUT), f"no disk boot{bvm.context()}"
    time.sleep(max(0.0, NO_NETBOOT_WINDOW - (time.monotonic() - powered_on)))
    assert _checked_in(app, mac) == [], "check-in from a VM booting its disk"
    assert not [x for x in _cli_json(app, "leases", "--all") if x.get("mac") == mac]
    assert net_mark not in bvm.serial(), f"network boot with disk order{bvm.context()}"
    assert len(bvm.records("qemu-start")) == 1

    # 2. the machine and its BMC in the appliance
    app.cli("machine", "add", mac, "--hostname", "vm")
    app.cli("machine", "bmc", "vm", "--driver", "ipmi", "--address", "127.0.0.1",
            "--port", str(bvm.port), "--username", BMC_USER, "--password-stdin",
            input=BMC_PASSWORD + "\n")
    shown = _cli_json(app, "machine", "bmc", "vm", "--show")
    assert BMC_PASSWORD not in json.dumps(shown), shown
    status = _power_call(app, "power", "vm", "status")
    assert status["result"]["power"] == "on" == bvm.ipmi_power(), status

    # 3. next boot from the network (once), then a power cycle
    t_boot = time.monotonic()
    mode = ["--mode", "uefi"] if firmware == "uefi" else []
    boot = _power_call(app, "boot", "vm", "pxe", *mode)
    flags = bvm.requests("set boot device")[-1]
    assert flags["device"] == "network" and flags["persistent"] is False, flags
    assert flags["efi"] is (firmware == "uefi"), flags
    assert bvm.records("request", request="set boot options param 3"), "timer not cleared"
    bvm.mark("cycle")
    t_cycle = time.monotonic()
    _power_call(app, "power", "vm", "cycle")
    cycle_seconds = time.monotonic() - t_cycle
    cycles = bvm.requests("chassis control power_cycle")
    assert cycles and cycles[-1]["code"] == 0, bvm.context()
    assert "nic0" in " ".join(a for a in cycles[-1]["qemu_argv"] if "bootindex=1" in a)
    starts = bvm.records("qemu-start")
    assert len(starts) == 2, bvm.context()
    assert starts[-1]["reason"] == "power cycle", starts[-1]
    assert starts[-1]["boot_order"] == ["nic0", "disk0"] and starts[-1]["once"] is True, starts[-1]
    assert starts[-1]["efi"] is (firmware == "uefi"), starts[-1]
    assert starts[-1]["once_consumed"] == "network", starts[-1]
    assert starts[-1]["reverts_to"] == "hd", starts[-1]
    assert bvm.records("qemu-stop")[-1]["reason"] == "power cycle"
    # power state agrees right after the cycle (the VM is booting: on)
    status = _power_call(app, "power", "vm", "status")
    assert status["result"]["power"] == "on" == bvm.ipmi_power(), status
    # the override was for one boot: the BMC reports the persistent disk again
    shown = _power_call(app, "boot", "vm", "show")["result"]
    assert shown["device"] == "disk" and shown["persistent"] is True, shown

    # 4. the VM network-boots into discovery and checks in with its MAC
    marker = f"APPLIANCE-CHECKIN-OK {mac}"
    reached = bvm.wait_serial(marker, BOOT_TIMEOUT, since="cycle")
    boot_seconds = time.monotonic() - t_cycle
    assert reached, f"no check-in from {mac} {BOOT_TIMEOUT:.0f} s after the cycle{bvm.context()}"
    assert net_mark in bvm.since("cycle"), bvm.context()
    assert disk_mark not in bvm.since("cycle"), bvm.context()
    events = _checked_in(app, mac)
    assert events and "discovery" in json.dumps(events[-1]), events
    leases = [x for x in _cli_json(app, "leases", "--all") if x.get("mac") == mac]
    assert leases, "no DHCP lease for the VM after its network boot"

    # exactly one QEMU start with the network order: the override applied once
    net_starts = [s for s in bvm.records("qemu-start") if s["boot_order"] == ["nic0", "disk0"]]
    assert len(net_starts) == 1 and net_starts[0]["once"] is True, bvm.context()

    # 5. the discovery initrd powers the VM off: both sides say off
    netns.wait_for(lambda: bvm.records("qemu-exited"), 60, interval=0.5,
                   what="the VM powering itself off")
    assert bvm.ipmi_power() == "off"
    status = _power_call(app, "power", "vm", "status")
    assert status["result"]["power"] == "off", status

    say(request.config, f"e2e: {firmware} boot pxe + power cycle: boot request "
                        f"{t_cycle - t_boot:.1f} s, "
                        f"cycle {cycle_seconds:.1f} s, cycle -> check-in {boot_seconds:.1f} s "
                        f"({accel.name}); boot answer {boot['result']}")
