"""The shipped installer bootenvs and answer templates: declarations, and bad input refused
with a message that names what is wrong (the distributions' validators run in
tests/integration/test_answer_files.py)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from appliance.catalog import load_catalog
from appliance.config import Config
from appliance.db import Database
from appliance.lifecycle import record_seen
from appliance.machinefiles import BootTarget, render_machine_file
from appliance.models import Machine, Profile
from appliance.paths import shipped_dir
from appliance.profiles import ProfileError, configure_machine, parse_assignments, set_profile
from appliance.render import RenderError

MAC = "52:54:00:bb:00:01"
TARGET = BootTarget(base_url="http://10.0.0.1:8080", server="10.0.0.1")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeyForTheUnitTests unit@test"
INSTALLERS = ["debian-12", "ubuntu-24.04", "rocky-9", "alma-9", "image-deploy"]
ANSWER_FILES = {"debian-12": "preseed.cfg", "ubuntu-24.04": "user-data", "rocky-9": "ks.cfg",
                "alma-9": "ks.cfg", "image-deploy": "deploy.json"}
DEPLOY = {"image": "os/x.raw", "image_sha256": "0" * 64}


def make_env(tmp_path: Path, templates: Path | None = None):  # type: ignore[no-untyped-def]
    config = Config(state_dir=str(tmp_path / "state"))
    if templates is not None:
        config.boot.templates_dir = str(templates)
    db = Database(config.effective_database_url)
    db.migrate()
    catalog = load_catalog(config)
    assert catalog.errors == []
    with db.session() as session:
        record_seen(session, MAC, "test", actor="test", arch="uefi-x64")
    return config, db, catalog


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    return make_env(tmp_path)


def machine(session) -> Machine:  # type: ignore[no-untyped-def]
    return session.query(Machine).filter_by(mac=MAC).one()


# ---- declarations --------------------------------------------------------------------

COMMON = {"ssh_authorized_keys": ("list", None, True), "timezone": ("string", "Etc/UTC", False),
          "locale": ("string", "en_US.UTF-8", False), "keyboard": ("string", "us", False),
          "root_disk": ("string", "", False), "proxy": ("string", "", False),
          "extra_packages": ("list", [], False), "ntp_servers": ("list", [], False)}


@pytest.mark.parametrize("name", ["debian-12", "ubuntu-24.04", "rocky-9", "alma-9"])
def test_installers_declare_the_common_params(setup, name: str) -> None:  # type: ignore[no-untyped-def]
    _, _, catalog = setup
    env = catalog.bootenvs[name]
    for param, (kind, default, required) in COMMON.items():
        spec = env.params[param]
        assert (spec.type, spec.default, spec.required) == (kind, default, required), param
    assert env.params["mirror"].type == "string" and env.params["mirror"].default
    assert set(env.firmware) == {"bios", "uefi"}
    assert env.description and env.os.family and env.os.version
    # Every kernel and initrd comes from a declared artifact with a sha256.
    for rel in env.boot_files():
        spec = catalog.artifact_for(env, rel)
        assert spec is not None and len(spec.sha256) == 64, rel


def test_image_deploy_declarations(setup) -> None:  # type: ignore[no-untyped-def]
    _, _, catalog = setup
    env = catalog.bootenvs["image-deploy"]
    assert env.params["image"].required and env.params["image_sha256"].required
    assert env.params["target_disk"].default == ""
    assert env.params["ssh_authorized_keys"].required
    assert env.artifacts == ()  # deploy/vmlinuz and initrd.img are built by images/
    assert env.boot_files() == ["deploy/vmlinuz", "deploy/initrd.img"]


def test_debian_artifacts_are_the_netboot_package_files(setup) -> None:  # type: ignore[no-untyped-def]
    _, _, catalog = setup
    for spec in catalog.bootenvs["debian-12"].artifacts:
        source = Path(spec.source)
        if not source.is_file():
            pytest.skip("debian-installer-12-netboot-amd64 is not installed here")
        assert hashlib.sha256(source.read_bytes()).hexdigest() == spec.sha256
        assert source.stat().st_size == spec.size


# ---- kernel params ---------------------------------------------------------------------

@pytest.mark.parametrize("name", INSTALLERS)
def test_kernel_params_render_completely(setup, name: str) -> None:  # type: ignore[no-untyped-def]
    config, db, catalog = setup
    with db.session() as session:
        set_profile(session, catalog, "global", {"ssh_authorized_keys": [KEY]})
        m = machine(session)
        configure_machine(session, catalog, m, bootenv=name,
                          values=DEPLOY if name == "image-deploy" else {})
        text = render_machine_file(config, session, catalog, m, "kernel-params", TARGET)
    assert "{{" not in text and "{%" not in text and "}}" not in text
    assert f"/install/{m.install_token}" in text
    assert text.endswith("\n") and "\n" not in text[:-1]
    assert "console=ttyS0,115200n8" in text


# ---- bad input ---------------------------------------------------------------------------

def test_undefined_variable_names_template_machine_and_variable(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(shipped_dir("templates"), templates)
    ks = templates / "kickstart" / "el9.ks.j2"
    ks.write_text(ks.read_text() + "# {{ params.no_such_param }}\n")
    config, db, catalog = make_env(tmp_path, templates)
    with db.session() as session:
        set_profile(session, catalog, "global", {"ssh_authorized_keys": [KEY]})
        m = machine(session)
        configure_machine(session, catalog, m, bootenv="rocky-9")
        with pytest.raises(RenderError) as err:
            render_machine_file(config, session, catalog, m, "ks.cfg", TARGET)
    message = str(err.value)
    assert "template 'kickstart/el9.ks.j2'" in message
    assert MAC in message
    assert "no_such_param" in message


@pytest.mark.parametrize("name", INSTALLERS)
def test_an_install_without_keys_is_refused(setup, name: str) -> None:  # type: ignore[no-untyped-def]
    _, db, catalog = setup
    with db.session() as session:
        with pytest.raises(ProfileError) as err:
            configure_machine(session, catalog, machine(session), bootenv=name,
                              values=DEPLOY if name == "image-deploy" else {})
    assert "required param(s) 'ssh_authorized_keys' not set" in str(err.value)
    assert f"bootenv {name}" in str(err.value) and MAC in str(err.value)


@pytest.mark.parametrize("name", INSTALLERS)
def test_keys_removed_after_assignment_stop_the_render(setup, name: str) -> None:  # type: ignore[no-untyped-def]
    config, db, catalog = setup
    with db.session() as session:
        set_profile(session, catalog, "global", {"ssh_authorized_keys": [KEY]})
        m = machine(session)
        configure_machine(session, catalog, m, bootenv=name,
                          values=DEPLOY if name == "image-deploy" else {})
        # The CLI refuses this change while the install runs (test_provisioning.py); a
        # value removed behind its back (e.g. in the database) still stops the render.
        session.query(Profile).filter_by(name="global").one().params = {}
        for file in (ANSWER_FILES[name], "boot.ipxe", "kernel-params"):
            with pytest.raises(RenderError) as err:
                render_machine_file(config, session, catalog, m, file, TARGET)
            assert "'ssh_authorized_keys'" in str(err.value) and MAC in str(err.value)


@pytest.mark.parametrize("name", INSTALLERS)
def test_an_empty_key_list_is_refused_by_the_template(setup, name: str) -> None:  # type: ignore[no-untyped-def]
    config, db, catalog = setup
    with db.session() as session:
        set_profile(session, catalog, "global", {"ssh_authorized_keys": []})
        m = machine(session)
        configure_machine(session, catalog, m, bootenv=name,
                          values=DEPLOY if name == "image-deploy" else {})
        file = "user-data" if name == "image-deploy" else ANSWER_FILES[name]
        with pytest.raises(RenderError) as err:
            render_machine_file(config, session, catalog, m, file, TARGET)
    assert "ssh_authorized_keys_is_empty" in str(err.value)
    assert MAC in str(err.value)


@pytest.mark.parametrize("values, expected", [
    ({"ssh_authorized_keys": KEY}, "param 'ssh_authorized_keys' (profile site; declared by "
                                   "bootenv "),
    ({"ssh_authorized_keys": [KEY, {"a": 1}]}, "list items must be strings or numbers"),
    ({"timezone": 1}, "param 'timezone' (profile site; declared by bootenv "),
    ({"extra_packages": "vim htop"}, "expected list, got string"),
    ({"root_disk": ["/dev/sda"]}, "param 'root_disk'"),
    ({"image_sha256": 123}, "param 'image_sha256'"),
])
def test_a_param_of_the_wrong_type_is_refused_on_a_profile(setup, values, expected) -> None:  # type: ignore[no-untyped-def]
    _, db, catalog = setup
    with db.session() as session:
        with pytest.raises(ProfileError) as err:
            set_profile(session, catalog, "site", values)
        assert expected in str(err.value)
        assert session.query(Machine).count() == 1


def test_command_line_values_are_typed_by_the_bootenvs(setup) -> None:  # type: ignore[no-untyped-def]
    _, _, catalog = setup
    assert parse_assignments(catalog, [f'ssh_authorized_keys=["{KEY}"]',
                                       "extra_packages=[]", "timezone=UTC"]) == {
        "ssh_authorized_keys": [KEY], "extra_packages": [], "timezone": "UTC"}
    with pytest.raises(ProfileError) as err:
        parse_assignments(catalog, [f"ssh_authorized_keys={KEY}"])
    assert "param 'ssh_authorized_keys': expected JSON (list)" in str(err.value)


@pytest.mark.parametrize("values, expected", [
    ({"image_sha256": "abc"}, "image_sha256_must_be_64_lowercase_hex_digits"),
    ({"image_sha256": "A" * 64}, "image_sha256_must_be_64_lowercase_hex_digits"),
    ({"image": "../../etc/shadow"}, "image_relative_path_must_not_contain_dotdot"),
    ({"image": "  "}, "image_is_empty"),
    ({"cloud_init_datasource": "configdrive"}, "cloud_init_datasource_must_be_nocloud_or_ec2"),
    ({"cloud_init_datasource": "NoCloud"}, "cloud_init_datasource_must_be_nocloud_or_ec2"),
])
def test_bad_deploy_orders_are_refused(setup, values, expected) -> None:  # type: ignore[no-untyped-def]
    config, db, catalog = setup
    with db.session() as session:
        set_profile(session, catalog, "global", {"ssh_authorized_keys": [KEY]})
        m = machine(session)
        configure_machine(session, catalog, m, bootenv="image-deploy",
                          values={**DEPLOY, **values})
        with pytest.raises(RenderError) as err:
            render_machine_file(config, session, catalog, m, "deploy.json", TARGET)
    assert "template 'deploy/deploy.json.j2'" in str(err.value) and expected in str(err.value)


def test_a_bad_mirror_is_refused_by_the_preseed(setup) -> None:  # type: ignore[no-untyped-def]
    config, db, catalog = setup
    with db.session() as session:
        set_profile(session, catalog, "global", {"ssh_authorized_keys": [KEY]})
        m = machine(session)
        configure_machine(session, catalog, m, bootenv="debian-12",
                          values={"mirror": "deb.debian.org/debian"})
        with pytest.raises(RenderError) as err:
            render_machine_file(config, session, catalog, m, "preseed.cfg", TARGET)
    assert "mirror_must_be_an_http_or_https_url" in str(err.value)


@pytest.mark.parametrize("name", ["debian-12", "ubuntu-24.04", "rocky-9"])
def test_a_key_with_a_newline_is_refused(setup, name: str) -> None:  # type: ignore[no-untyped-def]
    """A newline would end the key's line in the answer file and start another."""
    config, db, catalog = setup
    with db.session() as session:
        set_profile(session, catalog, "global",
                    {"ssh_authorized_keys": [KEY + "\nd-i passwd/root-password password x"]})
        m = machine(session)
        configure_machine(session, catalog, m, bootenv=name)
        with pytest.raises(RenderError) as err:
            render_machine_file(config, session, catalog, m, ANSWER_FILES[name], TARGET)
    assert "ssh_authorized_keys_has_a_key_with_a_newline" in str(err.value)


def test_answer_files_need_an_install_in_progress(setup) -> None:  # type: ignore[no-untyped-def]
    config, db, catalog = setup
    with db.session() as session:
        set_profile(session, catalog, "global", {"ssh_authorized_keys": [KEY]})
        m = machine(session)
        configure_machine(session, catalog, m, bootenv="alma-9")
        m.install_token = None
        with pytest.raises(RenderError) as err:
            render_machine_file(config, session, catalog, m, "ks.cfg", TARGET)
    assert "no install token" in str(err.value)


# ---- image-deploy orders ----------------------------------------------------------------

def _deploy(setup, values: dict):  # type: ignore[no-untyped-def]
    config, db, catalog = setup
    with db.session() as session:
        set_profile(session, catalog, "global", {"ssh_authorized_keys": [KEY]})
        m = machine(session)
        configure_machine(session, catalog, m, bootenv="image-deploy", values=values)
        return render_machine_file(config, session, catalog, m, "deploy.env", TARGET)


def test_deploy_env_is_shell_that_cannot_run_a_param(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    hostile = "os/x.raw'; touch " + str(tmp_path / "pwned") + "; '"
    text = _deploy(setup, {**DEPLOY, "image": hostile + ".zst"})
    script = tmp_path / "deploy.env"
    script.write_text(text + 'printf "%s\\n" "$DEPLOY_IMAGE" "$DEPLOY_COMPRESSION" '
                             '"$DEPLOY_SHA256" "$DEPLOY_END"\n')
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"http://10.0.0.1:8080/images/{hostile}.zst", "zstd",
                                       "0" * 64, "1"]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("image", ["os/disk.qcow2", "https://example.test/disk.vmdk"])
def test_deploy_refuses_vm_disk_formats(setup, image: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RenderError, match="qemu_img_convert|qcow2|convert"):
        _deploy(setup, {**DEPLOY, "image": image})


def _orders(setup, values: dict) -> tuple[str, dict, str]:  # type: ignore[no-untyped-def]
    """(deploy.env, deploy.json, the machine's seed URL) for the same params."""
    import json

    config, db, catalog = setup
    with db.session() as session:
        set_profile(session, catalog, "global", {"ssh_authorized_keys": [KEY]})
        m = machine(session)
        configure_machine(session, catalog, m, bootenv="image-deploy", values=values)
        env = render_machine_file(config, session, catalog, m, "deploy.env", TARGET)
        orders = json.loads(render_machine_file(config, session, catalog, m, "deploy.json",
                                                TARGET))
        return env, orders, f"{TARGET.base_url}/nocloud/{m.seed_token}/"


def _env_value(tmp_path: Path, env: str, name: str) -> str:
    import subprocess

    script = tmp_path / "deploy.env"
    script.write_text(env + f'printf "%s" "${name}"\n')
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("datasource", [None, "nocloud", "ec2"])
def test_deploy_orders_carry_the_cloud_init_datasource_config(setup, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                              datasource) -> None:
    """deploy.env's DEPLOY_CLOUD_CFG and deploy.json's cloud_init_config are one text:
    one datasource (and None) in datasource_list, so ds-identify takes it unprobed."""
    import yaml

    values = dict(DEPLOY) if datasource is None else {**DEPLOY,
                                                      "cloud_init_datasource": datasource}
    env, orders, seed_url = _orders(setup, values)
    text = _env_value(tmp_path, env, "DEPLOY_CLOUD_CFG")
    assert text == orders["cloud_init_config"] and text.endswith("false\n")
    assert orders["cloud_init_config_path"] == "/etc/cloud/cloud.cfg.d/99-appliance.cfg"
    cfg = yaml.safe_load(text)
    assert cfg["disable_root"] is False and cfg["ssh_pwauth"] is False
    if datasource == "ec2":
        assert orders["cloud_init_datasource"] == "ec2"
        assert cfg["datasource_list"] == ["Ec2", "None"]
        ec2 = cfg["datasource"]["Ec2"]
        assert ec2["metadata_urls"] == [TARGET.base_url] and ec2["strict_id"] is False
        assert ec2["timeout"] > 0 and ec2["max_wait"] >= ec2["timeout"]
    else:  # the default
        assert orders["cloud_init_datasource"] == "nocloud"
        assert cfg["datasource_list"] == ["NoCloud", "None"]
        assert cfg["datasource"] == {"NoCloud": {"seedfrom": seed_url}}
        assert seed_url.endswith("/")
