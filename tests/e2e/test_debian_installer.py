"""Debian's own installer PXE-boots from the appliance and fetches its preseed.

The machine is enrolled and given the ``debian-12`` bootenv with the CLI; the installer's
kernel and initrd are imported with ``appliance images import`` from Debian's
``debian-installer-12-netboot-amd64`` package (sha256-checked against the bootenv). Then a
SeaBIOS VM boots: DHCP -> iPXE script -> d-i kernel + initrd over HTTP -> d-i configures
its network by DHCP, fetches ``preseed.cfg`` from its one-time install URL and sends its
syslog to the appliance. The test sees both from the appliance's side: the answer-file
event and access-log line, and installer log lines stored for that machine. Finishing the
install is not required (the VM has no disk).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.e2e import vm
from tests.e2e.bootnet import BASE_URL, BRIDGE, SERVER, serving
from tests.e2e.conftest import say

DI_DIR = Path("/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64")
MAC = "52:54:00:40:00:12"
#: QEMU start -> preseed fetched and syslog lines in. TCG measured here: see the
#: terminal summary of a run; the d-i initrd is 40 MB and its kernel boots slowly.
TIMEOUT = float(os.environ.get("APPLIANCE_E2E_DI_TIMEOUT", "600"))


def _json(app, *args: str):  # type: ignore[no-untyped-def]
    return json.loads(app.cli(*args, "--json").stdout)


def test_debian_installer_fetches_preseed(request, vm_host, accel, namespace,  # type: ignore[no-untyped-def]
                                          tmp_path) -> None:
    if not (DI_DIR / "linux").exists():
        if os.environ.get("CI"):
            pytest.fail(f"{DI_DIR} missing (apt-get install debian-installer-12-netboot-amd64)")
        pytest.skip("apt-get install debian-installer-12-netboot-amd64")
    keys = tmp_path / "authorized_keys"
    keys.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2eE2eE2eE2eE2eE2eE2eE2eE2eE2eE2eE2e"
                    "E2eE2e e2e@appliance-test\n")

    def setup(app) -> None:  # type: ignore[no-untyped-def]
        app.cli("profile", "set", "global", "--param-file", f"ssh_authorized_keys={keys}")
        app.cli("machine", "add", MAC, "--hostname", "di-e2e")
        (debian,) = [b for b in _json(app, "bootenvs")["bootenvs"] if b["name"] == "debian-12"]
        for artifact in debian["artifacts"].split(","):
            app.cli("images", "import", artifact)
        app.cli("machine", "set", MAC, "--bootenv", "debian-12")
        # What the machine will receive, as the operator would check it.
        preseed = app.cli("render", MAC, "preseed.cfg").stdout
        assert "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2eE2e" in preseed
        (tmp_path / "preseed.cfg").write_text(preseed)

    # Like a real provisioning network, DHCP hands out a router and a DNS server (the
    # appliance's address: nothing answers DNS there, the preseed URL is an address).
    with serving(namespace, tmp_path, {}, before_start=setup,
                 subnet_options=("--router", SERVER, "--dns", SERVER)) as net:
        app = net.appliance
        vm.add_tap(net.ns, "aptapdi", BRIDGE)
        machine = vm.VM(net.ns, tmp_path, "aptapdi", MAC, firmware="bios", accel=accel,
                        memory_mb=1024)

        def answer_served() -> bool:
            events = _json(app, "events", "--machine", MAC, "--limit", "1000")
            return any(e["kind"] == "answer-file" for e in events)

        def logs() -> list[dict]:
            return _json(app, "logs", MAC)

        machine.start()
        try:
            reached = machine.wait(lambda: answer_served() and len(logs()) >= 5, TIMEOUT,
                                   interval=3)
            seconds = machine.elapsed()
        finally:
            machine.stop()
        applog = re.sub("%3[Aa]", ":", app.log())
        lines = logs()
        events = _json(app, "events", "--machine", MAC, "--limit", "1000")

        def context() -> str:
            return (f"\n--- serial (tail), full in {machine.serial_path} ---\n"
                    f"{machine.serial_tail(40)}\n--- events ---\n"
                    + "\n".join(f"{e['kind']}: {e['message']}" for e in events[-15:])
                    + f"\n--- install log lines: {len(lines)} ---\n"
                    + "\n".join(f"{x['program']}: {x['message']}" for x in lines[-15:])
                    + f"\n--- appliance log (tail) ---\n{applog[-3000:]}")

        assert reached, f"no preseed fetch + syslog from d-i within {TIMEOUT:.0f}s{context()}"
        say(request.config, f"e2e: debian-installer {MAC}: QEMU start -> preseed fetched and "
                            f"syslog in {seconds:.1f} s ({accel.name}), {len(lines)} log lines")

        # The boot script sent d-i's kernel and initrd, imported into the image store.
        for path in ("/images/debian-12/linux", "/images/debian-12/initrd.gz"):
            assert re.search(rf'"GET {re.escape(path)} HTTP/1\.[01]" 200 ', applog), (
                f"no GET {path}{context()}")
        # d-i (its fetch-url, user agent "debian-installer") fetched the preseed from the
        # one-time install URL.
        served = [e for e in events if e["kind"] == "answer-file"]
        assert served[0]["details"]["file"] == "preseed.cfg", served
        assert re.search(r'"GET /install/[A-Za-z0-9_-]{32}/preseed\.cfg HTTP/1\.[01]" 200 .*'
                         r'"debian-installer"', applog), f"no preseed GET by d-i{context()}"
        client = served[0]["details"]["client"]
        assert client.startswith("10.250.40."), served
        # ...and its syslog reached the appliance, stored for this machine.
        programs = {x["program"] for x in lines}
        assert all(x["source"] == "syslog" and x["client"] == client for x in lines), lines[:3]
        assert programs & {"netcfg", "preseed", "main-menu", "anna", "net-retriever",
                           "debconf", "kernel", "init"}, f"programs seen: {programs}{context()}"
        assert BASE_URL in (tmp_path / "preseed.cfg").read_text()
