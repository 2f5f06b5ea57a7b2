from pathlib import Path

import pytest

from appliance.config import ConfigError, load_config


def test_defaults_are_safe_without_a_file(tmp_path: Path) -> None:
    config = load_config(env={})
    assert config.dhcp.mode == "server"
    assert config.tftp.root == "/usr/lib/ipxe"
    assert config.effective_database_url == "sqlite:////var/lib/appliance/appliance.db"


def test_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('state_dir = "/srv/x"\n[http]\nport = 81\n[dhcp]\nmode = "proxy"\n')
    config = load_config(path, env={"APPLIANCE_HTTP_PORT": "8181",
                                    "APPLIANCE_BOOT_RELOAD_IPXE_BIOS": "yes"})
    assert config.state_dir == "/srv/x"
    assert config.http.port == 8181
    assert config.dhcp.mode == "proxy"
    assert config.boot.reload_ipxe_bios is True
    assert config.effective_database_url == "sqlite:////srv/x/appliance.db"


@pytest.mark.parametrize("text, message", [
    ("[http]\nport = 'x'\n", "http.port: expected int"),
    ("[http]\nprot = 1\n", "http.prot: unknown setting"),
    ("[dhcp]\nmode = 'relay'\n", "dhcp.mode"),
    ("[http]\nport = 70000\n", "http.port: 70000"),
    ("http = 3\n", "http: expected a [http] table"),
    ("[http\n", "a.toml"),
])
def test_bad_values_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "a.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(path, env={})


def test_bad_environment_value_is_named() -> None:
    with pytest.raises(ConfigError, match="APPLIANCE_TFTP_PORT: expected int"):
        load_config(env={"APPLIANCE_TFTP_PORT": "sixty-nine"})


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})
