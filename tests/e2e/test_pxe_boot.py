"""A QEMU VM PXE-boots through the appliance and nothing else, BIOS and UEFI.

Per test: a network namespace with a bridge (the appliance's address on it, no uplink,
no route out), one tap per VM enslaved to it, ``appliance serve`` as the only server
there. The VM has no disk; it must go

    DHCP (appliance) -> TFTP boot loader (appliance) -> HTTP iPXE script (appliance)
    -> HTTP kernel + initrd (appliance) -> the discovery initrd checks in (appliance)

and the test checks every step from both ends: the appliance's leases, TFTP log,
events and machine list, and the VM's serial console (kept in the test's tmp dir as
an artifact, its tail printed on failure).

(a) SeaBIOS: QEMU's NIC ROM is already iPXE, so its first DHCP comes from iPXE; with
    ``[boot] reload_ipxe_bios = true`` the appliance's script chains its own
    ``undionly.kpxe`` over TFTP first, which DHCPs again and gets the script.
(b) OVMF: the NIC has no option ROM, so the firmware's own PXE does DHCP (arch 7) and
    TFTP of ``ipxe.efi``, which then DHCPs as iPXE and gets the script.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.conftest import ApplianceProcess
from tests.e2e import vm
from tests.e2e.bootnet import BRIDGE, HTTP_PORT, SERVER, BootNet
from tests.e2e.conftest import say

#: Seconds from QEMU start to the check-in. TCG measured here: BIOS 55-100 s, UEFI
#: 40-65 s (each iPXE DHCP waits ~15 s for an IPv6 router advertisement that never
#: comes); generous because CI machines are noisy.
BOOT_TIMEOUT = float(os.environ.get("APPLIANCE_E2E_BOOT_TIMEOUT", "300"))


def _cli_json(app: ApplianceProcess, *args: str) -> list[dict]:
    return json.loads(app.cli(*args, "--json").stdout)


def _checked_in(app: ApplianceProcess, mac: str) -> list[dict]:
    return [e for e in _cli_json(app, "events", "--limit", "1000")
            if e.get("kind") == "checkin" and e.get("mac") == mac]


def _boot_and_check(request: pytest.FixtureRequest, bootnet: BootNet, accel: vm.Accel,
                    firmware: str, mac: str, loader: str) -> None:
    ns, app = bootnet.ns, bootnet.appliance
    tap = f"aptap{firmware}"
    vm.add_tap(ns, tap, BRIDGE)
    machine = vm.VM(ns, bootnet.workdir, tap, mac, firmware=firmware, accel=accel,
                    romfile="" if firmware == "uefi" else None)
    marker_ok = f"APPLIANCE-CHECKIN-OK {mac}"
    machine.start()
    try:
        reached = machine.wait(lambda: marker_ok in machine.serial()
                               or "APPLIANCE-CHECKIN-FAILED" in machine.serial(),
                               BOOT_TIMEOUT)
        boot_seconds = machine.elapsed()
        machine.wait_exit(30)  # the initrd powers the VM off after checking in
        powered_off = not machine.running()
    finally:
        machine.stop()

    # iPXE and the access log write the MAC in URLs percent-encoded (52%3A54%3A...)
    # and redraws its progress with backspaces
    serial = re.sub("%3[Aa]", ":", machine.serial().replace("\b", ""))
    applog = re.sub("%3[Aa]", ":", app.log())

    def context() -> str:
        return (f"\n--- serial console (tail), full log in {machine.serial_path} ---\n"
                f"{machine.serial_tail(60)}\n--- qemu ---\n{machine.qemu_log()[-1000:]}"
                f"\n--- appliance log (tail), full log in {app.log_path} ---\n"
                f"{applog[-4000:]}")

    assert reached and marker_ok in serial, (
        f"{firmware}: no check-in from {mac} within {BOOT_TIMEOUT:.0f}s "
        f"({accel.name}){context()}")
    say(request.config, f"e2e: {firmware} boot {mac}: QEMU start -> check-in "
                        f"{boot_seconds:.1f} s ({accel.name})")

    # 1. DHCP: the appliance leased an address to this MAC, the VM got it
    leases = [x for x in _cli_json(app, "leases", "--all") if x.get("mac") == mac]
    assert leases, f"no lease for {mac}: {_cli_json(app, 'leases', '--all')}{context()}"
    lease_ip = leases[0]["ip"]
    assert lease_ip.startswith("10.250.40."), leases
    assert re.search(rf"dhcp bound \S+ {re.escape(lease_ip)}/", serial), (
        f"the initrd did not get {lease_ip} by DHCP{context()}")

    # 2. TFTP: the firmware (UEFI) or the ROM's iPXE (BIOS) fetched the loader
    assert re.search(rf"sent\s+\S*{re.escape(loader)}\b.*\bto\s+10\.250\.40\.", applog), (
        f"appliance log shows no TFTP transfer of {loader}{context()}")
    if firmware == "bios":
        assert re.search(rf"tftp://{SERVER}/{re.escape(loader)}\.\.\.[\s\d%]*ok", serial), (
            f"iPXE did not report fetching {loader} over TFTP{context()}")
        assert "using undionly on" in serial, f"undionly.kpxe did not take over{context()}"
    else:
        assert f"NBP filename is {loader}" in serial, context()
        assert "NBP file downloaded successfully" in serial, context()

    # 3. HTTP: iPXE fetched its per-machine script, then kernel and initrd
    base = f"http://{SERVER}:{HTTP_PORT}"
    for url in (f"{base}/boot/{mac}.ipxe", f"{base}/images/discovery/vmlinuz",
                f"{base}/images/discovery/initrd.img"):
        # iPXE prints "URL... ok", with progress ("12%  33% ...") on slow downloads
        assert re.search(rf"{re.escape(url)}\.\.\.[\s\d%]*ok", serial), (
            f"iPXE did not report fetching {url}{context()}")
    assert "appliance-discovery: start" in serial, f"the initrd did not start{context()}"
    for path in (f"/boot/{mac}.ipxe", "/images/discovery/vmlinuz",
                 "/images/discovery/initrd.img", f"/boot/{mac}/checkin"):
        # the appliance's HTTP access log ([http] access_log = true)
        assert re.search(rf'"GET {re.escape(path)}\S* HTTP/1\.[01]" 200 ', applog), (
            f"no successful GET {path} in the appliance's access log{context()}")

    # 4. the check-in, as the appliance recorded it
    events = _checked_in(app, mac)
    assert events, f"no checkin event for {mac}: {_cli_json(app, 'events')}{context()}"
    assert "discovery" in json.dumps(events[-1]), events[-1]
    machines = {m["mac"]: m for m in _cli_json(app, "machines")}
    assert mac in machines, f"{mac} not registered: {machines}"
    assert machines[mac]["state"] == "discovered", machines[mac]
    assert machines[mac]["seen_on"], machines[mac]
    script_events = [e for e in _cli_json(app, "events", "--limit", "1000")
                     if e.get("kind") == "boot-script" and e.get("mac") == mac]
    assert script_events, "no boot-script event"

    assert powered_off, f"the VM did not power off after checking in{context()}"

    # 5. the servers' own counters (final values are published when they stop): one
    #    DHCP exchange per stage (firmware or ROM, the TFTP-loaded iPXE, the initrd),
    #    and the whole loader sent over TFTP
    app.stop()
    counters = json.loads(app.cli("counters", "--json").stdout)
    dhcp, tftp = counters.get("dhcp", {}), counters.get("tftp", {})
    assert dhcp.get("acks", 0) >= 3, f"DHCP counters: {dhcp}"
    assert tftp.get("transfers_completed", 0) >= 1, f"TFTP counters: {tftp}"
    loader_size = (Path("/usr/lib/ipxe") / loader).resolve().stat().st_size
    assert tftp.get("bytes_sent", 0) >= loader_size, f"TFTP counters: {tftp}"


def test_bios_seabios_ipxe_rom(request, bootnet, accel) -> None:  # type: ignore[no-untyped-def]
    """SeaBIOS + QEMU's iPXE ROM -> TFTP undionly.kpxe -> HTTP script -> discovery."""
    _boot_and_check(request, bootnet, accel, "bios", "52:54:00:40:00:0a", "undionly.kpxe")


def test_uefi_ovmf(request, bootnet, accel) -> None:  # type: ignore[no-untyped-def]
    """OVMF's own PXE -> TFTP ipxe.efi -> HTTP script -> discovery."""
    _boot_and_check(request, bootnet, accel, "uefi", "52:54:00:40:00:0b", "ipxe.efi")


def test_accelerator_is_reported(accel) -> None:  # type: ignore[no-untyped-def]
    """The run says which accelerator the VMs used (and TCG is the safe default)."""
    assert accel.name in ("tcg", "kvm")
    assert accel.banner().startswith(f"e2e: using {accel.name.upper()}")
    if os.environ.get(vm.ACCEL_ENV, "tcg").lower() != "kvm":
        assert accel.name == "tcg"
