"""The HTTP part under the real daemon (gunicorn), fetched with curl inside a namespace;
and the supervisor: a part that dies is restarted, SIGTERM stops everything."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests import netns
from tests.conftest import ApplianceProcess

ADDR = "10.250.60.1"
BASE = f"http://{ADDR}:8080"


@pytest.fixture
def appliance(namespace: netns.Namespace, tmp_path: Path):  # type: ignore[no-untyped-def]
    netns.bridge(namespace, "br0", f"{ADDR}/24")
    state = tmp_path / "state"
    kernel = state / "images" / "discovery" / "vmlinuz"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (kernel.parent / "initrd.img").write_bytes(b"initrd")
    app = ApplianceProcess(namespace, tmp_path, f'state_dir = "{state}"\n'
                           "[dhcp]\nenabled = false\n[tftp]\nenabled = false\n")
    app.start()
    netns.wait_for(lambda: namespace.exec(["curl", "-sf", f"{BASE}/healthz"],
                                          check=False).returncode == 0, 30,
                   what="HTTP part up:\n" + app.log())
    yield app, kernel
    app.stop()


def curl(ns: netns.Namespace, *args: str) -> bytes:
    return ns.exec(["curl", "-sS", "--max-time", "20", *args], text=False).stdout


def test_boot_script_and_discovery(appliance) -> None:  # type: ignore[no-untyped-def]
    app, _ = appliance
    script = curl(app.ns, "-f", f"{BASE}/boot/52:54:00:60:00:01.ipxe").decode()
    assert script.startswith("#!ipxe")
    assert f"kernel {BASE}/images/discovery/vmlinuz" in script
    curl(app.ns, "-f", f"{BASE}/boot/52:54:00:60:00:01/checkin?stage=discovery")
    machines = json.loads(app.cli("machines", "--json").stdout)
    assert [(m["mac"], m["state"]) for m in machines] == [("52:54:00:60:00:01", "discovered")]
    assert machines[0]["seen_on"] == f"http {ADDR}"
    events = json.loads(app.cli("events", "--json").stdout)
    assert [e["kind"] for e in events] == ["discovered", "boot-script", "checkin"]
    assert events[-1]["details"]["stage"] == "discovery"


def test_kernel_download_whole_and_ranges(appliance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    app, kernel = appliance
    data = kernel.read_bytes()
    url = f"{BASE}/images/discovery/vmlinuz"
    assert curl(app.ns, "-f", url) == data
    assert curl(app.ns, "-f", "-r", "1000-2999999", url) == data[1000:3000000]
    assert curl(app.ns, "-f", "-r", "-100", url) == data[-100:]
    # resumed download: curl -C continues a partial file with a Range request
    partial = tmp_path / "partial"
    partial.write_bytes(data[:1234567])
    app.ns.exec(["curl", "-sSf", "-C", "-", "-o", str(partial), url])
    assert partial.read_bytes() == data
    head = app.ns.exec(["curl", "-sSI", "-r", f"{len(data)}-", url]).stdout
    assert head.startswith("HTTP/1.1 416")
    for bad in ("/images/../appliance.db", "/images/%2e%2e/appliance.db", "/images/nope"):
        code = app.ns.exec(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            f"{BASE}{bad}"]).stdout
        assert code == "404", bad


def test_dead_part_is_restarted_and_sigterm_stops_all(namespace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    netns.bridge(namespace, "br0", f"{ADDR}/24")
    app = ApplianceProcess(namespace, tmp_path, f'state_dir = "{tmp_path / "state"}"\n'
                           "[dhcp]\nenabled = false\n[tftp]\nenabled = false\n")
    app.start()
    up = lambda: namespace.exec(["curl", "-sf", f"{BASE}/healthz"],  # noqa: E731
                                check=False).returncode == 0
    netns.wait_for(up, 30, what="HTTP up")
    app.wait_log("part http started (pid ")
    pid = int(app.log().split("part http started (pid ")[1].split(")")[0])
    os.kill(pid, signal.SIGKILL)
    app.wait_log(f"part http (pid {pid}) exited", 10)
    netns.wait_for(lambda: "restarting part http" in app.log() and up(), 30,
                   what="HTTP restarted:\n" + app.log())
    assert app.proc is not None
    app.proc.send_signal(signal.SIGTERM)  # to the supervisor only
    assert app.proc.wait(20) == 0
    assert "part http stopped" in app.log()
    assert not up()
    app.proc = None
