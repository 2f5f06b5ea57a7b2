"""The issue's end-to-end case: a blank VM, driven by its BMC, reimaged to **ready**
twice, the way an operator does it.

The VM (SeaBIOS, persistent network boot, blank 4 GiB disk) sits behind
``qemu_bmc.py`` on the isolated boot network of ``bootnet.py``. Powered on, it network
boots the discovery image and is registered ``discovered`` (the image powers it off).
Then, with the CLI only:

1. ``appliance machine bmc`` + ``appliance reimage vm image-deploy`` with the Debian 12
   image built by ``images/build-debian-image.sh`` and cloud-init's **NoCloud** datasource:
   the appliance sets the next boot to PXE and power-cycles the VM through the BMC; the
   deploy initrd writes the image and reports done; the VM reboots into it (network boot
   -> bootenv ``local`` -> its disk); stock cloud-init reads the NoCloud seed, installs
   the operator's key, turns password login off and phones home; the appliance checks
   the SSH contract and the machine is ``ready``. The test logs in with the key and sees
   password login refused.
2. The same again over the installed OS, with the **Ec2** datasource: a new instance-id,
   new host keys, ``ready`` again. Then every install token the VM used, and the first
   deployment's seed and phone-home URLs, answer 404.

Phases and their durations come from the machine's ``state`` events and, between them,
marks on the serial console (iPXE's DHCP done, the deploy initrd starting, cloud-init
starting). The appliance's own CPU time over the whole run is read from /proc.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests import netns
from tests.conftest import ApplianceProcess
from tests.e2e.bmcvm import BMC_PASSWORD, BMC_USER, BmcVm
from tests.e2e.bootnet import BASE_URL, serving
from tests.e2e.conftest import say

MAC = "52:54:00:40:20:01"
NAME = "vm1"
#: Seconds from reimage to ready under TCG: PXE 40-100 s, writing the image 60-200 s,
#: the installed OS's first boot with cloud-init 70-170 s; generous for a loaded machine.
READY_TIMEOUT = float(os.environ.get("APPLIANCE_E2E_READY_TIMEOUT", "1500"))
DISCOVERY_TIMEOUT = 300.0
#: Serial console lines that split the phases the appliance cannot see: iPXE's DHCP
#: finishing, the deploy initrd starting (its kernel boots quiet), and cloud-init's
#: first stage in the installed OS.
SERIAL_MARKS = {
    "dhcp": re.compile(r"Configuring \(net0 [0-9a-f:]+\)[ .]*ok"),
    "deploy": re.compile(r"appliance-deploy: start"),
    "cloud-init": re.compile(r"cloud-init\[\d+\]: Cloud-init v\. [\d.]+ running 'init"),
}


class SerialWatch:
    """Notes the wall-clock time of every appearance of each mark on the VM's serial
    console after ``start()`` (polled every half second)."""

    def __init__(self, bvm: BmcVm) -> None:
        self.bvm = bvm
        self.seen: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, marks: dict[str, re.Pattern[str]]) -> None:
        self.stop()
        self.seen = {name: [] for name in marks}
        self.bvm.mark("watch")
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(0.5):
                text = self.bvm.since("watch")
                for name, pattern in marks.items():
                    count = len(pattern.findall(text))
                    self.seen[name].extend([time.time()] * (count - len(self.seen[name])))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def first_after(self, name: str, when: float) -> float | None:
        return next((t for t in self.seen.get(name, []) if t >= when), None)


def _json(app: ApplianceProcess, *args: str) -> Any:
    return json.loads(app.cli(*args, "--json").stdout)


def _ssh(ns: netns.Namespace, key: Path, address: str, *args: str,
         check: bool = True) -> subprocess.CompletedProcess:
    return ns.exec(["ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
                    "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                    "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20",
                    f"root@{address}", *args], check=check, timeout=90)


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its descendants (live ones, and reaped ones through
    their parents' cutime/cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        fields = stats.get(current)
        if fields is None:
            continue
        total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / tick
        todo.extend(children.get(current, []))
    return total


def _reimage(app: ApplianceProcess, bvm: BmcVm, watch: SerialWatch, image: dict[str, str],
             datasource: str) -> dict[str, Any]:
    """One reimage to ready; returns the machine as `machine show` has it then, plus the
    serial marks and the wall time."""
    shown = _json(app, "machine", "show", NAME)
    after = max((e["id"] for e in _json(app, "events", "--machine", MAC, "--limit", "1000")),
                default=0)
    watch.start(SERIAL_MARKS)
    started, started_wall = time.monotonic(), time.time()
    out = app.cli("reimage", NAME, "image-deploy", "--param", f"image={image['path']}",
                  "--param", f"image_sha256={image['sha256']}",
                  "--param", f"cloud_init_datasource={datasource}", "--json").stdout
    deployment = json.loads(out)
    assert deployment["instance_id"] != shown.get("instance_id"), deployment
    state = ""
    deadline = started + READY_TIMEOUT
    while time.monotonic() < deadline:
        shown = _json(app, "machine", "show", NAME)
        state = shown["state"]
        if state in ("ready", "failed"):
            break
        time.sleep(3)
    seconds = time.monotonic() - started
    watch.stop()
    events = [e for e in _json(app, "events", "--machine", MAC, "--limit", "1000")
              if e["id"] > after]
    context = (f"\nstate {state}: {shown.get('state_reason')}\n--- state events ---\n"
               + "\n".join(f"{e['at']} {e['message']}" for e in events
                           if e["kind"] in ("state", "power", "power-failed", "install-finished",
                                            "phone-home-refused", "metadata-error"))
               + bvm.context() + f"\n--- appliance log ---\n{app.log()[-4000:]}")
    assert state == "ready", f"not ready after {seconds:.0f} s{context}"
    return {"machine": shown, "events": events, "seconds": seconds, "started": started_wall,
            "deployment": deployment}


def _at(event: dict[str, Any]) -> float:
    at = datetime.fromisoformat(event["at"])
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def _phases(run: dict[str, Any], watch: SerialWatch) -> dict[str, float | None]:
    """Seconds per phase of one reimage, between the machine's state events and what the
    serial console showed in between. None: a boundary was not seen (said, not guessed).

    - BMC power: reimage -> the power cycle done (state step power-done)
    - firmware + DHCP: -> iPXE's DHCP ``ok``
    - boot loader: -> the deploy initrd starts (boot script, undionly chain, kernel and
      initrd over HTTP, kernel boot)
    - deploy: -> install-done (image streamed, verified, datasource written)
    - reboot: -> the installed OS's cloud-init starts (firmware, PXE, local boot, kernel)
    - cloud-init: -> phone-home
    - contract check: -> contract-passed (ready)
    """
    steps: dict[str, float] = {}
    for event in run["events"]:
        step = (event.get("details") or {}).get("step")
        if event["kind"] == "state" and step and step not in steps:
            steps[step] = _at(event)
    power_done = steps.get("power-done")
    dhcp = watch.first_after("dhcp", power_done) if power_done else None
    deploy = watch.first_after("deploy", steps["booted"]) if "booted" in steps else None
    cloud_init = (watch.first_after("cloud-init", steps["install-done"])
                  if "install-done" in steps else None)
    bounds = [("BMC power", run["started"], power_done),
              ("firmware + DHCP", power_done, dhcp),
              ("boot loader", dhcp, deploy),
              ("deploy", deploy, steps.get("install-done")),
              ("reboot", steps.get("install-done"), cloud_init),
              ("cloud-init", cloud_init, steps.get("phone-home")),
              ("contract check", steps.get("phone-home"), steps.get("contract-passed"))]
    return {name: (round(end - begin, 1) if begin is not None and end is not None else None)
            for name, begin, end in bounds}


def _tokens(log: str) -> dict[str, set[str]]:
    """Install and seed tokens the VM used, from the appliance's access log."""
    return {"install": set(re.findall(r'"(?:GET|POST) /install/([A-Za-z0-9_-]+)/', log)),
            "seed": set(re.findall(r'"(?:GET|POST) /(?:nocloud|phone-home)/([A-Za-z0-9_-]+)',
                                   log))}


def _status(ns: netns.Namespace, url: str, method: str = "GET") -> int:
    out = ns.exec(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method,
                   "--max-time", "10", url], check=False).stdout
    return int(out or 0)


def test_reimage_a_vm_to_ready_twice(request, vm_host, accel, namespace, tmp_path,  # type: ignore[no-untyped-def]
                                     discovery_images, deploy_images, debian_image,
                                     bmc_vm_factory) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "e2e@operator",
                    "-f", str(key)], check=True, timeout=30)
    image: dict[str, str] = {}

    def setup(app: ApplianceProcess) -> None:
        app.cli("profile", "set", "global", "--param-file",
                f"ssh_authorized_keys={key}.pub")
        app.cli("images", "import", str(debian_image.path), "--sha256", debian_image.sha256,
                "--name", "debian-12-os", "-q", timeout=600)
        (entry,) = [a for a in _json(app, "images", "list") if a["name"] == "debian-12-os"]
        assert entry["state"] == "ok", entry
        image.update(path=entry["files"][0]["path"], sha256=debian_image.sha256)

    images = {f"discovery/{f}": discovery_images / f for f in ("vmlinuz", "initrd.img")}
    images.update({f"deploy/{f}": deploy_images / f for f in ("vmlinuz", "initrd.img")})
    with serving(namespace, tmp_path, images, before_start=setup) as net:
        app = net.appliance
        bvm = bmc_vm_factory("aptapreimg", MAC, accel, memory_mib=1024, disk_size="4G",
                             once_settle=20.0)
        watch = SerialWatch(bvm)
        cpu_before = _cpu_seconds(app.proc.pid)
        t0 = time.monotonic()

        # 0. a blank VM, booting from the network, is discovered (and powers off)
        bvm.start(boot_device="network", power_on=True)
        netns.wait_for(lambda: any(m["mac"] == MAC and m["state"] == "discovered"
                                   for m in _json(app, "machines")), DISCOVERY_TIMEOUT,
                       interval=2, what="the blank VM discovered")
        netns.wait_for(lambda: any(e["kind"] == "checkin" for e in _json(
            app, "events", "--machine", MAC)), DISCOVERY_TIMEOUT, interval=2,
            what="the discovery image's check-in")
        discovered_s = time.monotonic() - t0
        app.cli("machine", "set", MAC, "--hostname", NAME)
        app.cli("machine", "bmc", NAME, "--driver", "ipmi", "--address", "127.0.0.1",
                "--port", str(bvm.port), "--username", BMC_USER, "--password-stdin",
                input=BMC_PASSWORD + "\n")

        runs = []
        for datasource in ("nocloud", "ec2"):
            run = _reimage(app, bvm, watch, image, datasource)
            machine = run["machine"]
            address = [lease["ip"] for lease in _json(app, "leases")
                       if lease["mac"] == MAC][-1]
            # the contract as the operator sees it: their key logs in, passwords do not
            got = _ssh(net.ns, key, address, "cat /var/lib/cloud/data/instance-id; hostname; "
                       "cloud-init status; python3 -c 'import json; print(json.load(open("
                       "\"/run/cloud-init/result.json\"))[\"v1\"][\"datasource\"])'; "
                       "ls /etc/cloud/cloud.cfg.d/").stdout.splitlines()
            assert got[0] == machine["instance_id"], (got, machine["instance_id"])
            assert got[1] == NAME, got
            assert got[2] == "status: done", got
            wanted = {"nocloud": "DataSourceNoCloudNet", "ec2": "DataSourceEc2"}[datasource]
            assert got[3].startswith(wanted), got
            assert "99-appliance.cfg" in got[4:], got  # sorts after what images ship
            refused = net.ns.exec(["ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
                                   "-o", "PreferredAuthentications=password,"
                                   "keyboard-interactive", "-o", "PubkeyAuthentication=no",
                                   "-o", "StrictHostKeyChecking=no",
                                   "-o", "UserKnownHostsFile=/dev/null",
                                   f"root@{address}", "true"], check=False, timeout=60)
            assert refused.returncode == 255, refused
            assert "Permission denied (publickey)" in refused.stderr, refused.stderr
            contract = machine["contract"]
            assert contract["ok"] is True and contract["auth_methods"] == ["publickey"], \
                contract
            run["address"] = address
            run["host_keys"] = machine["ssh_host_keys"]
            run["tokens"] = _tokens(app.log())
            runs.append(run)
            phases = _phases(run, watch)
            say(request.config, f"e2e: reimage ({datasource}) -> ready in "
                                f"{run['seconds']:.0f} s ({accel.name}): "
                                + ", ".join(f"{k} {'?' if v is None else f'{v:.0f}'} s"
                                            for k, v in phases.items()))
            assert all(v is not None for v in phases.values()), phases
            # the appliance's own boot timeline of this run, drawn from the events the
            # DHCP, TFTP and HTTP parts wrote while the VM booted
            tl = json.loads(app.cli("machine", "timeline", NAME, "--json").stdout)
            got = {p["phase"]: (p["status"], p["seconds"]) for p in tl["phases"]}
            say(request.config, f"e2e: timeline ({datasource}): {tl['outcome']} "
                                f"{tl['seconds']:.0f} s: " + ", ".join(
                                    f"{name} {st if st != 'done' else f'{sec:.0f} s'}"
                                    for name, (st, sec) in got.items()))
            assert tl["outcome"] == "ready" and tl["deployment"] == run["deployment"]["number"]
            for phase in ("power", "dhcp", "script", "kernel", "installer", "reboot",
                          "cloud-init", "phone-home", "contract"):
                assert got[phase][0] == "done", (phase, tl)
            assert got["tftp"][0] in ("done", "skipped"), tl
            assert abs(tl["seconds"] - run["seconds"]) < 15, (tl["seconds"], run["seconds"])

        first, second = runs
        assert first["machine"]["instance_id"] != second["machine"]["instance_id"]
        assert first["host_keys"] != second["host_keys"], "the second OS kept the host keys"
        assert first["deployment"]["number"] + 1 == second["deployment"]["number"]
        # every install token the VM used is dead now that it is ready, and the first
        # deployment's NoCloud seed and phone-home died with the second reimage
        install = second["tokens"]["install"]
        assert len(install) == 2, second["tokens"]
        for token in install:
            for path in ("deploy.env", "done"):
                status = _status(net.ns, f"{BASE_URL}/install/{token}/{path}",
                                 "POST" if path == "done" else "GET")
                assert status == 404, (token, path, status)
        (seed,) = first["tokens"]["seed"]
        assert _status(net.ns, f"{BASE_URL}/nocloud/{seed}/meta-data") == 404
        assert _status(net.ns, f"{BASE_URL}/phone-home/{seed}", "POST") == 404
        cpu = _cpu_seconds(app.proc.pid) - cpu_before
        wall = time.monotonic() - t0
        say(request.config, f"e2e: blank VM discovered in {discovered_s:.0f} s; whole run "
                            f"{wall:.0f} s, appliance CPU {cpu:.1f} s "
                            f"({100 * cpu / wall:.1f}% of one core)")
