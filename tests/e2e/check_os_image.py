"""Check the Debian OS image end to end, by hand (not a pytest test; root, a few minutes
under TCG per datasource):

    python -m tests.e2e.check_os_image [--datasource nocloud|ec2|both] [--workdir DIR]

1. builds (or takes from the cache) the deploy initrd (images/build-deploy.sh) and the OS
   image (images/build-debian-image.sh);
2. in a fresh network namespace, a real ``appliance serve`` (tests/e2e/bootnet.py) with
   the image imported (``appliance images import PATH --sha256``) and a machine set to
   bootenv image-deploy (``cloud_init_datasource`` as asked, ``after_deploy=poweroff``):
   a BIOS VM with a blank 4 GiB disk PXE-boots the deploy initrd, which writes the image,
   writes /etc/cloud/cloud.cfg.d/99-appliance.cfg into it, reports done, powers off;
3. the appliance stops; dnsmasq (DHCP only) and tests/e2e/metadata_standin.py take its
   place on the same address and port (the seed and metadata URLs the deploy wrote name
   it), serving the user-data the appliance renders for the machine;
4. the VM boots from its disk; the check waits for cloud-init's phone-home, then logs in
   with the key over SSH from the namespace and reads what cloud-init, ds-identify, sshd
   and growpart did; a password login must be refused.

Prints a summary (times, sizes, findings) and writes it as JSON to the work directory.
Everything runs inside the namespace; processes are stopped by PID, the namespace deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import netns
from tests.e2e import vm
from tests.e2e.bootnet import BRIDGE, SERVER, serving
from tests.e2e.conftest import DEPLOY_BUILD_SCRIPT, REPO, build_debian_image
from tests.e2e.metadata_standin import read_log

OS_IP = "10.250.40.50"
MACS = {"nocloud": "52:54:00:40:00:51", "ec2": "52:54:00:40:00:52"}
DEPLOY_TIMEOUT = 900
PHONE_HOME_TIMEOUT = 900


class DiskVM(vm.VM):
    """The same VM, booting from its disk instead of the network (own serial log)."""

    @property
    def serial_path(self) -> Path:
        return self.workdir / f"serial-os-{self.mac.replace(':', '')}.log"

    @property
    def qemu_log_path(self) -> Path:
        return self.workdir / f"qemu-os-{self.mac.replace(':', '')}.log"

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("-boot") + 1] = "c"
        return cmd


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def ssh(ns: netns.Namespace, key: Path, command: str, user: str = "root",
        check: bool = False) -> subprocess.CompletedProcess:
    return ns.exec(["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no",
                    "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                    "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
                    f"{user}@{OS_IP}", command], check=check, timeout=120)


FALLBACK_USER_DATA = """#cloud-config
disable_root: false
ssh_pwauth: false
ssh_authorized_keys: [{key}]
phone_home: {{url: "http://{server}:8080/phone-home/standin", post: all, tries: 10}}
"""


def check(datasource: str, work: Path, deploy_images: Path, image, key: Path,  # type: ignore[no-untyped-def]
          accel: vm.Accel) -> dict:
    mac = MACS[datasource]
    result: dict = {"datasource": datasource, "mac": mac}
    pub = key.with_suffix(".pub").read_text().strip()
    keys_file = work / "authorized_keys"
    keys_file.write_text(pub + "\n")
    disk = vm.blank_disk(work / "disk.qcow2", "4G")
    rendered: dict[str, str] = {}

    def setup(app) -> None:  # type: ignore[no-untyped-def]
        app.cli("profile", "set", "global", "--param-file", f"ssh_authorized_keys={keys_file}")
        app.cli("images", "import", str(image.path), "--sha256", image.sha256,
                "--name", "debian-12", "-q", timeout=600)
        (entry,) = [a for a in json.loads(app.cli("images", "list", "--json").stdout)
                    if a["name"] == "debian-12"]
        (path,) = [f["path"] for f in entry["files"]]
        app.cli("machine", "add", mac, "--hostname", f"os-{datasource}")
        app.cli("machine", "set", mac, "--bootenv", "image-deploy",
                "--param", f"image={path}", "--param", f"image_sha256={image.sha256}",
                "--param", "after_deploy=poweroff",
                "--param", f"cloud_init_datasource={datasource}")
        for name in ("deploy.env", "user-data"):
            out = app.cli("render", mac, name, check=False)
            rendered[name] = out.stdout if out.returncode == 0 else ""
            (work / name).write_text(out.stdout or out.stderr)

    ns = netns.new_namespace()
    try:
        images = {f"deploy/{f}": deploy_images / f for f in ("vmlinuz", "initrd.img")}
        with serving(ns, work, images, before_start=setup) as net:
            vm.add_tap(ns, "aptaposimg", BRIDGE)
            machine = vm.VM(ns, work, "aptaposimg", mac, firmware="bios", accel=accel,
                            disk=disk, memory_mb=1024)
            say(f"{datasource}: PXE deploy starts")
            machine.start()
            try:
                done = machine.wait(lambda: re.search(r"APPLIANCE-DEPLOY-(DONE|FAILED)",
                                                      machine.serial()) is not None,
                                    DEPLOY_TIMEOUT, interval=1)
                result["pxe_to_deploy_done_s"] = round(machine.elapsed(), 1)
                machine.wait_exit(120)
            finally:
                machine.stop()
            serial = machine.serial()
            logs = json.loads(net.appliance.cli("logs", mac, "--json").stdout)
            result["deploy_log"] = [x["message"] for x in logs
                                    if x["program"] == "appliance-deploy"]
            if not done or "APPLIANCE-DEPLOY-DONE" not in serial:
                result["error"] = "deploy did not finish"
                result["serial_tail"] = serial[-3000:]
                return result
        written = [m for m in result["deploy_log"] if m.startswith("image written:")]
        if written:
            m = re.search(r"(\d+) bytes in ([\d.]+)s", written[0])
            if m:
                result["deploy_raw_bytes"] = int(m.group(1))
                result["deploy_write_s"] = float(m.group(2))
        say(f"{datasource}: deployed: {written[:1]}")

        # the stand-in takes the appliance's place: DHCP (dnsmasq) + metadata on its address
        user_data = rendered.get("user-data") or FALLBACK_USER_DATA.format(
            key=json.dumps(pub), server=SERVER)
        result["user_data_from"] = "appliance render" if rendered.get("user-data") else \
            "fallback"
        (work / "standin-user-data").write_text(user_data)
        standin_log = work / "standin.jsonl"
        ns.popen(["dnsmasq", "--conf-file=/dev/null", "--keep-in-foreground", "--port=0",
                  f"--interface={BRIDGE}", "--bind-interfaces", "--user=root",
                  "--group=root", "--dhcp-range=10.250.40.100,10.250.40.200,255.255.255.0,1h",
                  f"--dhcp-host={mac},{OS_IP}", f"--dhcp-leasefile={work / 'leases'}",
                  "--log-dhcp", f"--log-facility={work / 'dnsmasq.log'}"],
                 log=work / "dnsmasq.out")
        ns.popen([sys.executable, "-m", "tests.e2e.metadata_standin", "--bind", SERVER,
                  "--port", "8080", "--log", str(standin_log),
                  "--user-data", str(work / "standin-user-data"),
                  "--public-key", str(key.with_suffix(".pub")),
                  "--instance-id", f"i-{datasource}-check", "--hostname", f"os-{datasource}"],
                 log=work / "standin.out", cwd=str(REPO))
        netns.wait_for(lambda: read_log(standin_log), 20, what="the stand-in server")

        os_vm = DiskVM(ns, work, "aptaposimg", mac, firmware="bios", accel=accel, disk=disk,
                       memory_mb=1024)
        os_vm.serial_path.write_bytes(b"")
        say(f"{datasource}: booting the written disk")
        os_vm.start()
        t0 = time.time()
        try:
            def phoned() -> dict | None:
                return next((e for e in read_log(standin_log)
                             if e.get("event") == "phone-home"), None)

            got = os_vm.wait(lambda: phoned() is not None, PHONE_HOME_TIMEOUT, interval=1)
            if not got:
                result["error"] = "no phone-home"
                result["serial_tail"] = os_vm.serial()[-4000:]
                return result
            ph = phoned()
            assert ph is not None
            result["vm_start_to_phone_home_s"] = round(ph["t"] - t0, 1)
            result["phone_home_fields"] = sorted(ph["fields"])
            result["phone_home_instance_id"] = ph["fields"].get("instance_id")
            say(f"{datasource}: phone-home after {result['vm_start_to_phone_home_s']} s")
            result["requests"] = [f"{e['method']} {e['path']} {e['status']}"
                                  for e in read_log(standin_log) if "method" in e]
            netns.wait_for(lambda: ssh(ns, key, "true").returncode == 0, 120, interval=3,
                           what="ssh as root with the key")
            probes = {
                "cloud_init_status": "cloud-init status --long",
                "cloud_id": "cloud-id; cloud-init query v1.subplatform",
                "ds_identify_cfg": "cat /run/cloud-init/cloud.cfg",
                "ds_identify_log": "grep -E 'single entry|DSLIST|found=|Found|mode=|policy'"
                                   " /run/cloud-init/ds-identify.log",
                "appliance_cfg": "ls -l /etc/cloud/cloud.cfg.d/; "
                                 "cat /etc/cloud/cloud.cfg.d/99-appliance.cfg",
                "sshd": "sshd -T | grep -E '^(passwordauthentication|"
                        "kbdinteractiveauthentication|permitrootlogin|pubkeyauthentication) '",
                "root_keys": "cat /root/.ssh/authorized_keys",
                "root_fs": "df -B1M --output=source,size,used,avail / | tail -n 1; "
                           "lsblk -b -n -o NAME,SIZE /dev/vda",
                "growpart": "grep -E 'growpart|resize' /var/log/cloud-init.log | tail -n 4",
                "warnings": "grep -E 'WARNING|ERROR|Traceback' /var/log/cloud-init.log | "
                            "head -n 15",
                "locale_hostname": "cat /etc/default/locale; hostname; hostname -f",
                "shadow_root": "grep '^root:' /etc/shadow | cut -d: -f1,2",
                "boot_time": "systemd-analyze 2>&1 | head -n 1",
            }
            result["probes"] = {name: (p := ssh(ns, key, cmd)).stdout.strip()
                                + (f"\n[rc={p.returncode}] {p.stderr.strip()}"
                                   if p.returncode else "")
                                for name, cmd in probes.items()}
            pw = ns.exec(["ssh", "-o", "StrictHostKeyChecking=no", "-o",
                          "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                          "-o", "PubkeyAuthentication=no", "-o",
                          "PreferredAuthentications=password,keyboard-interactive",
                          f"root@{OS_IP}", "true"], check=False, timeout=60)
            result["password_login"] = (pw.returncode, pw.stderr.strip()[-200:])
        finally:
            os_vm.stop()
    finally:
        ns.delete()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasource", choices=["nocloud", "ec2", "both"], default="both")
    ap.add_argument("--workdir", type=Path)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces, VMs)")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="check-os-image-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"work directory {work}")
    deploy_images = work / "deploy-images"
    subprocess.run(["bash", str(DEPLOY_BUILD_SCRIPT), str(deploy_images)], check=True,
                   capture_output=True, timeout=900)
    t = time.time()
    image, log = build_debian_image(work / "os-image")
    say(f"OS image {image.path.name} {image.sha256} in {time.time() - t:.0f}s: "
        f"{log.strip().splitlines()[-1]}")
    key = work / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "check-os-image",
                        "-f", str(key)], check=True)
    accel = vm.choose_accel(deploy_images, work)
    say(accel.banner())
    results = []
    for ds in (["nocloud", "ec2"] if a.datasource == "both" else [a.datasource]):
        d = work / ds
        d.mkdir(exist_ok=True)
        r = check(ds, d, deploy_images, image, key, accel)
        r["image"] = {"file": image.path.name, "sha256": image.sha256,
                      "zst_bytes": image.path.stat().st_size, **image.buildinfo}
        (work / f"summary-{ds}.json").write_text(json.dumps(r, indent=2))
        results.append(r)
        print(json.dumps(r, indent=2), flush=True)
    failed = [r["datasource"] for r in results if "error" in r]
    sys.exit(f"failed: {failed}" if failed else 0)


if __name__ == "__main__":
    main()
