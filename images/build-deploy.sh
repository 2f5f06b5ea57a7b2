#!/bin/bash
# Build the deploy image (bootenv image-deploy): vmlinuz + initrd.img into OUTDIR.
# The appliance's one initrd serves discovery and deploy (appliance.mode=deploy on the
# kernel command line); build-initrd.sh builds it and documents the environment variables.
#
# Usage: images/build-deploy.sh [OUTDIR]      (default /var/lib/appliance/images/deploy)
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/build-initrd.sh" "${1:-/var/lib/appliance/images/deploy}"
