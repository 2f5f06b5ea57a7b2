#!/bin/bash
# Build a minimal Debian 12 (bookworm, amd64) OS disk image for the bootenv image-deploy:
# a raw MBR disk with one ext4 partition (the root file system), booted by extlinux,
# with cloud-init, openssh-server and growpart (the root partition grows to the whole
# disk on first boot), compressed with zstd.
#
# Usage: images/build-debian-image.sh [OUTDIR]
#   OUTDIR    where debian-12-amd64.raw.zst (+ .sha256 and .buildinfo) are installed
#             (default /var/lib/appliance/images/os)
#
# Environment:
#   APPLIANCE_BUILD_CACHE      build cache (default /var/cache/appliance-build); never the
#                              repository. Holds the rootfs tarball and the products.
#   APPLIANCE_OS_MIRROR        Debian mirror (default http://deb.debian.org/debian)
#   APPLIANCE_OS_SECURITY_MIRROR  (default http://deb.debian.org/debian-security)
#   APPLIANCE_OS_EXTRA_PACKAGES   more packages, comma or space separated (default none)
#   APPLIANCE_OS_SLIM          1 (default): leave out what a server does not need (docs,
#                              man pages, translations; kernel modules for sound, video
#                              capture, desktop GPUs, Wi-Fi, Bluetooth, staging, iio,
#                              comedi, isdn). 0: everything the packages ship.
#   APPLIANCE_OS_IMAGE_SIZE    size of the raw disk (e.g. 2G); default: what the files need
#                              plus 256 MiB of free space (growpart enlarges it on the
#                              machine's first boot, so a small image writes faster)
#   APPLIANCE_OS_ZSTD_LEVEL    zstd level (default 12)
#   APPLIANCE_OS_REBUILD       1: build again even if the cache holds a product
#   SOURCE_DATE_EPOCH          timestamp of the files (default 1686355200, Debian 12's
#                              release day; not 0: shadow would date the build's system
#                              users' passwords day 0, "must change"): mmdebstrap's rootfs
#                              tarball is then byte-reproducible for the same mirror
#                              content (the disk image is not quite: mounting it to
#                              install extlinux stamps the file system)
#
# How it is built (root; host tools are installed with apt-get when missing:
# mmdebstrap, extlinux, syslinux-common, e2fsprogs, fdisk, zstd):
#   1. mmdebstrap --variant=minbase bookworm (+ -updates, -security) with the packages
#      below, a few configuration files (overlay) and hooks -> rootfs tarball (cached)
#   2. the tarball unpacked into a directory, fstab and extlinux.conf added, and the ext4
#      file system made from it with `mke2fs -d` (no mount, no loop device)
#   3. the file system copied into a sparse raw disk behind an MBR partition table
#      (sfdisk: one bootable Linux partition from sector 2048), extlinux's mbr.bin into
#      the first 440 bytes
#   4. `extlinux --install` needs the file system mounted: the only loop device and mount
#      of the build, for a second, inside `unshare --mount --propagation private` (so no
#      other process's mount namespace can pin it), partition node from `partx -a`
#   5. zstd, sha256
# The cache key is every input: this script, the package list, the versions apt
# (the host's package lists) offers for those packages, mmdebstrap's version, the
# settings above. A second run with the same inputs only reinstalls the product.
# The sha256 of the product is printed at the end ("sha256  file", like build-initrd.sh).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
NAME=debian-12-amd64
SUITE=bookworm

log() { echo "build-debian-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- internal: install extlinux into partition 1 of a disk image (own mount namespace) ---
if [ "${1:-}" = --install-extlinux ]; then
  disk=$2 mnt=$3
  loop=$(losetup --show -f "$disk") || die "losetup $disk failed (no free loop device?)"
  # shellcheck disable=SC2317  # (the EXIT trap runs it)
  cleanup_loop() {
    umount "$mnt" 2>/dev/null || true
    partx -d "$loop" 2>/dev/null || true
    losetup -d "$loop" 2>/dev/null || true
  }
  trap cleanup_loop EXIT
  # (losetup -P made no partition nodes on some hosts; partx -a does)
  partx -a "$loop" || die "partx -a $loop failed"
  for _ in $(seq 50); do [ -b "${loop}p1" ] && break; sleep 0.1; done
  [ -b "${loop}p1" ] || die "no partition node ${loop}p1 after partx -a"
  mount -t ext4 "${loop}p1" "$mnt" || die "cannot mount ${loop}p1"
  extlinux --install "$mnt/boot/extlinux" >&2 || die "extlinux --install failed"
  umount "$mnt"
  exit 0
fi

[ $# -le 1 ] || die "usage: $0 [OUTDIR]"
OUTDIR=${1:-/var/lib/appliance/images/os}
CACHE=${APPLIANCE_BUILD_CACHE:-/var/cache/appliance-build}
MIRROR=${APPLIANCE_OS_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${APPLIANCE_OS_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SLIM=${APPLIANCE_OS_SLIM:-1}
IMAGE_SIZE=${APPLIANCE_OS_IMAGE_SIZE:-}
ZSTD_LEVEL=${APPLIANCE_OS_ZSTD_LEVEL:-12}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1686355200}
export SOURCE_DATE_EPOCH LC_ALL=C

[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap, mke2fs -d with owners, a loop mount for extlinux)"
case "$SLIM" in 0|1) ;; *) die "APPLIANCE_OS_SLIM must be 0 or 1, not '$SLIM'" ;; esac
case "$ZSTD_LEVEL" in [1-9]|1[0-9]) ;; *) die "APPLIANCE_OS_ZSTD_LEVEL must be 1..19, not '$ZSTD_LEVEL'" ;; esac
case "$SOURCE_DATE_EPOCH" in ''|*[!0-9]*) die "SOURCE_DATE_EPOCH must be a number of seconds" ;; esac
if [ -n "$IMAGE_SIZE" ]; then
  IMAGE_BYTES=$(numfmt --from=iec "$IMAGE_SIZE" 2>/dev/null) \
    || die "APPLIANCE_OS_IMAGE_SIZE='$IMAGE_SIZE' is not a size like 1536M or 2G"
fi

# The packages (Debian 12). cloud-init brings python3, locales, gdisk, isc-dhcp-client;
# cloud-guest-utils is growpart; ifupdown + isc-dhcp-client carry the network config
# cloud-init writes (its fallback: DHCP on the first NIC); e2fsprogs has resize2fs.
PACKAGES="systemd-sysv udev kmod linux-image-amd64 initramfs-tools zstd
cloud-init cloud-guest-utils openssh-server ifupdown isc-dhcp-client iproute2 netbase
ca-certificates sudo procps iputils-ping locales e2fsprogs fdisk systemd-timesyncd tzdata"
EXTRA=$(echo "${APPLIANCE_OS_EXTRA_PACKAGES:-}" | tr ',' ' ' | xargs -n1 2>/dev/null | sort -u | xargs)
PACKAGES=$(echo "$PACKAGES $EXTRA" | xargs)

# --- host tools -----------------------------------------------------------------------
need_pkgs=()
command -v mmdebstrap >/dev/null || need_pkgs+=(mmdebstrap)
command -v extlinux >/dev/null || need_pkgs+=(extlinux)
[ -f /usr/lib/EXTLINUX/mbr.bin ] || need_pkgs+=(extlinux)
[ -d /usr/lib/syslinux/modules/bios ] || need_pkgs+=(syslinux-common)
command -v mke2fs >/dev/null || need_pkgs+=(e2fsprogs)
command -v sfdisk >/dev/null || need_pkgs+=(fdisk)
command -v zstd >/dev/null || need_pkgs+=(zstd)
for t in losetup partx unshare numfmt; do command -v $t >/dev/null || die "missing $t (util-linux/coreutils)"; done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2 \
    || die "apt-get install ${need_pkgs[*]} failed"
fi
# mke2fs -d copies owners, modes and xattrs of a directory (1.43+)
# (whole outputs into variables: with pipefail, `cmd | head -n 1` fails when head
# closes the pipe before cmd is done)
MKE2FS_VERSION=$(mke2fs -V 2>&1 | sed -n 1p)
EXTLINUX_VERSION=$(extlinux --version 2>&1 | sed -n 1p)
case "$MKE2FS_VERSION" in
  "mke2fs 1.4"[3-9]*) ;;
  *) die "mke2fs 1.43 or newer needed for -d (have: $MKE2FS_VERSION)" ;;
esac

mkdir -p "$CACHE/os-image"
# one build at a time per cache (parallel test runs share it); a work directory left by
# an interrupted build is removed
exec 9>"$CACHE/os-image/.lock"
flock 9
rm -rf "$CACHE"/os-image/work.*

# --- the rootfs: overlay files and mmdebstrap arguments ---------------------------------

# write_overlay DIR: the configuration files the image carries (copied over the rootfs)
write_overlay() {
  local d=$1
  mkdir -p "$d/etc/cloud/cloud.cfg.d" "$d/etc/network" "$d/etc/systemd/system/ssh.service.d" \
    "$d/etc/default"
  # No datasource here: the deploy step writes /etc/cloud/cloud.cfg.d/99-appliance.cfg
  # (the appliance's NoCloud seed or EC2 metadata URL) into the written disk. Until then
  # ds-identify finds no datasource and cloud-init stays off.
  cat > "$d/etc/cloud/cloud.cfg.d/01-appliance-image.cfg" <<'EOF'
# Written by the appliance's images/build-debian-image.sh.
# Debian's locale-gen ignores its argument: C.UTF-8 needs no generating (en_US.UTF-8 is
# generated in the image too, for user-data that asks for it).
locale: C.UTF-8
# /etc/hosts gets the hostname cloud-init sets (sudo resolves it).
manage_etc_hosts: true
# No password for anyone: keys only (the user-data adds them).
ssh_pwauth: false
EOF
  cat > "$d/etc/network/interfaces" <<'EOF'
# cloud-init writes the network configuration to /etc/network/interfaces.d/
auto lo
iface lo inet loopback

source /etc/network/interfaces.d/*
EOF
  printf 'localhost\n' > "$d/etc/hostname"
  printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$d/etc/hosts"
  printf 'LANG=C.UTF-8\n' > "$d/etc/default/locale"
  # kernel upgrades keep /vmlinuz and /initrd.img (what extlinux.conf boots) current
  printf 'do_symlinks = yes\nlink_in_boot = no\n' > "$d/etc/kernel-img.conf"
  # cloud-init makes the host keys before sshd starts; without cloud-init (no datasource)
  # sshd would have none and not start. (The empty line resets the unit's list, so the
  # keys are made before its config test.)
  cat > "$d/etc/systemd/system/ssh.service.d/10-host-keys.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
EOF
}

# dpkg path excludes (also kept in the image, for later upgrades of the same packages)
dpkg_opts() {
  [ "$SLIM" = 1 ] || return 0
  local p
  for p in doc man info locale lintian linda; do
    echo "--dpkgopt=path-exclude=/usr/share/$p/*"
  done
  echo "--dpkgopt=path-include=/usr/share/doc/*/copyright"
  echo "--dpkgopt=path-include=/usr/share/locale/locale.alias"
  for p in sound media gpu/drm/amd gpu/drm/i915 gpu/drm/nouveau gpu/drm/radeon \
           net/wireless bluetooth staging iio comedi isdn; do
    echo "--dpkgopt=path-exclude=/lib/modules/*/kernel/drivers/$p/*"
  done
  for p in sound net/wireless net/mac80211 net/bluetooth; do
    echo "--dpkgopt=path-exclude=/lib/modules/*/kernel/$p/*"
  done
}

# mmdebstrap_args OVERLAY: the options (suite, target and sources follow them); the hooks
# are sh commands mmdebstrap runs with "$1" = the rootfs directory
# shellcheck disable=SC2016,SC2028
mmdebstrap_args() {
  local overlay=$1
  echo "--variant=minbase"
  echo "--include=$(echo "$PACKAGES" | tr ' ' ',')"
  echo '--aptopt=APT::Install-Recommends "false"'
  dpkg_opts
  echo "--customize-hook=sync-in $overlay /"
  # host keys: made on the machine's first boot (by cloud-init, else ssh.service)
  echo '--customize-hook=rm -f "$1"/etc/ssh/ssh_host_*_key "$1"/etc/ssh/ssh_host_*_key.pub'
  echo '--customize-hook=rm -f "$1"/etc/resolv.conf "$1"/var/lib/systemd/random-seed'
  echo '--customize-hook=sed -i "s/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/" "$1"/etc/locale.gen'
  echo '--customize-hook=chroot "$1" env -u TMPDIR locale-gen'
  # mmdebstrap's own apt setting (no recommends) is for the build, not for the machine
  echo '--customize-hook=rm -f "$1"/etc/apt/apt.conf.d/99mmdebstrap'
  # no password for anyone (root is locked: "*" from base-passwd; make sure)
  echo '--customize-hook=chroot "$1" usermod -p "*" root'
  echo '--customize-hook=chroot "$1" dpkg-query -W -f "\${Package} \${Version}\n" > "$1"/.packages'
}

sources_list() {
  echo "deb $MIRROR $SUITE main"
  echo "deb $MIRROR $SUITE-updates main"
  echo "deb $SECURITY_MIRROR $SUITE-security main"
}

# --- cache key ----------------------------------------------------------------------------
versions() {  # the candidate versions apt offers for the packages (and the kernel they pull)
  local kpkg pol
  kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
           | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ && !k {k = $2} END {print k}')
  # shellcheck disable=SC2086
  pol=$(apt-cache policy $PACKAGES $kpkg 2>/dev/null \
          | awk '/^[^ ]/ {p=$1} /Candidate:/ {print p, $2}')
  echo "$pol"
}
VERSIONS=$(versions)
if ! echo "$VERSIONS" | grep -q '^linux-image-[0-9]' || echo "$VERSIONS" | grep -q '(none)'; then
  log "apt-get update (package lists incomplete)"
  apt-get update -qq >&2 || log "warning: apt-get update failed; keying the cache on what apt knows"
  VERSIONS=$(versions)
fi
ROOTFS_KEY=$( {
  declare -f write_overlay dpkg_opts mmdebstrap_args sources_list
  echo "packages=$PACKAGES slim=$SLIM epoch=$SOURCE_DATE_EPOCH"
  sources_list
  mmdebstrap --version
  echo "$VERSIONS"
} | sha256sum | cut -c1-16)
KEY=$( {
  echo "$ROOTFS_KEY"
  sha256sum "$SELF" | cut -d' ' -f1
  echo "size=$IMAGE_SIZE zstd=$ZSTD_LEVEL"
  echo "$EXTLINUX_VERSION"
  echo "$MKE2FS_VERSION"
} | sha256sum | cut -c1-16)
ROOTFS="$CACHE/os-image/rootfs-$ROOTFS_KEY.tar"
PRODUCT="$CACHE/os-image/$KEY"

if [ "${APPLIANCE_OS_REBUILD:-0}" != 1 ] && [ -s "$PRODUCT/$NAME.raw.zst" ] \
   && [ -s "$PRODUCT/$NAME.raw.zst.sha256" ]; then
  log "up to date (cache $PRODUCT)"
else
  WORK=$(mktemp -d "$CACHE/os-image/work.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  t_start=$(date +%s)

  # 1. rootfs tarball (mmdebstrap), cached on its own key
  if [ "${APPLIANCE_OS_REBUILD:-0}" = 1 ] || [ ! -s "$ROOTFS" ]; then
    write_overlay "$WORK/overlay"
    mapfile -t args < <(mmdebstrap_args "$WORK/overlay")
    log "mmdebstrap $SUITE ($(echo "$PACKAGES" | wc -w) packages + minbase) -> $ROOTFS"
    mkdir -p "$WORK/tmp"
    # "-": the sources.list lines come from stdin
    if ! sources_list | TMPDIR="$WORK/tmp" mmdebstrap "${args[@]}" "$SUITE" \
         "$WORK/rootfs.tar" - 2> "$WORK/mmdebstrap.log"; then
      tail -n 40 "$WORK/mmdebstrap.log" >&2
      die "mmdebstrap failed (log above)"
    fi
    mv "$WORK/rootfs.tar" "$ROOTFS"
    log "rootfs: $(du -h --apparent-size "$ROOTFS" | cut -f1) in $(( $(date +%s) - t_start ))s"
  else
    log "rootfs from the cache: $ROOTFS"
  fi

  # 2. the root file system's tree
  t_image=$(date +%s)
  R="$WORK/root"
  mkdir -p "$R"
  tar -C "$R" --xattrs --xattrs-include='*' --numeric-owner --warning=no-timestamp -xpf "$ROOTFS" \
    || die "cannot unpack $ROOTFS"
  if [ ! -L "$R/vmlinuz" ] || [ ! -L "$R/initrd.img" ]; then
    die "the rootfs has no /vmlinuz and /initrd.img symlinks (linux-image-amd64 installed?)"
  fi
  KVER=$(readlink "$R/vmlinuz" | sed 's|.*/vmlinuz-||')
  [ -s "$R/boot/initrd.img-$KVER" ] || die "no /boot/initrd.img-$KVER in the rootfs"
  mv "$R/.packages" "$WORK/packages.txt"
  # fixed per build input, so the product is the same for the same inputs
  ROOT_UUID=$(echo "$KEY-root" | sha256sum | sed -E 's/^(.{8})(.{4}).(.{3}).(.{3})(.{12}).*/\1-\2-4\3-8\4-\5/')
  DISK_ID=0x$(echo "$KEY-disk" | sha256sum | cut -c1-8)
  printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$ROOT_UUID" > "$R/etc/fstab"
  mkdir -p "$R/boot/extlinux"
  APPEND="root=UUID=$ROOT_UUID ro console=tty0 console=ttyS0,115200n8"
  cat > "$R/boot/extlinux/extlinux.conf" <<EOF
# Written by the appliance's images/build-debian-image.sh. /vmlinuz and /initrd.img are
# kept current by kernel upgrades (/etc/kernel-img.conf: do_symlinks).
DEFAULT debian
PROMPT 0
TIMEOUT 10
SERIAL 0 115200
LABEL debian
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND $APPEND
LABEL debian-old
  LINUX /vmlinuz.old
  INITRD /initrd.img.old
  APPEND $APPEND
EOF
  find "$R/boot/extlinux" "$R/etc/fstab" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

  # 3. ext4 from the tree (mke2fs -d), then into a partitioned disk
  used_mib=$(du -s -B1M --apparent-size "$R" | cut -f1)
  inodes=$(find "$R" | wc -l)
  if [ -n "$IMAGE_SIZE" ]; then
    disk_bytes=$IMAGE_BYTES
  else
    # files + ~6% for ext4's metadata and journal + 256 MiB free, in 64 MiB steps
    disk_mib=$(( (used_mib * 106 / 100 + 256 + 1 + 63) / 64 * 64 ))
    disk_bytes=$(( disk_mib * 1048576 ))
  fi
  fs_bytes=$(( disk_bytes - 1048576 ))
  [ "$fs_bytes" -gt $(( used_mib * 1048576 * 105 / 100 )) ] \
    || die "APPLIANCE_OS_IMAGE_SIZE=$IMAGE_SIZE is too small for $used_mib MiB of files"
  log "root file system: $used_mib MiB in $inodes files; disk $(( disk_bytes / 1048576 )) MiB"
  # E2FSPROGS_FAKE_TIME: the superblock's times; hash_seed: directory hashes
  truncate -s "$fs_bytes" "$WORK/root.ext4"
  if ! E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mke2fs -q -F -t ext4 -L root -U "$ROOT_UUID" \
       -E "hash_seed=$ROOT_UUID,lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0" \
       -d "$R" "$WORK/root.ext4" "$(( fs_bytes / 1024 ))k" 2> "$WORK/mke2fs.log"; then
    cat "$WORK/mke2fs.log" >&2
    die "mke2fs -d failed"
  fi
  rm -rf "$R"
  DISK="$WORK/$NAME.raw"
  truncate -s "$disk_bytes" "$DISK"
  printf 'label: dos\nlabel-id: %s\nunit: sectors\nstart=2048, type=83, bootable\n' "$DISK_ID" \
    | sfdisk -q "$DISK" || die "sfdisk failed"
  dd if="$WORK/root.ext4" of="$DISK" bs=1M seek=1 conv=notrunc,sparse status=none \
    || die "cannot copy the file system into the disk"
  rm -f "$WORK/root.ext4"
  dd if=/usr/lib/EXTLINUX/mbr.bin of="$DISK" bs=440 count=1 conv=notrunc status=none \
    || die "cannot write extlinux's MBR"

  # 4. extlinux: its boot sector and ldlinux.sys/.c32 (needs the file system mounted)
  mkdir -p "$WORK/mnt"
  unshare --mount --propagation private bash "$SELF" --install-extlinux "$DISK" "$WORK/mnt" \
    || die "installing extlinux failed"
  # the mount must have left a clean file system
  e2fsck -fn "$DISK?offset=1048576" > "$WORK/fsck.log" 2>&1 || {
    # older e2fsprogs take no ?offset: check a copy of the partition instead
    dd if="$DISK" of="$WORK/check.ext4" bs=1M skip=1 conv=sparse status=none
    e2fsck -fn "$WORK/check.ext4" > "$WORK/fsck.log" 2>&1 || { cat "$WORK/fsck.log" >&2; die "e2fsck found errors"; }
    rm -f "$WORK/check.ext4"
  }
  raw_sha=$(sha256sum "$DISK" | cut -d' ' -f1)
  log "disk image in $(( $(date +%s) - t_image ))s"

  # 5. zstd
  t_zstd=$(date +%s)
  mkdir -p "$WORK/out"
  zstd -q -T0 "-$ZSTD_LEVEL" "$DISK" -o "$WORK/out/$NAME.raw.zst" || die "zstd failed"
  (cd "$WORK/out" && sha256sum "$NAME.raw.zst" > "$NAME.raw.zst.sha256")
  log "zstd -$ZSTD_LEVEL in $(( $(date +%s) - t_zstd ))s"
  {
    printf 'name=%s\nsuite=%s\nkernel_release=%s\nroot_uuid=%s\n' "$NAME" "$SUITE" "$KVER" "$ROOT_UUID"
    printf 'raw_bytes=%s\nraw_sha256=%s\nfiles_mib=%s\n' "$disk_bytes" "$raw_sha" "$used_mib"
    printf 'zst_bytes=%s\nsource_date_epoch=%s\nslim=%s\nbuilt_seconds=%s\n' \
      "$(stat -c %s "$WORK/out/$NAME.raw.zst")" "$SOURCE_DATE_EPOCH" "$SLIM" "$(( $(date +%s) - t_start ))"
    sources_list | sed 's/^/source=/'
    sed 's/^/package=/' "$WORK/packages.txt"
  } > "$WORK/out/$NAME.buildinfo"
  rm -rf "$PRODUCT"
  mv "$WORK/out" "$PRODUCT"
  log "built $PRODUCT in $(( $(date +%s) - t_start ))s"
fi

# --- prune: the 2 newest products and rootfs tarballs -----------------------------------
touch -c "$PRODUCT" "$ROOTFS"
find "$CACHE/os-image" -mindepth 1 -maxdepth 1 -type d ! -name 'work.*' -printf '%T@ %p\n' \
  | sort -rn | tail -n +3 | cut -d' ' -f2- | while read -r old; do rm -rf "$old"; done
find "$CACHE/os-image" -mindepth 1 -maxdepth 1 -name 'rootfs-*.tar' -printf '%T@ %p\n' \
  | sort -rn | tail -n +3 | cut -d' ' -f2- | while read -r old; do rm -f "$old"; done

# --- install into OUTDIR (only files that differ) -----------------------------------------
mkdir -p "$OUTDIR"
for f in "$NAME.raw.zst" "$NAME.raw.zst.sha256" "$NAME.buildinfo"; do
  if ! cmp -s "$PRODUCT/$f" "$OUTDIR/$f"; then
    install -m 0644 "$PRODUCT/$f" "$OUTDIR/$f.tmp"
    mv -f "$OUTDIR/$f.tmp" "$OUTDIR/$f"
  fi
done
log "installed into $OUTDIR: $NAME.raw.zst ($(du -h --apparent-size "$OUTDIR/$NAME.raw.zst" | cut -f1); raw $(( $(sed -n 's/^raw_bytes=//p' "$PRODUCT/$NAME.buildinfo") / 1048576 )) MiB, kernel $(sed -n 's/^kernel_release=//p' "$PRODUCT/$NAME.buildinfo"))"
cat "$OUTDIR/$NAME.raw.zst.sha256"
