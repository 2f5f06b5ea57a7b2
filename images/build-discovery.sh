#!/bin/bash
# Build the discovery image (bootenv discovery): vmlinuz + initrd.img into OUTDIR.
# The appliance's one initrd serves discovery and deploy; build-initrd.sh builds it and
# documents the environment variables.
#
# Usage: images/build-discovery.sh [OUTDIR]   (default /var/lib/appliance/images/discovery)
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/build-initrd.sh" "${1:-/var/lib/appliance/images/discovery}"
