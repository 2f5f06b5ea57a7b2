"""The BMC driver interface every power driver implements (IPMI, Redfish).

Split the way Ironic splits it: *power* (state, on, off, cycle, reset, soft-off) and
*management* (next boot device, once or persistent, BIOS or UEFI; identify light).
A driver makes blocking calls with its own socket timeouts; the caller
(:mod:`appliance.power.calls`) adds the overall deadline, retries and events, and runs
it off the request path. A driver never logs or returns the password.

Any failure is a :class:`BmcError` with a ``kind`` the caller can act on: a wrong or
missing answer from the BMC is an error, never a silent success.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

#: Power actions a driver performs. ``cycle`` on a machine that is off powers it on.
POWER_ACTIONS = ("on", "off", "cycle", "reset", "soft-off")
POWER_STATES = ("on", "off")
#: Next-boot devices. ``default`` clears an override.
BOOT_DEVICES = ("pxe", "disk", "cdrom", "bios-setup", "default")
BOOT_MODES = ("bios", "uefi")

#: Error kinds. ``transient`` ones are retried with backoff; the others are not.
TIMEOUT = "timeout"          # no (complete) answer in time: transient
CONNECTION = "connection"    # refused, unreachable, reset: transient
AUTH = "auth"                # wrong user or password, insufficient privilege
PROTOCOL = "protocol"        # an answer we cannot trust: short, malformed, unexpected
REFUSED = "refused"          # the BMC answered with an error completion / HTTP error
UNSUPPORTED = "unsupported"  # this BMC or driver cannot do it
CONFIG = "config"            # the machine's BMC settings are incomplete or wrong
TRANSIENT_KINDS = frozenset({TIMEOUT, CONNECTION})


class BmcError(Exception):
    """A BMC call failed. ``kind`` is one of the error kinds above."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT_KINDS

    def __str__(self) -> str:
        return f"{self.kind}: {self.args[0]}"


@dataclass(frozen=True)
class BmcAccess:
    """How to reach one machine's BMC. The password is never part of repr()."""

    driver: str
    address: str
    port: int
    username: str
    password: str = field(repr=False, default="")
    #: Redfish over HTTPS: check the BMC's certificate against the system's CAs.
    verify_tls: bool = True
    #: Redfish: the system's path (``/redfish/v1/Systems/1``); empty: the only one.
    system_id: str = ""

    def describe(self) -> str:
        """Where the BMC is, for messages and events (no credentials)."""
        return f"{self.driver} {self.username}@{self.address}:{self.port}"


@dataclass(frozen=True)
class BootDevice:
    device: str
    persistent: bool
    #: ``bios``, ``uefi``, or None when the BMC does not say.
    mode: str | None = None


class PowerDriver(ABC):
    """One BMC. Each method is one blocking exchange (or a few) with the BMC."""

    #: Name used in the machine's ``bmc_driver`` setting.
    name: str = ""
    default_port: int = 0

    def __init__(self, access: BmcAccess, timeout: float) -> None:
        self.access = access
        self.timeout = timeout

    @abstractmethod
    def validate(self) -> None:
        """Log in and make one harmless call: proves address and credentials."""

    @abstractmethod
    def get_power_state(self) -> str:
        """``on`` or ``off``."""

    @abstractmethod
    def set_power_state(self, action: str) -> None:
        """Perform one of :data:`POWER_ACTIONS`."""

    @abstractmethod
    def set_boot_device(self, device: str, persistent: bool, mode: str) -> None:
        """Set the next boot device; ``persistent`` False means the next boot only."""

    @abstractmethod
    def get_boot_device(self) -> BootDevice:
        """The boot override the BMC reports."""

    @abstractmethod
    def identify(self, on: bool) -> None:
        """Turn the chassis identify light on (indefinitely) or off."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Log out and release sockets. Called once, after the last call."""
