"""Boot steering: which boot loader or URL a client gets (DESIGN.md, "Boot flow").

| client says (option 93 / 60 / 77)          | it gets                                   |
| BIOS PXE ROM (arch 0)                      | TFTP bios_loader (undionly.kpxe)          |
| UEFI x64 PXE (arch 7 or 9)                 | TFTP uefi_loader (ipxe.efi)               |
| UEFI HTTP boot (arch 16, class HTTPClient) | http://<appliance>/tftp/<uefi_loader>     |
| iPXE (user class iPXE)                     | http://<appliance>/boot/<mac>.ipxe        |

Clients that are none of these (no PXEClient/HTTPClient vendor class, no iPXE user
class) get a plain lease without boot information.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.dhcp.options import (
    ARCH_BIOS,
    ARCH_EFI_BC,
    ARCH_EFI_X64,
    ARCH_EFI_X64_HTTP,
    ARCH_NAMES,
    CLIENT_ARCH,
    USER_CLASS,
    VENDOR_CLASS,
)

PXE_CLIENT = b"PXEClient"
HTTP_CLIENT = b"HTTPClient"


@dataclass(frozen=True, slots=True)
class ClientKind:
    """What a client told us about itself."""

    pxe: bool  # vendor class starts with PXEClient
    http: bool  # vendor class starts with HTTPClient
    ipxe: bool  # user class iPXE
    arch: int | None  # option 93 (first entry), or parsed from the vendor class

    @property
    def boots(self) -> bool:
        return self.pxe or self.http or self.ipxe

    @property
    def arch_name(self) -> str | None:
        if self.arch is None:
            return None
        return ARCH_NAMES.get(self.arch, f"arch-{self.arch}")


@dataclass(frozen=True, slots=True)
class BootInfo:
    """The boot part of a reply."""

    kind: str  # "tftp" | "http" | "ipxe"
    file: str  # boot file name (TFTP) or URL
    next_server: int  # siaddr (0 for URLs only)
    vendor_class: bytes | None  # option 60 to put in the reply


def _user_classes(value: bytes) -> list[bytes]:
    """Option 77: RFC 3004 length-prefixed list, or (iPXE, others) one plain string."""
    out: list[bytes] = []
    i = 0
    while i < len(value):
        n = value[i]
        if n == 0 or i + 1 + n > len(value):
            return [value]
        out.append(value[i + 1 : i + 1 + n])
        i += 1 + n
    return out or [value]


def _arch_from_vendor_class(vc: bytes) -> int | None:
    # "PXEClient:Arch:00007:UNDI:003016"
    parts = vc.split(b":")
    if len(parts) >= 3 and parts[1] == b"Arch" and parts[2].isdigit():
        return int(parts[2])
    return None


_PLAIN = ClientKind(pxe=False, http=False, ipxe=False, arch=None)


def classify(options: dict[int, bytes]) -> ClientKind:
    if VENDOR_CLASS not in options and USER_CLASS not in options and CLIENT_ARCH not in options:
        return _PLAIN  # the common case on the hot path: an ordinary client
    vc = options.get(VENDOR_CLASS, b"")
    pxe = vc.startswith(PXE_CLIENT)
    http = vc.startswith(HTTP_CLIENT)
    uc = options.get(USER_CLASS)
    ipxe = uc is not None and (uc == b"iPXE" or b"iPXE" in _user_classes(uc))
    arch_opt = options.get(CLIENT_ARCH)
    arch: int | None = None
    if arch_opt is not None and len(arch_opt) >= 2:
        arch = int.from_bytes(arch_opt[:2], "big")
    elif pxe or http:
        arch = _arch_from_vendor_class(vc)
    return ClientKind(pxe=pxe, http=http, ipxe=ipxe, arch=arch)


@dataclass(frozen=True, slots=True)
class SteeringConfig:
    bios_loader: str
    uefi_loader: str
    http_port: int


def steer(
    kind: ClientKind,
    mac: str,
    cfg: SteeringConfig,
    tftp_server: int,
    url_host: str,
) -> BootInfo | None:
    """The boot information for a client, or None (not a boot client / unknown arch).

    ``tftp_server`` is the siaddr for TFTP boot; ``url_host`` the appliance address used
    in HTTP URLs.
    """
    base = f"http://{url_host}:{cfg.http_port}"
    if kind.ipxe:
        vc = PXE_CLIENT if kind.pxe else None
        return BootInfo("ipxe", f"{base}/boot/{mac}.ipxe", tftp_server, vc)
    if kind.http:
        if kind.arch == ARCH_EFI_X64_HTTP:
            return BootInfo("http", f"{base}/tftp/{cfg.uefi_loader}", 0, HTTP_CLIENT)
        return None
    if kind.pxe:
        if kind.arch is None or kind.arch == ARCH_BIOS:
            return BootInfo("tftp", cfg.bios_loader, tftp_server, PXE_CLIENT)
        if kind.arch in (ARCH_EFI_BC, ARCH_EFI_X64):
            return BootInfo("tftp", cfg.uefi_loader, tftp_server, PXE_CLIENT)
        return None
    return None
