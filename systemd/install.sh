#!/bin/bash
# Install the appliance on Debian 12 and start it (README "Install and run").
# As root: system packages, a virtualenv in /opt/appliance, a system user, the config
# /etc/appliance/appliance.toml (kept if present), the systemd unit; then starts the
# service, or runs `appliance serve` in the foreground where systemd is not running.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" != 0 ]; then echo "install.sh: run as root (sudo)" >&2; exit 2; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip ipxe \
    openssh-client
[ -x /opt/appliance/bin/python ] || python3 -m venv /opt/appliance
/opt/appliance/bin/pip install -q --upgrade pip
/opt/appliance/bin/pip install -q "$src"
ln -sf /opt/appliance/bin/appliance /usr/local/bin/appliance
install -m 0644 "$src/README.md" /opt/appliance/README.md
id appliance >/dev/null 2>&1 || useradd --system --home-dir /var/lib/appliance \
  --shell /usr/sbin/nologin appliance
install -d -m 0755 /etc/appliance
[ -f /etc/appliance/appliance.toml ] || install -m 0644 "$src/systemd/appliance.toml" \
  /etc/appliance/appliance.toml
install -d -m 0750 -o appliance -g appliance /var/lib/appliance
# The appliance's own image (kernel + busybox initrd from Debian packages): unknown
# machines boot it as discovery, the image-deploy bootenv as its deploy step.
"$src/images/build-initrd.sh" /var/lib/appliance/images/discovery \
  /var/lib/appliance/images/deploy
chown -R appliance:appliance /var/lib/appliance/images
install -m 0644 "$src/systemd/appliance.service" /etc/systemd/system/appliance.service
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable --now appliance.service
  systemctl --no-pager --lines=5 status appliance.service || true
  echo "appliance is running: journalctl -u appliance -f"
else
  echo "systemd is not running here: starting appliance serve in the foreground (Ctrl-C stops)"
  exec /opt/appliance/bin/appliance --config /etc/appliance/appliance.toml serve
fi
