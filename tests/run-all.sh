#!/bin/bash
# The test command (README "Test"): as root on Debian 12, installs every system package
# the tests need, the appliance into a virtualenv (.venv), starts a PostgreSQL server
# for the database tests, and runs the whole suite: lint, unit, integration, e2e.
# Extra arguments go to pytest (e.g. tests/run-all.sh -k dhcp).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "tests/run-all.sh: run as root (sudo): tests create network namespaces and VMs" >&2
  exit 2
fi

packages=(
  python3 python3-venv python3-pip iproute2 curl ca-certificates
  busybox-static udhcpc isc-dhcp-client dnsmasq-base          # DHCP clients and peer
  tftp-hpa atftp tftpd-hpa                                     # TFTP clients and peer
  kea-dhcp4-server kea-admin                                   # Kea + perfdhcp (bench)
  postgresql                                                   # database tests
  qemu-system-x86 qemu-utils ipxe ipxe-qemu ovmf cpio kmod     # e2e VM boots
  mmdebstrap extlinux syslinux-common e2fsprogs fdisk zstd     # OS image (build-debian-image.sh)
  openssh-client                                               # logging in to a deployed OS
  libpcap0.8                                                   # scapy sniffing
  debian-installer-12-netboot-amd64                            # d-i e2e, debian-12 bootenv
  cloud-init debconf grub-common                               # answer-file validators
  xorriso util-linux                                           # ISO import tests, logger
  openipmi ipmitool openssl                                    # BMC simulator, client, certs
  openssh-server openssh-client                                # SSH contract check and peer
  chromium chromium-driver                                     # web UI browser test
)
export DEBIAN_FRONTEND=noninteractive
# Packages with services (tftpd-hpa, kea, postgresql) must not start them on the host:
# the tests run their own instances inside namespaces. PostgreSQL is started below.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; created_policy=1
fi
# cloud-init is installed only for its schema validator: where this command installs it,
# it must never configure this host (a host that already runs cloud-init is left alone).
if ! dpkg -s cloud-init >/dev/null 2>&1; then
  mkdir -p /etc/cloud && touch /etc/cloud/cloud-init.disabled
fi
# openssh-server is installed only for its sshd binary (the contract tests run their own
# sshd inside namespaces): where this command installs it, it must never serve this host.
if ! dpkg -s openssh-server >/dev/null 2>&1; then
  mkdir -p /etc/ssh && touch /etc/ssh/sshd_not_to_be_run
fi
apt-get update -q
apt-get install -y -q --no-install-recommends "${packages[@]}"
[ "$created_policy" = 1 ] && rm -f "$policy"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'

# PostgreSQL: the lease tests run on it as well as on SQLite.
cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
if [ -z "$cluster" ]; then
  pg_createcluster 15 main >/dev/null
  cluster="15 main"
fi
# shellcheck disable=SC2086
pg_ctlcluster $cluster start 2>/dev/null || true
port=$(pg_lsclusters -h | awk 'NR==1 {print $3}')
# Tests connect as root over the Unix socket (peer authentication): the socket is a file,
# so the appliance reaches it from inside any network namespace.
su postgres -c "psql -q -p $port -tc \"SELECT 1 FROM pg_roles WHERE rolname='root'\"" \
  | grep -q 1 || su postgres -c "psql -q -p $port -c 'CREATE ROLE root LOGIN CREATEDB'"
export APPLIANCE_TEST_PG_URL="postgresql://root@/postgres?host=/var/run/postgresql&port=$port"

.venv/bin/ruff check .
exec .venv/bin/python -m pytest tests/unit tests/integration tests/e2e "$@"
