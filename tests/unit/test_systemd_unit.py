"""The shipped unit is valid for systemd and keeps its hardening."""

import configparser
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).parents[2] / "systemd" / "appliance.service"


def test_unit_settings() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    service = parser["Service"]
    assert service["ExecStart"].endswith("appliance --config /etc/appliance/appliance.toml serve")
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE CAP_NET_RAW"
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["StateDirectory"] == "appliance"
    assert service["ReadWritePaths"] == "/var/lib/appliance"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = tmp_path / "appliance.service"
    unit.write_text(UNIT.read_text().replace("/opt/appliance/bin/appliance", sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "appliance.service" not in result.stderr, result.stderr
