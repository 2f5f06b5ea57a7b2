"""DHCP constants: message types, option codes, client architectures (RFC 2131/2132/4578)."""

from __future__ import annotations

# BOOTP op codes
BOOTREQUEST = 1
BOOTREPLY = 2

# Message types (option 53)
DISCOVER = 1
OFFER = 2
REQUEST = 3
DECLINE = 4
ACK = 5
NAK = 6
RELEASE = 7
INFORM = 8

MESSAGE_NAMES = {
    DISCOVER: "discover", OFFER: "offer", REQUEST: "request", DECLINE: "decline",
    ACK: "ack", NAK: "nak", RELEASE: "release", INFORM: "inform",
}

# Option codes
PAD = 0
SUBNET_MASK = 1
ROUTER = 3
DNS_SERVERS = 6
HOSTNAME = 12
DOMAIN_NAME = 15
BROADCAST_ADDRESS = 28
VENDOR_SPECIFIC = 43
REQUESTED_ADDRESS = 50
LEASE_TIME = 51
OVERLOAD = 52
MESSAGE_TYPE = 53
SERVER_ID = 54
PARAMETER_LIST = 55
MESSAGE = 56
MAX_MESSAGE_SIZE = 57
RENEWAL_TIME = 58
REBINDING_TIME = 59
VENDOR_CLASS = 60
CLIENT_ID = 61
TFTP_SERVER_NAME = 66
BOOTFILE_NAME = 67
USER_CLASS = 77
RELAY_AGENT_INFO = 82
CLIENT_ARCH = 93
CLIENT_NDI = 94
CLIENT_MACHINE_ID = 97
END = 255

MAGIC_COOKIE = b"\x63\x82\x53\x63"

# Client system architecture types (option 93, RFC 4578 and the IANA registry)
ARCH_BIOS = 0
ARCH_EFI_IA32 = 6
ARCH_EFI_BC = 7
ARCH_EFI_X64 = 9
ARCH_EFI_ARM32 = 10
ARCH_EFI_ARM64 = 11
ARCH_EFI_X64_HTTP = 16

ARCH_NAMES = {
    ARCH_BIOS: "bios",
    ARCH_EFI_IA32: "uefi-ia32",
    ARCH_EFI_BC: "uefi-x64",
    ARCH_EFI_X64: "uefi-x64",
    ARCH_EFI_ARM32: "uefi-arm32",
    ARCH_EFI_ARM64: "uefi-arm64",
    ARCH_EFI_X64_HTTP: "uefi-x64-http",
}

# PXE (option 43) sub-option: discovery control; bit 3 = boot file in this offer, use it
PXE_DISCOVERY_CONTROL = 6
PXE_USE_BOOTFILE = 0x08

#: PXE Boot Server discovery port (proxyDHCP follow-up requests).
PXE_PORT = 4011
CLIENT_PORT = 68
SERVER_PORT = 67
