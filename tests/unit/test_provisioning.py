"""Bootenv schema, params layering, per-machine rendering and the install endpoints.

Uses its own small bootenvs and templates (the shipped installers are checked with the
distributions' validators in tests/integration/test_answer_files.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.bootenvs import BootenvError, load_bootenvs, parse_bootenv
from appliance.catalog import load_catalog
from appliance.config import Config
from appliance.db import Database
from appliance.lifecycle import record_seen
from appliance.machinefiles import BootTarget, render_machine_file
from appliance.models import Event, Machine, Profile
from appliance.params import ParamError, ParamSpec, coerce_text
from appliance.paths import shipped_dir
from appliance.profiles import ProfileError, configure_machine, parse_assignments, set_profile
from appliance.render import RenderError
from appliance.web import create_app

MAC = "52:54:00:aa:bb:01"
TARGET = BootTarget(base_url="http://10.0.0.1:8080", server="10.0.0.1")
SHA = "0123456789abcdef" * 4

INSTALLER = """\
name: tiny
description: a test installer
os: {family: debian, version: 12}
firmware:
  bios: {kernel: tiny/linux, initrds: [tiny/initrd.gz]}
  uefi: {kernel: tiny/linux.efi, initrds: [tiny/initrd.gz], loader: grub}
kernel_params: >-
  auto=true url={{ install_url }}/answer.cfg tz={{ params.timezone }}
  ds=nocloud-net;s={{ install_url }}/
templates:
  answer.cfg: answers/answer.cfg.j2
params:
  timezone: {type: string, default: Etc/UTC}
  disks: {type: integer, default: 1}
  ssh_authorized_keys: {type: list, required: true}
artifacts:
  - name: tiny-kernel
    source: /nonexistent/linux
    sha256: "@SHA@"
    path: tiny/linux
""".replace("@SHA@", SHA)

ANSWER = """\
host {{ machine.hostname }} tz {{ params.timezone }} disks {{ params.disks }}
{% for key in params.ssh_authorized_keys %}
key {{ key }}
{% endfor %}
done {{ done_url }}
seed {{ seed_url }}
"""


def write_tree(root: Path, bootenvs: dict[str, str], templates: dict[str, str]) -> Config:
    (root / "bootenvs").mkdir()
    shutil.copytree(shipped_dir("templates"), root / "templates")
    for name, text in bootenvs.items():
        (root / "bootenvs" / f"{name}.yaml").write_text(text)
    for rel, text in templates.items():
        path = root / "templates" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    shutil.copy(shipped_dir("bootenvs") / "local.yaml", root / "bootenvs")
    config = Config(state_dir=str(root / "state"))
    config.boot.bootenvs_dir = str(root / "bootenvs")
    config.boot.templates_dir = str(root / "templates")
    return config


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = write_tree(tmp_path, {"tiny": INSTALLER}, {"answers/answer.cfg.j2": ANSWER})
    for rel in ("tiny/linux", "tiny/linux.efi", "tiny/initrd.gz"):
        path = config.images_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    db = Database(config.effective_database_url)
    db.migrate()
    catalog = load_catalog(config)
    assert catalog.errors == []
    with db.session() as session:
        record_seen(session, MAC, "test", actor="test", arch="bios")
    return config, db, catalog


# ---- bootenv schema: every bad file refused with the file, the field and why -----------

@pytest.mark.parametrize("text, expected", [
    ("name: bad\nfirmware: [", "YAML syntax error"),
    ("- just\n- a list\n", "expected a mapping at the top level"),
    ("name: other\n", "field 'name': 'other' does not match the file name"),
    ("name: bad\nkernell: x\n", "unknown field(s): kernell"),
    ("name: bad\nfirmware: {arm: {kernel: k}}\n", "field 'firmware.arm': unknown firmware"),
    ("name: bad\nfirmware: {bios: {initrds: []}}\n", "field 'firmware.bios.kernel'"),
    ("name: bad\nfirmware: {bios: {kernel: /etc/passwd}}\n", "must be relative"),
    ("name: bad\nfirmware: {bios: {kernel: ../x}}\n", "must be relative"),
    ("name: bad\nfirmware: {bios: {kernel: k, loader: pxelinux}}\n", "'firmware.bios.loader'"),
    ("name: bad\nlocal_boot: true\nfirmware: {bios: {kernel: k}}\n", "boots no kernel"),
    ("name: bad\nlocal_boot: true\nparams: {n: {type: number}}\n",
     "param 'n': field 'type': 'number' is not one of"),
    ("name: bad\nlocal_boot: true\nparams: {n: {type: integer, default: ten}}\n",
     "param 'n' (default): expected integer, got string \"ten\""),
    ("name: bad\nlocal_boot: true\nparams: {n: {required: yes please}}\n", "'required'"),
    # YAML 1.1 reads on/yes as booleans: a non-string key is an error, not a crash
    ("name: bad\nlocal_boot: true\nparams: {n: {type: string, on: x}}\n",
     "param 'n': unknown field(s): True"),
    ("name: bad\nfirmware: {bios: {kernel: a/b, yes: 1}}\n", "unknown field(s): True"),
    ("name: bad\nlocal_boot: true\nartifacts: [{1: 2, name: a}]\n", "unknown field(s): 1"),
    ("name: bad\nlocal_boot: true\ntemplates: {../x: a.j2}\n", "not a valid file name"),
    ("name: bad\nlocal_boot: true\ntemplates: {boot.ipxe: a.j2}\n", "not a valid file name"),
    ("name: bad\nlocal_boot: true\nartifacts: [{name: a, source: /x, sha256: abc}]\n",
     "artifacts[0] (artifact a): field 'sha256': expected 64 lowercase hex digits, got 'abc'"),
    ("name: bad\nlocal_boot: true\nartifacts: [{name: a, source: /x, sha256: @SHA@}]\n"
     .replace("@SHA@", "1" * 64), "field 'sha256': YAML read a number; quote the 64 hex digits"),
    ("name: bad\nlocal_boot: true\nartifacts: [{name: a, source: ftp://x, sha256: @SHA@}]\n"
     .replace("@SHA@", SHA), "field 'source'"),
    ("name: bad\nlocal_boot: true\nartifacts: [{name: a, source: /x, sha256: @SHA@, "
     "extract: {m: /etc/x}}]\n".replace("@SHA@", SHA), "field 'extract.m'"),
])
def test_bad_bootenv_is_refused_with_file_and_field(tmp_path: Path, text: str,
                                                    expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(BootenvError) as err:
        parse_bootenv(path)
    assert str(err.value).startswith(str(path))
    assert expected in str(err.value)


def test_a_bad_bootenv_does_not_stop_the_others(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text("name: good\nlocal_boot: true\n")
    (tmp_path / "broken.yaml").write_text("name: broken\nfirmware: {bios: {kernel: [}\n")
    envs, errors = load_bootenvs(tmp_path)
    assert list(envs) == ["good"]
    assert len(errors) == 1 and "broken.yaml: YAML syntax error" in errors[0]


def test_shipped_bootenvs_all_load() -> None:
    config = Config()
    catalog = load_catalog(config)
    assert catalog.errors == []
    assert {"discovery", "local"} <= set(catalog.bootenvs)


def test_bootenv_with_missing_or_broken_template_is_refused(tmp_path: Path) -> None:
    other = INSTALLER.replace("name: tiny", "name: other").replace(
        "answers/answer.cfg.j2", "answers/missing.j2")
    broken = INSTALLER.replace("name: tiny", "name: broken").replace(
        "answers/answer.cfg.j2", "answers/broken.j2")
    config = write_tree(tmp_path, {"tiny": INSTALLER, "other": other, "broken": broken},
                        {"answers/answer.cfg.j2": ANSWER,
                         "answers/broken.j2": "line one\n{% if x %}\nno endif\n"})
    catalog = load_catalog(config)
    assert set(catalog.bootenvs) == {"tiny", "local"}
    assert any("other.yaml: field 'templates.answer.cfg': template 'answers/missing.j2' "
               "not found" in e for e in catalog.errors)
    assert any("broken.yaml: field 'templates.answer.cfg': template 'answers/broken.j2' "
               "line 3" in e for e in catalog.errors), catalog.errors


# ---- params: types and layers ----------------------------------------------------------

def test_coerce_text_by_declared_type() -> None:
    assert coerce_text("0123", None) == "0123"
    assert coerce_text("0123", ParamSpec("n", "integer")) == 123
    assert coerce_text("yes", ParamSpec("b", "boolean")) is True
    assert coerce_text('["a", "b"]', ParamSpec("l", "list")) == ["a", "b"]
    with pytest.raises(ParamError, match="param 'n': expected integer, got 'ten'"):
        coerce_text("ten", ParamSpec("n", "integer"))
    with pytest.raises(ParamError, match="param 'l' \\(given value\\): expected list, got "
                                         "string"):
        coerce_text('"a"', ParamSpec("l", "list"))


def test_layers_global_then_profiles_then_machine(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config, db, catalog = setup
    keys = tmp_path / "keys"
    keys.write_text("# operators\nssh-ed25519 AAAAC3 one@x\n\nssh-ed25519 AAAAC3 two@x\n")
    with db.session() as s:
        set_profile(s, catalog, "global", parse_assignments(
            catalog, ["timezone=Europe/Paris"], [f"ssh_authorized_keys={keys}"]))
        set_profile(s, catalog, "rack1", {"timezone": "America/New_York", "disks": 2})
        set_profile(s, catalog, "big", {"disks": 4})
        machine = s.query(Machine).one()
        configure_machine(s, catalog, machine, bootenv="tiny", profiles=["rack1", "big"],
                          values={"disks": 8}, hostname="node1")
    with db.session() as s:
        machine = s.query(Machine).one()
        assert machine.install_token and machine.seed_token
        text = render_machine_file(config, s, catalog, machine, "answer.cfg", TARGET)
        token = machine.install_token
    assert text.splitlines() == [
        "host node1 tz America/New_York disks 8",
        "key ssh-ed25519 AAAAC3 one@x", "key ssh-ed25519 AAAAC3 two@x",
        f"done http://10.0.0.1:8080/install/{token}/done",
        f"seed http://10.0.0.1:8080/nocloud/{machine.seed_token}/",
    ]
    with db.session() as s:
        machine = s.query(Machine).one()
        configure_machine(s, catalog, machine, unset=["disks"], profiles=["big", "rack1"])
        text = render_machine_file(config, s, catalog, machine, "answer.cfg", TARGET)
    assert text.startswith("host node1 tz America/New_York disks 2\n")


def test_wrong_type_is_refused_when_set(setup) -> None:  # type: ignore[no-untyped-def]
    _config, db, catalog = setup
    with db.session() as s:
        with pytest.raises(ProfileError, match="param 'disks' \\(profile p; declared by "
                                               "bootenv tiny\\): expected integer, got "
                                               "string \"two\""):
            set_profile(s, catalog, "p", {"disks": "two"})
        with pytest.raises(ProfileError, match="param 'disks': expected integer, got 'two'"):
            parse_assignments(catalog, ["disks=two"])
        with pytest.raises(ProfileError, match="expected KEY=VALUE"):
            parse_assignments(catalog, ["no-equals-sign"])


def test_required_param_missing_refuses_the_assignment(setup) -> None:  # type: ignore[no-untyped-def]
    _config, db, catalog = setup
    with db.session() as s:
        machine = s.query(Machine).one()
        with pytest.raises(ProfileError, match="required param\\(s\\) 'ssh_authorized_keys' "
                                               "not set"):
            configure_machine(s, catalog, machine, bootenv="tiny")
        assert machine.bootenv == "discovery" and machine.install_token is None
        with pytest.raises(ProfileError, match="profile 'nope' does not exist"):
            configure_machine(s, catalog, machine, profiles=["nope"])
        with pytest.raises(ProfileError, match="bootenv 'nope' is not defined"):
            configure_machine(s, catalog, machine, bootenv="nope")


def test_wrong_type_stored_earlier_stops_the_boot_with_a_message(setup) -> None:  # type: ignore[no-untyped-def]
    config, db, catalog = setup
    with db.session() as s:
        set_profile(s, catalog, "global", {"ssh_authorized_keys": ["k"]})
        machine = s.query(Machine).one()
        configure_machine(s, catalog, machine, bootenv="tiny")
        machine.params = {"disks": "many"}  # e.g. written before the bootenv declared it
    with db.session() as s:
        machine = s.query(Machine).one()
        with pytest.raises(RenderError) as err:
            render_machine_file(config, s, catalog, machine, "boot.ipxe", TARGET)
    assert str(err.value) == (
        f"bootenv tiny for machine {MAC}: param 'disks' (set in machine {MAC}): expected "
        "integer, got string \"many\"")


# ---- rendering -------------------------------------------------------------------------

def test_undefined_variable_names_template_machine_and_variable(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config, db, catalog = setup
    (Path(config.boot.templates_dir) / "answers" / "answer.cfg.j2").write_text(
        "ok {{ params.timezone }}\nbad {{ params.no_such_thing }}\n")
    catalog = load_catalog(config)  # templates are compiled once per process
    with db.session() as s:
        set_profile(s, catalog, "global", {"ssh_authorized_keys": ["k"]})
        machine = s.query(Machine).one()
        configure_machine(s, catalog, machine, bootenv="tiny")
        with pytest.raises(RenderError) as err:
            render_machine_file(config, s, catalog, machine, "answer.cfg", TARGET)
        assert str(err.value) == (f"template 'answers/answer.cfg.j2' for machine {MAC}: "
                                  "undefined variable: 'dict object' has no attribute "
                                  "'no_such_thing'")
        # ...and the boot script refuses to boot the installer at all.
        with pytest.raises(RenderError, match="no_such_thing"):
            render_machine_file(config, s, catalog, machine, "boot.ipxe", TARGET)


def test_boot_script_per_firmware_and_kernel_params(setup) -> None:  # type: ignore[no-untyped-def]
    config, db, catalog = setup
    with db.session() as s:
        set_profile(s, catalog, "global", {"ssh_authorized_keys": ["k"]})
        machine = s.query(Machine).one()
        configure_machine(s, catalog, machine, bootenv="tiny")
        script = render_machine_file(config, s, catalog, machine, "boot.ipxe", TARGET)
        grub = render_machine_file(config, s, catalog, machine, "grub.cfg", TARGET)
        token = machine.install_token
    url = f"http://10.0.0.1:8080/install/{token}"
    params = f"auto=true url={url}/answer.cfg tz=Etc/UTC ds=nocloud-net;s={url}/"
    assert "iseq ${platform} efi && goto boot_uefi || goto boot_bios" in script
    assert (f"kernel http://10.0.0.1:8080/images/tiny/linux initrd=initrd.gz {params} "
            "|| goto retry") in script
    assert "kernel http://10.0.0.1:8080/images/tiny/linux.efi initrd=initrd.gz" in script
    assert "{{" not in script
    # GRUB quotes what its shell would split: the ';' of the NoCloud URL.
    assert (f"linux (http,10.0.0.1:8080)/images/tiny/linux.efi auto=true "
            f"url={url}/answer.cfg tz=Etc/UTC 'ds=nocloud-net;s={url}/'") in grub


def test_missing_image_names_the_artifact_to_import(setup) -> None:  # type: ignore[no-untyped-def]
    config, db, catalog = setup
    (config.images_dir / "tiny" / "linux").unlink()
    with db.session() as s:
        set_profile(s, catalog, "global", {"ssh_authorized_keys": ["k"]})
        machine = s.query(Machine).one()
        configure_machine(s, catalog, machine, bootenv="tiny")
        with pytest.raises(RenderError, match="tiny/linux is not in the image store .*; run: "
                                              "appliance images import tiny-kernel"):
            render_machine_file(config, s, catalog, machine, "boot.ipxe", TARGET)


# ---- the install endpoints -------------------------------------------------------------

def test_install_endpoints(setup) -> None:  # type: ignore[no-untyped-def]
    config, db, catalog = setup
    with db.session() as s:
        set_profile(s, catalog, "global", {"ssh_authorized_keys": ["ssh-ed25519 K"]})
        machine = s.query(Machine).one()
        configure_machine(s, catalog, machine, bootenv="tiny")
        token = machine.install_token
    from appliance.web import unknown
    unknown.reset()  # the per-client event rate limit
    app = create_app(config, db)
    client = app.test_client()
    base = "http://10.0.0.1:8080"
    answer = client.get(f"/install/{token}/answer.cfg", base_url=base)
    assert answer.status_code == 200
    assert "key ssh-ed25519 K" in answer.text
    assert client.get(f"/install/{token}/network-config", base_url=base).status_code == 404
    wrong = client.get(f"/install/{'x' * 32}/answer.cfg", base_url=base)
    assert wrong.status_code == 404 and "ssh-ed25519" not in wrong.text
    assert client.get(f"/install/{token}/done", base_url=base).status_code == 404  # GET
    upload = client.post(f"/install/{token}/log?program=anaconda", base_url=base,
                         data="line one\n\nline two\n", content_type="text/plain")
    assert upload.text == "stored 2 lines\n"
    hook = client.post(f"/install/{token}/log", base_url=base, json={
        "event_type": "finish", "name": "subiquity/Install", "result": "FAIL",
        "description": "install failed", "origin": "curtin"})
    assert hook.text == "stored 1 lines\n"
    assert client.post(f"/install/{'y' * 32}/log", base_url=base, data="x").status_code == 404
    many = "".join(f"line {i}\n" for i in range(10_005))
    cut = client.post(f"/install/{token}/log", base_url=base, data=many)
    assert cut.text == "stored 10001 lines\n"
    huge = client.post(f"/install/{token}/log", base_url=base, data=b"x" * (8 * 1024 * 1024 + 1))
    assert huge.status_code == 413
    assert client.post(f"/install/{token}/done", base_url=base).text == "ok\n"
    # The install token is spent: a second report, an answer file, a log upload all 404.
    assert client.post(f"/install/{token}/done", base_url=base).status_code == 404
    assert client.get(f"/install/{token}/answer.cfg", base_url=base).status_code == 404
    assert client.post(f"/install/{token}/log", base_url=base, data="x").status_code == 404
    from appliance.installlogs import read_install_logs
    with db.session() as s:
        machine = s.query(Machine).one()
        assert machine.bootenv == "local"
        assert machine.install_token is None
        lines = [(x.source, x.program, x.message)
                 for x in read_install_logs(s, machine.id, limit=20_000)]
        assert lines[:3] == [("upload", "anaconda", "line one"),
                             ("upload", "anaconda", "line two"),
                             ("upload", "upload", "finish subiquity/Install FAIL install failed")]
        assert lines[-1] == ("upload", "upload", "[appliance: upload cut: 5 more lines]")
        assert len(lines) == 3 + 10_001
        kinds = [e.kind for e in s.query(Event).order_by(Event.id)]
    assert kinds.count("answer-file") == 1
    assert "answer-file-error" not in kinds
    assert kinds.count("install-token-unknown") == 1  # one per client per minute
    assert kinds.count("install-finished") == 1


# ---- the CLI ---------------------------------------------------------------------------

def test_cli_enroll_configure_render(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    config, _db, _catalog = setup
    conf = tmp_path / "appliance.toml"
    conf.write_text(f'state_dir = "{config.state_dir}"\n[boot]\n'
                    f'bootenvs_dir = "{config.boot.bootenvs_dir}"\n'
                    f'templates_dir = "{config.boot.templates_dir}"\n')
    keys = tmp_path / "authorized_keys"
    keys.write_text("ssh-ed25519 AAAAkey op@desk\n")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(conf),
                               *args], capture_output=True, text=True, timeout=60)

    assert cli("machine", "add", "52:54:00:aa:bb:02", "--hostname", "web1").returncode == 0
    assert "already exists" in cli("machine", "add", "52-54-00-aa-bb-02").stderr
    refused = cli("machine", "set", "web1", "--bootenv", "tiny")
    assert refused.returncode == 2
    assert "required param(s) 'ssh_authorized_keys' not set" in refused.stderr
    assert cli("profile", "set", "global", "--param-file",
               f"ssh_authorized_keys={keys}").returncode == 0
    bad = cli("profile", "set", "rack", "--param", "disks=two")
    assert bad.returncode == 2 and "param 'disks': expected integer, got 'two'" in bad.stderr
    assert cli("profile", "set", "rack", "--param", "disks=3").returncode == 0
    assert cli("machine", "set", "web1", "--bootenv", "tiny", "--profile", "rack").returncode == 0
    no_url = cli("render", "web1", "answer.cfg")
    assert no_url.returncode == 2 and "give --appliance-url" in no_url.stderr
    out = cli("render", "web1", "answer.cfg", "--appliance-url", "http://10.9.0.1:8080")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("host web1 tz Etc/UTC disks 3\nkey ssh-ed25519 AAAAkey op@desk\n")
    assert "http://10.9.0.1:8080/install/" in out.stdout
    unknown = cli("render", "web1", "nope.cfg", "--appliance-url", "http://10.9.0.1:8080")
    assert "no file 'nope.cfg' (this machine's files: boot.ipxe, grub.cfg, kernel-params, " \
           "answer.cfg)" in unknown.stderr
    shown = cli("machine", "show", "52:54:00:aa:bb:02", "--json")
    import json
    row = json.loads(shown.stdout)
    assert row["effective_params"]["disks"] == 3 and "install_token" not in row
    listing = cli("bootenvs", "--json")
    assert listing.returncode == 0, listing.stderr
    assert {b["name"] for b in json.loads(listing.stdout)["bootenvs"]} == {"tiny", "local"}


def test_profile_change_that_breaks_an_install_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    _config, db, catalog = setup
    with db.session() as s:
        set_profile(s, catalog, "global", {"ssh_authorized_keys": ["k"]})
        configure_machine(s, catalog, s.query(Machine).one(), bootenv="tiny")
    with db.session() as s, pytest.raises(ProfileError, match=(
            f"profile global: change refused, machine {MAC} is installing tiny with it: .*"
            "required param\\(s\\) 'ssh_authorized_keys' not set")):
        set_profile(s, catalog, "global", {}, unset=["ssh_authorized_keys"])
    with db.session() as s:
        assert s.query(Profile).filter_by(name="global").one().params == {
            "ssh_authorized_keys": ["k"]}


@pytest.mark.parametrize("hostname", ["bad host", "a\nd-i preseed/late_command string x",
                                      "-lead.example", "x" * 64])
def test_bad_hostname_is_refused(setup, hostname: str) -> None:  # type: ignore[no-untyped-def]
    _config, db, catalog = setup
    with db.session() as s:
        machine = s.query(Machine).one()
        with pytest.raises(ProfileError, match="hostname .*: must be"):
            configure_machine(s, catalog, machine, hostname=hostname)
        with pytest.raises(ProfileError, match="hostname .*: must be"):
            configure_machine(s, catalog, machine, values={"hostname": hostname})
