"""The shipped installer bootenvs, rendered through the real pipeline and checked with the
distributions' own validators.

A state directory and SQLite database, machines registered as the DHCP/HTTP parts do
(``record_seen``), the operator's keys on the ``global`` profile and site settings on a
second profile, each bootenv assigned (which starts an install), then every answer file
rendered by ``render_machine_file`` (and once by the real CLI) and checked with:

- kickstart: pykickstart's ``ksvalidator -v RHEL9`` (PyPI ``pykickstart``, a test
  dependency);
- preseed: ``debconf-set-selections --checkonly`` (Debian's debconf);
- every cloud-config (autoinstall user-data, its nested ``autoinstall.user-data``, the
  image-deploy user-data): ``cloud-init schema -c`` (Debian's cloud-init);
- deploy.json: strict JSON with the expected keys.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from appliance.catalog import Catalog, load_catalog
from appliance.config import Config
from appliance.db import Database
from appliance.lifecycle import record_seen
from appliance.machinefiles import BootTarget, render_machine_file
from appliance.models import Machine
from appliance.profiles import configure_machine, set_profile

TARGET = BootTarget(base_url="http://10.0.0.1:8080", server="10.0.0.1")
KEYS = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv1cHJvdmlzaW9uaW5nLWFwcGxpYW5jZS10ZXN0 ops@example.com",
    'from="10.0.0.0/8",no-agent-forwarding ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 it\'s ops',
]
SITE = {"timezone": "Europe/Berlin", "ntp_servers": ["ntp1.example.com", "ntp2.example.com"],
        "extra_packages": ["vim", "htop"], "proxy": "http://proxy.example.com:3128"}
IMAGE_SHA = "ab" * 32
INSTALLERS = {
    # bootenv: (MAC, the answer files it serves)
    "debian-12": ("52:54:00:0a:00:01", ["preseed.cfg"]),
    "ubuntu-24.04": ("52:54:00:0a:00:02", ["user-data", "meta-data", "vendor-data"]),
    "rocky-9": ("52:54:00:0a:00:03", ["ks.cfg"]),
    "alma-9": ("52:54:00:0a:00:04", ["ks.cfg"]),
    "image-deploy": ("52:54:00:0a:00:05", ["deploy.json", "user-data"]),
}


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (it comes with {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def ksvalidate(path: Path) -> str:
    """ksvalidator -v RHEL9; return what it said besides its "Checking ..." banner."""
    ksvalidator = tool("ksvalidator", "PyPI pykickstart")
    result = run(ksvalidator, "-v", "RHEL9", str(path))
    output = "\n".join(line for line in (result.stdout + result.stderr).splitlines()
                       if line.strip() and not line.startswith("Checking kickstart file"))
    assert result.returncode == 0, output
    return output


@dataclass
class Rendered:
    """One machine's bootenv, its files as served, and the session values they used."""

    bootenv: str
    mac: str
    files: dict[str, str]
    install_url: str
    seed_url: str


@dataclass
class Env:
    config: Config
    config_path: Path
    db: Database
    catalog: Catalog
    rendered: dict[str, Rendered]
    out: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("answers")
    state = root / "state"
    config_path = root / "appliance.toml"
    config_path.write_text(f'state_dir = "{state}"\n')
    config = Config(state_dir=str(state))
    db = Database(config.effective_database_url)
    db.migrate()
    catalog = load_catalog(config)
    assert catalog.errors == []
    assert set(INSTALLERS) <= set(catalog.bootenvs)
    rendered: dict[str, Rendered] = {}
    with db.session() as session:
        set_profile(session, catalog, "global", {"ssh_authorized_keys": KEYS})
        set_profile(session, catalog, "site", SITE)
        for name, (mac, files) in INSTALLERS.items():
            machine = record_seen(session, mac, "test", actor="test", arch="bios")
            values = ({"image": "os/debian-12-generic.raw.zst", "image_sha256": IMAGE_SHA}
                      if name == "image-deploy" else {})
            configure_machine(session, catalog, machine, bootenv=name, profiles=["site"],
                              values=values, hostname=f"{name.replace('.', '')}.lab.example")
            out = {f: render_machine_file(config, session, catalog, machine, f, TARGET)
                   for f in [*files, "kernel-params"]}
            rendered[name] = Rendered(
                bootenv=name, mac=mac, files=out,
                install_url=f"{TARGET.base_url}/install/{machine.install_token}",
                seed_url=f"{TARGET.base_url}/nocloud/{machine.seed_token}/")
    out_dir = root / "out"
    for name, r in rendered.items():
        for file, text in r.files.items():
            path = out_dir / name / file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    yield Env(config, config_path, db, catalog, rendered, out_dir)
    db.engine.dispose()


def contract_checks(text: str, r: Rendered) -> None:
    """What every installer's answer file must carry (the issue's post-provision contract)."""
    for key in KEYS:
        assert key.split()[1] in text or key.split()[2] in text
    assert "PasswordAuthentication no" in text
    assert "/etc/ssh/sshd_config.d/01-appliance.conf" in text
    assert "/etc/cloud/cloud.cfg.d/99-appliance.cfg" in text
    assert "datasource_list: [NoCloud, None]" in text
    assert f'seedfrom: "{r.seed_url}"' in text
    assert f"{r.install_url}/done" in text
    assert f"{r.install_url}/log" in text
    assert "openssh-server" in text and "cloud-init" in text
    assert "{{" not in text and "{%" not in text


# ---- kickstart ---------------------------------------------------------------------------

@pytest.mark.parametrize("bootenv", ["rocky-9", "alma-9"])
def test_kickstart_passes_ksvalidator(env: Env, bootenv: str) -> None:
    r = env.rendered[bootenv]
    # No warnings at all: nothing deprecated, nothing ignored.
    assert ksvalidate(env.out / bootenv / "ks.cfg") == ""
    ks = r.files["ks.cfg"]
    contract_checks(ks, r)
    mirror = env.catalog.bootenvs[bootenv].params["mirror"].default
    assert f"url --url={mirror}/BaseOS/x86_64/os/ --proxy={SITE['proxy']}" in ks
    assert f"repo --name=AppStream --baseurl={mirror}/AppStream/x86_64/os/" in ks
    assert "rootpw --lock" in ks
    assert "timezone Europe/Berlin --utc" in ks
    assert "timesource --ntp-server=ntp2.example.com" in ks
    assert "%include /tmp/appliance-disk.ks" in ks  # no root_disk: %pre picks one
    assert "\nvim\nhtop\n" in ks
    assert "--hostname=rocky-9.lab.example" in ks or "--hostname=alma-9.lab.example" in ks
    # The done report is the very last command.
    assert ks.rstrip().splitlines()[-2].startswith("curl -fsS")
    assert ks.rstrip().endswith("%end")


def ks_section(text: str, header: str) -> str:
    """The body of the kickstart section that starts with the line ``header``."""
    body = text.split(f"\n{header}\n", 1)[1]
    return body.split("\n%end\n", 1)[0]


def stubs(bin_dir: Path, calls: Path, *names: str) -> dict[str, str]:
    """Commands that only record their arguments; returns the environment to run with."""
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n')
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_kickstart_post_sections_write_the_contract_then_report(env: Env,
                                                                tmp_path: Path) -> None:
    """Run the %post (chroot) against a fake root and the --nochroot one with stub curl."""
    r = env.rendered["rocky-9"]
    ks = r.files["ks.cfg"]
    root = tmp_path / "sysimage"
    calls = tmp_path / "calls"
    run_env = stubs(tmp_path / "bin", calls, "passwd", "restorecon", "curl")
    post = ks_section(ks, "%post --erroronfail --log=/root/appliance-post.log")
    post = post.replace("/root/", f"{root}/root/").replace("/etc/", f"{root}/etc/")
    result = subprocess.run(["sh", "-c", post], capture_output=True, text=True, env=run_env)
    assert result.returncode == 0, result.stderr
    assert (root / "root/.ssh/authorized_keys").read_text().splitlines() == KEYS
    assert "PasswordAuthentication no" in \
        (root / "etc/ssh/sshd_config.d/01-appliance.conf").read_text()
    cloud_cfg = root / "etc/cloud/cloud.cfg.d/99-appliance.cfg"
    cloud_init_valid(cloud_cfg, header=True)
    assert yaml.safe_load(cloud_cfg.read_text())["datasource"] == {
        "NoCloud": {"seedfrom": r.seed_url}}
    nochroot = ks_section(
        ks, "%post --nochroot --log=/mnt/sysimage/root/appliance-post-nochroot.log")
    logs = tmp_path / "tmp"
    logs.mkdir()
    (logs / "anaconda.log").write_text("line\n")
    result = subprocess.run(["sh", "-c", nochroot.replace("/tmp/", f"{logs}/")],
                            capture_output=True, text=True, env=run_env)
    assert result.returncode == 0, result.stderr
    log = calls.read_text().splitlines()
    assert log[:2] == ["passwd --lock root", f"restorecon -R {root}/root/.ssh "
                       f"{root}/etc/ssh/sshd_config.d {root}/etc/cloud/cloud.cfg.d"]
    assert log[2].endswith(f"--data-binary @{logs}/anaconda.log "
                           f"{r.install_url}/log?program=anaconda-anaconda")
    assert len(log) == 4 and log[3].endswith(f"--data bootenv=rocky-9 {r.install_url}/done")


def test_kickstart_with_root_disk_passes_ksvalidator(env: Env) -> None:
    with env.db.session() as session:
        machine = session.query(Machine).filter_by(mac=INSTALLERS["rocky-9"][0]).one()
        configure_machine(session, env.catalog, machine, values={"root_disk": "/dev/nvme0n1"})
        text = render_machine_file(env.config, session, env.catalog, machine, "ks.cfg", TARGET)
        session.rollback()
    assert "ignoredisk --only-use=nvme0n1" in text and "%include" not in text
    assert "%pre" not in text
    path = env.out / "rocky-9-disk.ks"
    path.write_text(text)
    assert ksvalidate(path) == ""


# ---- preseed ----------------------------------------------------------------------------

def debconf_check(path: Path) -> None:
    checker = tool("debconf-set-selections", "Debian's debconf")
    result = run(checker, "--checkonly", str(path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # It only warns (exit 0) on an unknown type and skips the line: none allowed.
    assert "warning" not in output.lower() and "error" not in output.lower(), output


def preseed_values(text: str) -> dict[str, str]:
    """The preseed's question -> value, continuation lines joined as d-i does."""
    joined = text.replace("\\\n", "")
    values = {}
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        owner, question, kind, *value = line.split(None, 3)
        values[question] = value[0] if value else ""
    return values


def test_preseed_passes_debconf_checkonly(env: Env) -> None:
    r = env.rendered["debian-12"]
    debconf_check(env.out / "debian-12" / "preseed.cfg")
    text = r.files["preseed.cfg"]
    contract_checks(text, r)
    values = preseed_values(text)
    assert values["netcfg/get_hostname"] == "debian-12"
    assert values["netcfg/get_domain"] == "lab.example"
    assert values["mirror/http/hostname"] == "deb.debian.org"
    assert values["mirror/http/directory"] == "/debian"
    assert values["mirror/http/proxy"] == SITE["proxy"]
    assert values["time/zone"] == "Europe/Berlin"
    assert values["passwd/root-password-crypted"] == "!"
    assert values["passwd/make-user"] == "false"
    assert values["pkgsel/include"].split() == [
        "openssh-server", "cloud-init", "systemd-timesyncd", "vim", "htop"]
    assert "list-devices disk | head -n1" in values["partman/early_command"]
    late = values["preseed/late_command"]
    assert "\\" not in late  # no backslash reaches d-i's shell
    assert late.rstrip().endswith(f"--post-data 'bootenv=debian-12' '{r.install_url}/done'")
    assert f"--post-file=/var/log/syslog '{r.install_url}/log?program=debian-installer'" \
        in late


def test_preseed_late_command_is_valid_shell_that_writes_the_contract(env: Env,
                                                                      tmp_path: Path) -> None:
    """Run the late_command with sh against a fake /target and stub commands."""
    late = preseed_values(env.rendered["debian-12"].files["preseed.cfg"])["preseed/late_command"]
    target = tmp_path / "target"
    bin_dir = tmp_path / "bin"
    calls = tmp_path / "calls"
    run_env = stubs(bin_dir, calls, "in-target", "wget")
    script = late.replace("/target/", f"{target}/")
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                            env=run_env)
    assert result.returncode == 0, result.stderr
    assert (target / "root/.ssh/authorized_keys").read_text().splitlines() == KEYS
    assert "PasswordAuthentication no" in \
        (target / "etc/ssh/sshd_config.d/01-appliance.conf").read_text()
    cloud_cfg = target / "etc/cloud/cloud.cfg.d/99-appliance.cfg"
    cloud_init_valid(cloud_cfg, header=True)
    cfg = yaml.safe_load(cloud_cfg.read_text())
    assert cfg["datasource_list"] == ["NoCloud", "None"]
    assert cfg["datasource"]["NoCloud"]["seedfrom"] == env.rendered["debian-12"].seed_url
    log = calls.read_text().splitlines()
    assert log[0] == "in-target passwd --lock root"
    assert log[-1].startswith("wget -q -O /dev/null --post-data bootenv=debian-12 ")
    assert log[-1].endswith("/done")


def test_preseed_with_root_disk_and_no_site_profile(env: Env) -> None:
    with env.db.session() as session:
        machine = session.query(Machine).filter_by(mac=INSTALLERS["debian-12"][0]).one()
        configure_machine(session, env.catalog, machine, profiles=[],
                          values={"root_disk": "/dev/sdb",
                                  "mirror": "https://mirror.example.org/debian/"})
        text = render_machine_file(env.config, session, env.catalog, machine, "preseed.cfg",
                                   TARGET)
        session.rollback()
    path = env.out / "debian-12-disk.cfg"
    path.write_text(text)
    debconf_check(path)
    values = preseed_values(text)
    assert values["partman-auto/disk"] == "/dev/sdb"
    assert values["grub-installer/bootdev"] == "/dev/sdb"
    assert "partman/early_command" not in values
    assert values["mirror/protocol"] == "https"
    assert values["mirror/https/hostname"] == "mirror.example.org"
    assert values["mirror/https/proxy"] == ""
    assert values["time/zone"] == "Etc/UTC"
    assert "clock-setup/ntp-server" not in values


# ---- cloud-config: autoinstall and image-deploy ---------------------------------------

def cloud_init_valid(path: Path, header: bool = False) -> None:
    """``cloud-init schema -c``; ``header``: check a cloud.cfg.d file as a cloud-config."""
    cloud_init = tool("cloud-init", "Debian's cloud-init")
    if header:
        copy = path.with_name(path.name + ".cloud-config")
        copy.write_text("#cloud-config\n" + path.read_text())
        path = copy
    result = run(cloud_init, "schema", "-c", str(path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Valid cloud-config" in output, output
    assert "deprecat" not in output.lower(), output


def test_autoinstall_user_data_is_valid_cloud_config(env: Env) -> None:
    r = env.rendered["ubuntu-24.04"]
    text = r.files["user-data"]
    assert text.startswith("#cloud-config\n")
    cloud_init_valid(env.out / "ubuntu-24.04" / "user-data")
    contract_checks(text, r)
    data = yaml.safe_load(text)
    auto = data["autoinstall"]
    assert auto["version"] == 1
    assert "identity" not in auto  # no user with a password
    assert auto["ssh"] == {"install-server": True, "allow-pw": False, "authorized-keys": KEYS}
    assert auto["reporting"] == {"appliance": {
        "type": "webhook", "endpoint": f"{r.install_url}/log?program=subiquity"}}
    assert auto["proxy"] == SITE["proxy"]
    assert auto["timezone"] == "Europe/Berlin"
    assert auto["packages"] == ["openssh-server", "cloud-init", "vim", "htop"]
    assert auto["storage"] == {"layout": {"name": "lvm"}}  # the largest disk
    assert auto["late-commands"][-1].strip() == (
        f"curl -fsS --retry 5 --retry-delay 3 --max-time 30 --data 'bootenv=ubuntu-24.04' "
        f"'{r.install_url}/done'")
    # The nested user-data for the target is a cloud-config of its own.
    nested = env.out / "ubuntu-24.04" / "target-user-data"
    nested.write_text("#cloud-config\n" + yaml.safe_dump(auto["user-data"]))
    cloud_init_valid(nested)
    assert auto["user-data"]["ssh_authorized_keys"] == KEYS
    assert auto["user-data"]["ssh_pwauth"] is False
    assert auto["user-data"]["ntp"]["servers"] == SITE["ntp_servers"]


def test_autoinstall_late_commands_write_the_contract(env: Env, tmp_path: Path) -> None:
    r = env.rendered["ubuntu-24.04"]
    first = yaml.safe_load(r.files["user-data"])["autoinstall"]["late-commands"][0]
    target = tmp_path / "target"
    (target / "etc/cloud/cloud.cfg.d").mkdir(parents=True)
    (target / "etc/cloud/cloud.cfg.d/99-installer.cfg").write_text("datasource_list: [None]\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curtin").write_text(f"#!/bin/sh\necho \"$*\" > {tmp_path}/curtin\n")
    (bin_dir / "curtin").chmod(0o755)
    result = subprocess.run(["sh", "-c", first.replace("/target/", f"{target}/")],
                            capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert (target / "root/.ssh/authorized_keys").read_text().splitlines() == KEYS
    assert not (target / "etc/cloud/cloud.cfg.d/99-installer.cfg").exists()
    cloud_cfg = target / "etc/cloud/cloud.cfg.d/99-appliance.cfg"
    cloud_init_valid(cloud_cfg, header=True)
    cfg = yaml.safe_load(cloud_cfg.read_text())
    assert cfg["datasource"]["NoCloud"]["seedfrom"] == r.seed_url
    assert (target / "etc/systemd/timesyncd.conf.d/appliance.conf").read_text() == \
        "[Time]\nNTP=ntp1.example.com ntp2.example.com\n"
    assert (target / "etc/hostname").read_text() == "ubuntu-2404\n"
    assert (tmp_path / "curtin").read_text().split() == [
        "in-target", "--target=/target", "--", "passwd", "--lock", "root"]


def test_autoinstall_meta_and_vendor_data(env: Env) -> None:
    r = env.rendered["ubuntu-24.04"]
    meta = yaml.safe_load(r.files["meta-data"])
    assert meta == {"instance-id": "appliance-install-5254000a0002",
                    "local-hostname": "ubuntu-2404"}
    assert r.files["vendor-data"] == "#cloud-config\n{}\n"
    cloud_init_valid(env.out / "ubuntu-24.04" / "vendor-data")


def test_image_deploy_user_data_is_valid_cloud_config(env: Env) -> None:
    r = env.rendered["image-deploy"]
    cloud_init_valid(env.out / "image-deploy" / "user-data")
    data = yaml.safe_load(r.files["user-data"])
    assert data["ssh_authorized_keys"] == KEYS
    assert data["ssh_pwauth"] is False and data["disable_root"] is False
    assert data["hostname"] == "image-deploy" and data["fqdn"] == "image-deploy.lab.example"
    assert data["ntp"]["servers"] == SITE["ntp_servers"]
    assert data["packages"] == SITE["extra_packages"]
    assert "PasswordAuthentication no" in data["write_files"][0]["content"]


def test_deploy_json(env: Env) -> None:
    r = env.rendered["image-deploy"]
    orders = json.loads(r.files["deploy.json"])
    assert orders["image"] == f"{TARGET.base_url}/images/os/debian-12-generic.raw.zst"
    assert orders["compression"] == "zstd"
    assert orders["sha256"] == IMAGE_SHA
    assert orders["target_disk"] == ""
    assert orders["done_url"] == f"{r.install_url}/done"
    assert orders["log_url"] == f"{r.install_url}/log"
    assert orders["seed_url"] == r.seed_url and r.seed_url.endswith("/")
    assert orders["user_data_url"] == f"{r.install_url}/user-data"
    cfg = yaml.safe_load(orders["cloud_init_config"])
    assert cfg["datasource"] == {"NoCloud": {"seedfrom": r.seed_url}}
    assert orders["cloud_init_config_path"] == "/etc/cloud/cloud.cfg.d/99-appliance.cfg"
    fragment = env.out / "image-deploy" / "99-appliance.cfg"
    fragment.write_text(orders["cloud_init_config"])
    cloud_init_valid(fragment, header=True)


def test_deploy_json_ec2_datasource_config_is_valid(env: Env) -> None:
    with env.db.session() as session:
        machine = session.query(Machine).filter_by(mac=INSTALLERS["image-deploy"][0]).one()
        configure_machine(session, env.catalog, machine,
                          values={"cloud_init_datasource": "ec2"})
        orders = json.loads(render_machine_file(env.config, session, env.catalog, machine,
                                                "deploy.json", TARGET))
        session.rollback()
    cfg = yaml.safe_load(orders["cloud_init_config"])
    assert cfg["datasource_list"] == ["Ec2", "None"]
    assert cfg["datasource"]["Ec2"]["metadata_urls"] == [TARGET.base_url]
    fragment = env.out / "image-deploy" / "99-appliance-ec2.cfg"
    fragment.write_text(orders["cloud_init_config"])
    cloud_init_valid(fragment, header=True)


def test_deploy_json_keeps_an_absolute_image_url(env: Env) -> None:
    with env.db.session() as session:
        machine = session.query(Machine).filter_by(mac=INSTALLERS["image-deploy"][0]).one()
        configure_machine(session, env.catalog, machine, values={
            "image": "https://images.example.com/noble.img.gz", "target_disk": "/dev/sdb"})
        orders = json.loads(render_machine_file(env.config, session, env.catalog, machine,
                                                "deploy.json", TARGET))
        session.rollback()
    assert orders["image"] == "https://images.example.com/noble.img.gz"
    assert orders["compression"] == "gzip"
    assert orders["target_disk"] == "/dev/sdb"


# ---- kernel command lines and boot scripts --------------------------------------------

EXPECTED_PARAMS = {
    "debian-12": ["auto=true", "priority=critical", "url={install}/preseed.cfg",
                  "interface=auto", "hostname=debian-12", "domain=lab.example",
                  "log_host=10.0.0.1", "log_port=514", "console=ttyS0,115200n8"],
    "ubuntu-24.04": [
        "ip=dhcp",
        "url=http://10.0.0.1:8080/images/ubuntu-24.04/ubuntu-24.04.1-live-server-amd64.iso",
        "autoinstall", "ds=nocloud-net;s={install}/", "cloud-config-url=/dev/null",
        "console=ttyS0,115200n8"],
    "rocky-9": ["inst.ks={install}/ks.cfg", "inst.stage2=http://10.0.0.1:8080/images/rocky-9/",
                "inst.syslog=10.0.0.1:514", "ip=dhcp", "console=ttyS0,115200n8"],
    "alma-9": ["inst.ks={install}/ks.cfg", "inst.stage2=http://10.0.0.1:8080/images/alma-9/",
               "inst.syslog=10.0.0.1:514", "ip=dhcp", "console=ttyS0,115200n8"],
    "image-deploy": ["console=ttyS0,115200n8", "appliance.mode=deploy",
                     "appliance.url=http://10.0.0.1:8080", "appliance.install={install}"],
}


@pytest.mark.parametrize("bootenv", sorted(INSTALLERS))
def test_kernel_params(env: Env, bootenv: str) -> None:
    r = env.rendered[bootenv]
    words = r.files["kernel-params"].split()
    assert "{" not in r.files["kernel-params"]
    for expected in EXPECTED_PARAMS[bootenv]:
        assert expected.format(install=r.install_url) in words, words


@pytest.mark.parametrize("bootenv", sorted(INSTALLERS))
def test_boot_script_boots_the_installer(env: Env, bootenv: str) -> None:
    spec = env.catalog.bootenvs[bootenv]
    r = env.rendered[bootenv]
    with env.db.session() as session:
        machine = session.query(Machine).filter_by(mac=r.mac).one()
        for rel in spec.boot_files():
            path = env.config.images_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"dummy")
        try:
            script = render_machine_file(env.config, session, env.catalog, machine,
                                         "boot.ipxe", TARGET)
            grub = render_machine_file(env.config, session, env.catalog, machine,
                                       "grub.cfg", TARGET)
        finally:
            for rel in spec.boot_files():
                (env.config.images_dir / rel).unlink()
        session.rollback()
    boot = spec.firmware["bios"]
    kernel_lines = [line for line in script.splitlines() if line.startswith("kernel ")]
    assert len(kernel_lines) == 2  # bios and uefi
    line = kernel_lines[0]
    assert line.startswith(f"kernel {TARGET.base_url}/images/{boot.kernel} ")
    params = r.files["kernel-params"].strip()
    assert f" {params} || goto retry" in line
    for initrd in boot.initrds:
        assert f"initrd --name {initrd.rsplit('/', 1)[-1]} {TARGET.base_url}/images/{initrd}" \
            in script
    assert "{{" not in script
    # The GRUB config of the same boot: GRUB's own parser accepts it, and the kernel line
    # carries the same parameters (words GRUB would split, such as ';', quoted).
    path = env.out / bootenv / "grub.cfg"
    path.write_text(grub)
    check = run(tool("grub-script-check", "grub-common"), str(path))
    assert check.returncode == 0, check.stdout + check.stderr + grub
    uefi = spec.firmware["uefi"]
    host = TARGET.base_url.removeprefix("http://")
    (linux,) = [line.strip() for line in grub.splitlines() if line.strip().startswith("linux ")]
    assert linux.startswith(f"linux (http,{host})/images/{uefi.kernel} ")
    assert shlex.split(linux)[2:] == params.split()


def test_cli_renders_what_the_machine_gets(env: Env) -> None:
    """The real CLI, as a subprocess, against the same state directory."""
    r = env.rendered["debian-12"]
    cmd = [sys.executable, "-m", "appliance.cli", "--config", str(env.config_path)]
    result = subprocess.run([*cmd, "render", r.mac, "preseed.cfg", "--appliance-url",
                             TARGET.base_url], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout == r.files["preseed.cfg"]
    result = subprocess.run([*cmd, "bootenvs", "--json"], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["refused"] == []
    names = {row["name"] for row in listing["bootenvs"]}
    assert names >= {"debian-12", "ubuntu-24.04", "rocky-9", "alma-9", "image-deploy",
                     "discovery", "local"}
