#!/bin/bash
# Build the appliance's own boot image: a Debian kernel (vmlinuz) and a small busybox
# initramfs (initrd.img). One image does both jobs, chosen by the kernel command line:
#   discovery (default)      DHCP on the boot NIC, check in with the appliance, power off
#   appliance.mode=deploy    DHCP, fetch the deploy orders, stream an OS image onto the
#                            disk (sha256-checked), report, reboot (bootenv image-deploy)
# What /init does is in images/initrd/init; images/README.md describes both modes.
#
# Usage: images/build-initrd.sh [OUTDIR...]
#   OUTDIR                 where vmlinuz + initrd.img are installed, one or more
#                          (default: /var/lib/appliance/images/discovery and
#                          /var/lib/appliance/images/deploy, the paths the bootenvs use)
#   APPLIANCE_BUILD_CACHE  downloaded .deb files and build products
#                          (default /var/cache/appliance-build); never the repository
#   APPLIANCE_KERNEL_PKG   kernel package to use (default: the one linux-image-amd64
#                          depends on, i.e. the current Debian 12 kernel)
#   APPLIANCE_DISCOVERY_MODULES  NIC drivers to put in the initrd, loaded in both modes
#                          (default: virtio_pci virtio_net e1000 e1000e)
#   APPLIANCE_DISK_MODULES disk drivers, loaded in deploy mode only
#                          (default: virtio_blk virtio_scsi sd_mod ahci nvme)
#   APPLIANCE_FS_MODULES   file systems, loaded in deploy mode only: the deploy step
#                          mounts the written OS's root to write its cloud-init
#                          datasource config (default: crc32c_generic ext4 xfs;
#                          crc32c_generic is what ext4's and xfs's checksums ask for)
#                          Dependencies of the lists are added from modules.dep; a
#                          module the kernel has built in is skipped.
#   SOURCE_DATE_EPOCH      timestamp of every file in the initrd (default 0), so the
#                          same inputs give a byte-identical initrd.img
#
# Everything comes from Debian packages through apt, nothing else is downloaded:
#   - linux-image-<version>-amd64, busybox-static and zstd (busybox has no zstd) with the
#     libraries zstd needs (its Depends: libc6, zlib1g, liblzma5, liblz4-1, ...) are
#     fetched with `apt-get download` and unpacked with dpkg-deb into the cache; nothing
#     is installed on the host (no kernel lands in /boot, and busybox-static is not
#     installed because it conflicts with the `busybox` package the host may need).
#   - host tools, installed with apt-get when missing (needs root):
#     cpio, kmod (depmod), gzip; apt and dpkg are part of every Debian system.
# A rebuild happens only when an input changes (a package version, the module lists,
# this script or a file under images/initrd/); otherwise the cached products are
# installed again. The sha256 of the files is printed at the end ("sha256  file" lines,
# relative to the first OUTDIR).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ $# -gt 0 ]; then
  OUTDIRS=("$@")
else
  OUTDIRS=(/var/lib/appliance/images/discovery /var/lib/appliance/images/deploy)
fi
CACHE=${APPLIANCE_BUILD_CACHE:-/var/cache/appliance-build}
NET_MODULES=${APPLIANCE_DISCOVERY_MODULES:-virtio_pci virtio_net e1000 e1000e}
DISK_MODULES=${APPLIANCE_DISK_MODULES:-virtio_blk virtio_scsi sd_mod ahci nvme}
FS_MODULES=${APPLIANCE_FS_MODULES:-crc32c_generic ext4 xfs}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
INITRD_FILES=("$HERE/initrd/init" "$HERE/initrd/udhcpc.script")
export SOURCE_DATE_EPOCH LC_ALL=C

log() { echo "build-initrd: $*" >&2; }
die() { log "error: $*"; exit 1; }

for f in "${INITRD_FILES[@]}"; do [ -f "$f" ] || die "missing $f"; done

# --- host tools -----------------------------------------------------------------------
need_pkgs=()
command -v cpio >/dev/null || need_pkgs+=(cpio)
command -v depmod >/dev/null || [ -x /sbin/depmod ] || need_pkgs+=(kmod)
command -v gzip >/dev/null || need_pkgs+=(gzip)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${need_pkgs[*]}; install them (apt-get install ${need_pkgs[*]})"
  log "installing ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi
DEPMOD=$(command -v depmod || echo /sbin/depmod)

mkdir -p "$CACHE/debs" "$CACHE/initrd"
# one build at a time per cache (parallel test runs share it)
exec 9>"$CACHE/.lock"
flock 9

# --- packages -------------------------------------------------------------------------
APT_UPDATED=0
apt_update_once() {
  if [ "$APT_UPDATED" = 0 ] && [ "$(id -u)" = 0 ]; then
    log "apt-get update"
    apt-get update -qq >&2 || true
    APT_UPDATED=1
  fi
}

candidate_version() {  # the version apt would fetch for $1, empty when unknown
  apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}' | sed 's/(none)//'
}

# fetch_deb PKG -> prints the path of the cached .deb of PKG's candidate version
fetch_deb() {
  local pkg=$1 dir="$CACHE/debs/$1" ver f
  mkdir -p "$dir"
  ver=$(candidate_version "$pkg")
  if [ -z "$ver" ]; then apt_update_once; ver=$(candidate_version "$pkg"); fi
  if [ -z "$ver" ]; then
    # offline, or no package lists: fall back to what the cache already holds
    f=$(find "$dir" -maxdepth 1 -name '*.deb' | sort | tail -n 1)
    [ -n "$f" ] || die "apt knows no candidate for $pkg and nothing is cached"
    log "warning: apt knows no candidate for $pkg, using cached $(basename "$f")"
    echo "$f"; return
  fi
  for f in "$dir"/*.deb; do
    [ -e "$f" ] || continue
    if [ "$(dpkg-deb -f "$f" Version)" = "$ver" ]; then echo "$f"; return; fi
  done
  log "apt-get download $pkg=$ver"
  # -o APT::Sandbox::User=root: the cache dir is root's, the _apt user can't write it
  if ! (cd "$dir" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2); then
    # stale package lists name a version the mirror no longer has: refresh, try again
    [ "$APT_UPDATED" = 0 ] || die "apt-get download $pkg=$ver failed"
    apt_update_once
    fetch_deb "$pkg"; return
  fi
  for f in "$dir"/*.deb; do
    if [ "$(dpkg-deb -f "$f" Version)" = "$ver" ]; then echo "$f"; return; fi
  done
  die "downloaded $pkg but found no .deb of version $ver in $dir"
}

KPKG=${APPLIANCE_KERNEL_PKG:-}
if [ -z "$KPKG" ]; then
  resolve_kpkg() {
    apt-cache depends linux-image-amd64 2>/dev/null \
      | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}'
  }
  KPKG=$(resolve_kpkg)
  if [ -z "$KPKG" ]; then apt_update_once; KPKG=$(resolve_kpkg); fi
  if [ -z "$KPKG" ]; then
    # offline: the newest kernel package already in the cache
    KPKG=$(find "$CACHE/debs" -mindepth 1 -maxdepth 1 -type d -name 'linux-image-*' \
             -printf '%f\n' | sort -V | tail -n 1)
  fi
  [ -n "$KPKG" ] || die "cannot tell which linux-image package linux-image-amd64 depends on"
fi
KDEB=$(fetch_deb "$KPKG")
BDEB=$(fetch_deb busybox-static)
ZDEB=$(fetch_deb zstd)
# zstd's run-time libraries: the packages of its Depends (first of any alternatives)
LIB_PKGS=$(dpkg-deb -f "$ZDEB" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/:any//' \
             | awk 'NF {print $1}' | sort -u)
LIB_DEBS=()
for p in $LIB_PKGS; do LIB_DEBS+=("$(fetch_deb "$p")"); done
ALL_DEBS=("$KDEB" "$BDEB" "$ZDEB" "${LIB_DEBS[@]}")
log "kernel:  $(basename "$KDEB")"
log "busybox: $(basename "$BDEB")"
log "zstd:    $(basename "$ZDEB") + $(echo "$LIB_PKGS" | tr '\n' ' ')"

# --- cache key: every input that changes the products ----------------------------------
KEY=$( {
  sha256sum "${ALL_DEBS[@]}" | awk '{print $1}'
  sha256sum "${BASH_SOURCE[0]}" "${INITRD_FILES[@]}" | awk '{print $1}'
  echo "net=$NET_MODULES disk=$DISK_MODULES fs=$FS_MODULES epoch=$SOURCE_DATE_EPOCH"
} | sha256sum | cut -c1-16)
PRODUCT="$CACHE/initrd/$KEY"

if [ -s "$PRODUCT/vmlinuz" ] && [ -s "$PRODUCT/initrd.img" ]; then
  log "up to date (cache $PRODUCT)"
else
  WORK=$(mktemp -d "$CACHE/work.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  log "building in $WORK"

  # kernel + modules, unpacked without installing anything
  mkdir -p "$WORK/kernel"
  dpkg-deb -x "$KDEB" "$WORK/kernel"
  KVER=$(find "$WORK/kernel/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | head -n 1)
  [ -n "$KVER" ] || die "no lib/modules/<version> in $KDEB"
  [ -f "$WORK/kernel/boot/vmlinuz-$KVER" ] || die "no boot/vmlinuz-$KVER in $KDEB"
  # Debian's package leaves modules.dep to its postinst; make it here in the unpacked tree
  "$DEPMOD" -b "$WORK/kernel" "$KVER"
  MODDIR="$WORK/kernel/lib/modules/$KVER"

  # load order: each module after its dependencies (depth first over modules.dep);
  # "net PATH" lines first, then "disk PATH" for what the NIC drivers did not pull in,
  # then "fs PATH"
  ORDER=$(awk -v net="$NET_MODULES" -v disk="$DISK_MODULES" -v fs="$FS_MODULES" '
    function base(p,  b) { b = p; sub(/.*\//, "", b); sub(/\.ko(\.[a-z]+)?$/, "", b); gsub(/-/, "_", b); return b }
    function visit(m, group,  n, i, d) {
      if (m in done) return
      done[m] = 1
      if (m in builtin) return
      if (!(m in path)) { missing = missing " " m; return }
      n = split(deps[m], d, " ")
      for (i = n; i >= 1; i--) visit(base(d[i]), group)
      print group, path[m]
    }
    FILENAME ~ /modules\.builtin$/ { builtin[base($1)] = 1; next }
    {
      p = $1; sub(/:$/, "", p); m = base(p); path[m] = p
      $1 = ""; deps[m] = $0
    }
    END {
      n = split(net, w, " ")
      for (i = 1; i <= n; i++) { x = w[i]; gsub(/-/, "_", x); visit(x, "net") }
      n = split(disk, w, " ")
      for (i = 1; i <= n; i++) { x = w[i]; gsub(/-/, "_", x); visit(x, "disk") }
      n = split(fs, w, " ")
      for (i = 1; i <= n; i++) { x = w[i]; gsub(/-/, "_", x); visit(x, "fs") }
      if (missing != "") { print "MISSING" missing > "/dev/stderr"; exit 1 }
    }' "$MODDIR/modules.builtin" "$MODDIR/modules.dep") || die "module(s) not found in $KPKG"

  # initramfs tree
  R="$WORK/root"
  mkdir -p "$R"/{bin,sbin,dev,proc,sys,run,tmp,etc/udhcpc,lib/modules,lib64,lib/x86_64-linux-gnu}
  dpkg-deb -x "$BDEB" "$WORK/busybox"
  install -m 0755 "$WORK/busybox/bin/busybox" "$R/bin/busybox"
  : > "$R/etc/modules.net"
  : > "$R/etc/modules.disk"
  : > "$R/etc/modules.fs"
  while read -r group p; do
    f=$(basename "$p")
    case "$f" in
      *.ko) cp "$MODDIR/$p" "$R/lib/modules/$f" ;;
      *.ko.xz) xz -dc "$MODDIR/$p" > "$R/lib/modules/${f%.xz}" ;;
      *.ko.zst) zstd -qdc "$MODDIR/$p" > "$R/lib/modules/${f%.zst}" ;;
      *.ko.gz) gzip -dc "$MODDIR/$p" > "$R/lib/modules/${f%.gz}" ;;
      *) die "unexpected module file $p" ;;
    esac
    f=${f%.xz}; f=${f%.zst}; f=${f%.gz}
    echo "$f" >> "$R/etc/modules.$group"
  done <<< "$ORDER"
  echo "$KVER" > "$R/etc/kernel-release"
  log "NIC modules (load order): $(tr '\n' ' ' < "$R/etc/modules.net")"
  log "disk modules (load order): $(tr '\n' ' ' < "$R/etc/modules.disk")"
  log "file system modules (load order): $(tr '\n' ' ' < "$R/etc/modules.fs")"

  # zstd and the shared libraries it needs, resolved by the unpacked packages' own
  # dynamic loader (ld.so --list), so the host's libraries never end up in the initrd
  mkdir -p "$WORK/zstd"
  for deb in "$ZDEB" "${LIB_DEBS[@]}"; do dpkg-deb -x "$deb" "$WORK/zstd"; done
  LDSO=$(find "$WORK/zstd" -name 'ld-linux-x86-64.so.2' -type f | head -n 1)
  [ -n "$LDSO" ] || die "no ld-linux-x86-64.so.2 in $(echo "$LIB_PKGS" | tr '\n' ' ')"
  LIBPATH="$WORK/zstd/lib/x86_64-linux-gnu:$WORK/zstd/usr/lib/x86_64-linux-gnu"
  install -m 0755 "$WORK/zstd/usr/bin/zstd" "$R/bin/zstd"
  NEEDED=$("$LDSO" --library-path "$LIBPATH" --list "$WORK/zstd/usr/bin/zstd" \
             | awk '$1 !~ /^\// && $2 == "=>" && $3 ~ /^\// {print $1, $3}')
  [ -n "$NEEDED" ] || die "ld.so --list found no libraries for zstd"
  while read -r soname path; do
    case "$path" in "$WORK/zstd/"*) ;; *) die "zstd needs $soname, not in its Depends ($path)" ;; esac
    cp -L "$path" "$R/lib/x86_64-linux-gnu/$soname"
  done <<< "$NEEDED"
  cp -L "$LDSO" "$R/lib64/ld-linux-x86-64.so.2"
  log "zstd libraries: $(awk '{printf "%s ", $1}' <<< "$NEEDED")"

  install -m 0755 "$HERE/initrd/udhcpc.script" "$R/etc/udhcpc/default.script"
  install -m 0755 "$HERE/initrd/init" "$R/init"

  # reproducible archive: fixed mtimes and owners, sorted names, no gzip timestamp
  find "$R" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  mkdir -p "$WORK/out"
  (cd "$R" && find . -mindepth 1 | sort | cpio -o -H newc --quiet --reproducible -R 0:0) \
    | gzip -9 -n > "$WORK/out/initrd.img"
  cp "$WORK/kernel/boot/vmlinuz-$KVER" "$WORK/out/vmlinuz"
  {
    printf 'kernel_package=%s\nkernel_release=%s\n' "$KPKG" "$KVER"
    for deb in "${ALL_DEBS[@]}"; do printf 'deb=%s\n' "$(basename "$deb")"; done
    printf 'net_modules=%s\ndisk_modules=%s\nfs_modules=%s\n' "$NET_MODULES" "$DISK_MODULES" "$FS_MODULES"
  } > "$WORK/out/BUILDINFO"
  rm -rf "$PRODUCT"
  mv "$WORK/out" "$PRODUCT"
  log "built $PRODUCT"
fi

# --- prune: the 3 newest products, and only the .deb versions in use -------------------
touch "$PRODUCT"
find "$CACHE/initrd" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn \
  | tail -n +4 | cut -d' ' -f2- | while read -r old; do rm -rf "$old"; done
for deb in "${ALL_DEBS[@]}"; do
  find "$(dirname "$deb")" -maxdepth 1 -name '*.deb' ! -path "$deb" -delete
done

# --- install into each OUTDIR (only files that differ) ---------------------------------
for out in "${OUTDIRS[@]}"; do
  mkdir -p "$out"
  for f in vmlinuz initrd.img; do
    if ! cmp -s "$PRODUCT/$f" "$out/$f"; then
      install -m 0644 "$PRODUCT/$f" "$out/$f.tmp"
      mv -f "$out/$f.tmp" "$out/$f"
    fi
  done
  log "installed into $out ($(sed -n 's/^kernel_release=//p' "$PRODUCT/BUILDINFO"))"
done
(cd "${OUTDIRS[0]}" && sha256sum vmlinuz initrd.img)
