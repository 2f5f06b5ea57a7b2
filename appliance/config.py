"""Configuration: a TOML file plus environment overrides; every setting has a safe default.

Lookup order (later wins): built-in defaults < TOML file < environment.
The file is ``$APPLIANCE_CONFIG`` or ``/etc/appliance/appliance.toml``; a missing default
file is fine, a missing file that was asked for explicitly is an error.

Environment overrides are ``APPLIANCE_<KEY>`` for top-level keys and
``APPLIANCE_<SECTION>_<KEY>`` for keys in a section, e.g. ``APPLIANCE_HTTP_PORT=8081``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/appliance/appliance.toml")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or unknown."""


@dataclass
class HttpConfig:
    enabled: bool = True
    bind: str = "0.0.0.0"
    port: int = 8080
    workers: int = 2
    #: Threads per worker: each concurrent download holds one.
    threads: int = 32
    access_log: bool = False
    #: Address machines use to reach this appliance in URLs handed out by DHCP and
    #: scripts. Empty: the address the DHCP request arrived on.
    public_address: str = ""
    #: Comma-separated networks whose clients may use the JSON API (``/api/v1``), on top
    #: of its authentication (an API token or a login session; there is no default user).
    api_networks: str = "0.0.0.0/0,::/0"
    #: Comma-separated networks whose clients may read ``/metrics`` (Prometheus). Only
    #: this box by default: the provisioning network must not read it. Empty: nobody.
    metrics_networks: str = "127.0.0.0/8,::1"


@dataclass
class TftpConfig:
    enabled: bool = True
    bind: str = "0.0.0.0"
    port: int = 69
    #: Directory of boot loaders served over TFTP (Debian's ``ipxe`` package).
    root: str = "/usr/lib/ipxe"
    #: Seconds to wait for an ACK before retransmitting.
    timeout: float = 2.0
    retries: int = 5
    #: Worker processes sharing the port (SO_REUSEPORT); 0: one per CPU, 1: in-process.
    #: One per CPU was measured against 4 and 8 on 2 CPUs (bench/tftp/README.md): more
    #: workers did not win at 100 clients and lost ~15% at 20 (smaller epoll batches,
    #: more context switches); each idle worker costs ~15 MB of private memory.
    workers: int = 0
    #: Largest block size granted to a client asking for more (RFC 2348 allows 65464).
    max_blksize: int = 65464
    #: Colon-separated paths outside ``root`` that symlinks inside ``root`` may point to
    #: (files, or directories and everything below). Debian's ``ipxe`` package ships
    #: ``ipxe.efi`` and ``ipxe.lkrn`` as symlinks into /boot. Empty: no escaping symlinks.
    symlink_targets: str = "/boot/ipxe.efi:/boot/ipxe.lkrn"


@dataclass
class DhcpConfig:
    enabled: bool = True
    #: ``server``: hand out addresses from the subnets in the database.
    #: ``proxy``: another DHCP server hands out addresses, we only answer PXE clients.
    mode: str = "server"
    #: Interface to serve on (SO_BINDTODEVICE); empty serves every interface.
    interface: str = ""
    bind: str = "0.0.0.0"
    port: int = 67
    #: Seconds an OFFER holds its address before the address can be offered again.
    offer_hold_seconds: int = 30
    #: Boot loader file names, relative to the TFTP root.
    bios_loader: str = "undionly.kpxe"
    uefi_loader: str = "ipxe.efi"


@dataclass
class SyslogConfig:
    """Remote syslog receiver for installer logs (``appliance/syslog``)."""

    enabled: bool = True
    bind: str = "0.0.0.0"
    #: UDP, and TCP on the same port when ``tcp`` is on (anaconda's rsyslog uses TCP).
    port: int = 514
    tcp: bool = True
    #: Oldest lines beyond this are deleted, per machine (checked every minute).
    max_lines_per_machine: int = 20000
    #: Lines from addresses without a current lease kept (machine unknown); 0: none.
    max_unmatched_lines: int = 2000


@dataclass
class PowerConfig:
    """BMC calls (``appliance/power``): the ``power`` part's worker pool and poller."""

    enabled: bool = True
    #: BMC calls in flight at once (one at a time per machine).
    workers: int = 32
    #: Seconds one attempt (login included) may take before it is abandoned.
    call_timeout: float = 10.0
    #: Attempts per call; only timeouts and connection errors are retried.
    attempts: int = 3
    #: Seconds before the second attempt; doubles for each further one.
    backoff: float = 1.0
    #: Seconds between power state polls of each machine with a BMC; 0 turns polling off.
    poll_interval: int = 120


@dataclass
class LifecycleConfig:
    """Deployments (``appliance/lifecycle``): phase time limits, the metadata service and
    the post-provision contract check. A phase that outlives its limit fails the machine
    with the reason; 0 means no limit."""

    enabled: bool = True
    #: Seconds for the BMC to take the reimage's boot-device and power-cycle requests.
    power_timeout: int = 600
    #: Seconds from power-on to the machine fetching its boot script (POST + PXE).
    boot_timeout: int = 1800
    #: Seconds for the installer or the deploy image to report the install done.
    installer_timeout: int = 7200
    #: Seconds from install done to the installed OS phoning home (reboot + cloud-init).
    first_boot_timeout: int = 1800
    #: Seconds for the appliance's own SSH contract check to pass (it retries within).
    contract_timeout: int = 600
    #: User the contract check asks the machine's SSH server about (operator's keys).
    contract_user: str = "root"
    #: SSH port of installed machines.
    contract_ssh_port: int = 22
    #: Seconds an IMDSv2 session token may live at most (EC2 allows up to 21600).
    imds_token_max_ttl: int = 21600
    #: Refuse EC2 metadata requests without an IMDSv2 token (IMDSv1 off).
    imds_require_token: bool = False


@dataclass
class AuthConfig:
    """Web UI login sessions (``appliance/web/auth.py``); users and API tokens are made
    with ``appliance user`` and ``appliance token``."""

    #: Hours a login session lasts.
    session_hours: float = 12.0
    #: Send the session cookie only over HTTPS (set it when a TLS proxy is in front).
    secure_cookies: bool = False


@dataclass
class BootConfig:
    #: Directory of boot environment definitions (``*.yaml``); empty: the shipped ones.
    bootenvs_dir: str = ""
    #: Directory of Jinja2 templates; empty: the shipped ones.
    templates_dir: str = ""
    #: BIOS machines whose NIC ROM is some other iPXE build first load the appliance's
    #: ``undionly.kpxe`` over TFTP, so every BIOS machine runs the same iPXE.
    reload_ipxe_bios: bool = False


@dataclass
class Config:
    state_dir: str = "/var/lib/appliance"
    #: SQLAlchemy URL; empty means embedded SQLite at ``<state_dir>/appliance.db``.
    database_url: str = ""
    log_level: str = "INFO"
    http: HttpConfig = field(default_factory=HttpConfig)
    tftp: TftpConfig = field(default_factory=TftpConfig)
    dhcp: DhcpConfig = field(default_factory=DhcpConfig)
    boot: BootConfig = field(default_factory=BootConfig)
    syslog: SyslogConfig = field(default_factory=SyslogConfig)
    power: PowerConfig = field(default_factory=PowerConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.state_dir) / 'appliance.db'}"

    @property
    def images_dir(self) -> Path:
        """Kernels, initrds and OS images served over HTTP under ``/images/``."""
        return Path(self.state_dir) / "images"

    def validate(self) -> None:
        if self.dhcp.mode not in ("server", "proxy"):
            raise ConfigError(f"dhcp.mode: must be 'server' or 'proxy', not {self.dhcp.mode!r}")
        for section, port in (("http", self.http.port), ("tftp", self.tftp.port),
                              ("dhcp", self.dhcp.port), ("syslog", self.syslog.port)):
            if not 0 < port < 65536:
                raise ConfigError(f"{section}.port: {port} is not a valid port")
        if self.http.workers < 1:
            raise ConfigError("http.workers: must be at least 1")
        if self.tftp.workers < 0:
            raise ConfigError("tftp.workers: must be 0 (one per CPU) or more")
        if not 8 <= self.tftp.max_blksize <= 65464:
            raise ConfigError("tftp.max_blksize: must be between 8 and 65464")
        if self.tftp.timeout <= 0 or self.tftp.retries < 0:
            raise ConfigError("tftp.timeout must be positive and tftp.retries not negative")
        for setting in ("api_networks", "metrics_networks"):
            for part in getattr(self.http, setting).split(","):
                try:
                    if part.strip():
                        ipaddress.ip_network(part.strip(), strict=False)
                except ValueError:
                    raise ConfigError(f"http.{setting}: {part.strip()!r} is not a network") \
                        from None
        if not 0 < self.auth.session_hours <= 24 * 90:
            raise ConfigError("auth.session_hours: must be more than 0 and at most 2160 "
                              "(90 days)")
        if self.http.threads < 1:
            raise ConfigError("http.threads: must be at least 1")
        if self.syslog.max_lines_per_machine < 1:
            raise ConfigError("syslog.max_lines_per_machine: must be at least 1")
        if not 1 <= self.power.workers <= 1024:
            raise ConfigError("power.workers: must be between 1 and 1024")
        if self.power.call_timeout <= 0 or self.power.attempts < 1 or self.power.backoff < 0:
            raise ConfigError("power.call_timeout must be positive, power.attempts at least 1 "
                              "and power.backoff not negative")
        if self.power.poll_interval < 0:
            raise ConfigError("power.poll_interval: must be 0 (off) or more seconds")
        lc = self.lifecycle
        for name in ("power_timeout", "boot_timeout", "installer_timeout",
                     "first_boot_timeout", "contract_timeout"):
            if getattr(lc, name) < 0:
                raise ConfigError(f"lifecycle.{name}: must be 0 (no limit) or more seconds")
        if not 0 < lc.contract_ssh_port < 65536:
            raise ConfigError(f"lifecycle.contract_ssh_port: {lc.contract_ssh_port} is not a "
                              "valid port")
        if not re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}", lc.contract_user):
            raise ConfigError(f"lifecycle.contract_user: {lc.contract_user!r} is not a user "
                              "name")
        if not 1 <= lc.imds_token_max_ttl <= 21600:
            raise ConfigError("lifecycle.imds_token_max_ttl: must be between 1 and 21600")
        if self.syslog.max_unmatched_lines < 0:
            raise ConfigError("syslog.max_unmatched_lines: must be 0 or more")


def _coerce(where: str, value: Any, default: Any) -> Any:
    """Convert ``value`` (from TOML or the environment) to the type of ``default``."""
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _apply(obj: Any, data: dict[str, Any], prefix: str) -> None:
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown setting")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a [{key}] table")
            _apply(current, value, f"{where}.")
        else:
            setattr(obj, key, _coerce(where, value, current))


def _env_overrides(obj: Any, env: dict[str, str], prefix: str) -> None:
    for f in dataclasses.fields(obj):
        current = getattr(obj, f.name)
        name = f"{prefix}{f.name.upper()}"
        if dataclasses.is_dataclass(current):
            _env_overrides(current, env, f"{name}_")
        elif name in env:
            setattr(obj, f.name, _coerce(name, env[name], current))


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Load the configuration; raises ConfigError naming the bad setting."""
    env = dict(os.environ) if env is None else env
    explicit = path is not None or "APPLIANCE_CONFIG" in env
    config_path = Path(path or env.get("APPLIANCE_CONFIG") or DEFAULT_CONFIG_PATH)
    config = Config()
    if config_path.exists():
        try:
            data = tomllib.loads(config_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: {exc}") from None
        _apply(config, data, "")
    elif explicit:
        raise ConfigError(f"{config_path}: configuration file not found")
    _env_overrides(config, env, "APPLIANCE_")
    config.validate()
    return config
