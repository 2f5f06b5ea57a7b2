#!/bin/bash
# Build the appliance's discovery image: a Debian kernel (vmlinuz) and a small busybox
# initramfs (initrd.img) that brings up the NIC the machine PXE-booted from, gets an
# address by DHCP, checks in with the appliance and powers the machine off.
#
# Usage: images/build-discovery.sh [OUTDIR]
#   OUTDIR                 where vmlinuz + initrd.img are installed
#                          (default /var/lib/appliance/images/discovery)
#   APPLIANCE_BUILD_CACHE  downloaded .deb files and build products
#                          (default /var/cache/appliance-build); never the repository
#   APPLIANCE_KERNEL_PKG   kernel package to use (default: the one linux-image-amd64
#                          depends on, i.e. the current Debian 12 kernel)
#   APPLIANCE_DISCOVERY_MODULES  kernel modules to put in the initrd, their
#                          dependencies are added from modules.dep
#                          (default: virtio_pci virtio_net e1000 e1000e)
#   SOURCE_DATE_EPOCH      timestamp of every file in the initrd (default 0), so the
#                          same inputs give a byte-identical initrd.img
#
# Everything comes from Debian packages through apt, nothing else is downloaded:
#   - linux-image-<version>-amd64 and busybox-static are fetched with
#     `apt-get download` and unpacked with dpkg-deb into the cache; nothing is
#     installed on the host (no kernel lands in /boot, and busybox-static is not
#     installed because it conflicts with the `busybox` package the host may need).
#   - host tools, installed with apt-get when missing (needs root):
#     cpio, kmod (depmod), gzip; apt and dpkg are part of every Debian system.
# A rebuild happens only when an input changes (kernel or busybox package version,
# module list, this script); otherwise the cached products are installed again.
# The sha256 of both files is printed at the end (lines "sha256  file").
set -euo pipefail

OUTDIR=${1:-/var/lib/appliance/images/discovery}
CACHE=${APPLIANCE_BUILD_CACHE:-/var/cache/appliance-build}
MODULES=${APPLIANCE_DISCOVERY_MODULES:-virtio_pci virtio_net e1000 e1000e}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
export SOURCE_DATE_EPOCH LC_ALL=C

log() { echo "build-discovery: $*" >&2; }
die() { log "error: $*"; exit 1; }

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

mkdir -p "$CACHE/debs" "$CACHE/discovery"
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
log "kernel:  $(basename "$KDEB")"
log "busybox: $(basename "$BDEB")"

# --- cache key: every input that changes the products ----------------------------------
KEY=$( {
  sha256sum "$KDEB" "$BDEB" | awk '{print $1}'
  sha256sum "${BASH_SOURCE[0]}" | awk '{print $1}'
  echo "modules=$MODULES epoch=$SOURCE_DATE_EPOCH"
} | sha256sum | cut -c1-16)
PRODUCT="$CACHE/discovery/$KEY"

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

  # load order: each module after its dependencies (depth first over modules.dep)
  ORDER=$(awk -v want="$MODULES" '
    function base(p,  b) { b = p; sub(/.*\//, "", b); sub(/\.ko(\.[a-z]+)?$/, "", b); gsub(/-/, "_", b); return b }
    function visit(m,  n, i, d) {
      if (m in done) return
      done[m] = 1
      if (!(m in path)) { missing = missing " " m; return }
      n = split(deps[m], d, " ")
      for (i = n; i >= 1; i--) visit(base(d[i]))
      print path[m]
    }
    {
      p = $1; sub(/:$/, "", p); m = base(p); path[m] = p
      $1 = ""; deps[m] = $0
    }
    END {
      n = split(want, w, " ")
      for (i = 1; i <= n; i++) { x = w[i]; gsub(/-/, "_", x); visit(x) }
      if (missing != "") { print "MISSING" missing > "/dev/stderr"; exit 1 }
    }' "$MODDIR/modules.dep") || die "module(s) not found in $KPKG"

  # initramfs tree
  R="$WORK/root"
  mkdir -p "$R"/{bin,sbin,dev,proc,sys,run,tmp,etc/udhcpc,lib/modules}
  dpkg-deb -x "$BDEB" "$WORK/busybox"
  install -m 0755 "$WORK/busybox/bin/busybox" "$R/bin/busybox"
  : > "$R/etc/modules.load"
  for p in $ORDER; do
    f=$(basename "$p")
    case "$f" in
      *.ko) cp "$MODDIR/$p" "$R/lib/modules/$f" ;;
      *.ko.xz) xz -dc "$MODDIR/$p" > "$R/lib/modules/${f%.xz}" ;;
      *.ko.zst) zstd -qdc "$MODDIR/$p" > "$R/lib/modules/${f%.zst}" ;;
      *.ko.gz) gzip -dc "$MODDIR/$p" > "$R/lib/modules/${f%.gz}" ;;
      *) die "unexpected module file $p" ;;
    esac
    f=${f%.xz}; f=${f%.zst}; f=${f%.gz}
    echo "$f" >> "$R/etc/modules.load"
  done
  echo "$KVER" > "$R/etc/kernel-release"
  log "modules (load order): $(tr '\n' ' ' < "$R/etc/modules.load")"

  cat > "$R/etc/udhcpc/default.script" <<'EOF'
#!/bin/sh
# busybox udhcpc hook: configure the leased address, route and resolver
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
    if [ -n "$router" ]; then
      ip route replace default via "${router%% *}" dev "$interface"
    fi
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    echo "appliance-discovery: dhcp $1 $interface $ip/${mask:-24} router=${router:-none} server=${serverid:-?}"
    ;;
  leasefail|nak)
    echo "appliance-discovery: dhcp $1 on $interface"
    ;;
esac
exit 0
EOF
  chmod 0755 "$R/etc/udhcpc/default.script"

  cat > "$R/init" <<'EOF'
#!/bin/busybox sh
# appliance discovery initrd: DHCP on the boot NIC, check in, power off.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1
uptime_s() { cut -d' ' -f1 /proc/uptime; }
say() { echo "appliance-discovery: $*"; }
finish() { sync; say "powering off (uptime $(uptime_s)s)"; poweroff -f; sleep 60; }
trap finish EXIT

say "start, kernel $(uname -r), uptime $(uptime_s)s"
while read -r m; do
  insmod "/lib/modules/$m" 2>/dev/null || say "insmod $m failed"
done < /etc/modules.load

URL="" MAC=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    appliance.url=*) URL=${arg#appliance.url=} ;;
    appliance.mac=*) MAC=${arg#appliance.mac=} ;;
  esac
done
MAC=$(echo "$MAC" | tr 'A-F-' 'a-f:')
URL=${URL%/}
[ -n "$URL" ] || { say "no appliance.url= on the kernel command line"; echo "APPLIANCE-CHECKIN-FAILED ${MAC:-unknown} no-url"; exit 1; }
ip link set lo up

# the interface the machine booted from: the one with appliance.mac (wait for drivers)
IF=""
i=0
while [ $i -lt 40 ]; do
  for d in /sys/class/net/*; do
    n=${d##*/}
    [ "$n" = lo ] && continue
    a=$(cat "$d/address" 2>/dev/null)
    if [ -n "$MAC" ]; then
      [ "$a" = "$MAC" ] && IF=$n && break
    else
      IF=$n; MAC=$a; break
    fi
  done
  [ -n "$IF" ] && break
  i=$((i + 1)); sleep 0.25
done
if [ -z "$IF" ]; then
  say "no interface with MAC ${MAC:-?}; have: $(ls /sys/class/net | tr '\n' ' ')"
  echo "APPLIANCE-CHECKIN-FAILED ${MAC:-unknown} no-interface"
  exit 1
fi
say "interface $IF mac $MAC"
ip link set "$IF" up

ok=""
n=1
while [ $n -le 5 ]; do
  if udhcpc -i "$IF" -f -q -n -t 5 -T 2 -s /etc/udhcpc/default.script; then ok=1; break; fi
  say "dhcp attempt $n failed"; n=$((n + 1)); sleep 1
done
if [ -z "$ok" ]; then echo "APPLIANCE-CHECKIN-FAILED $MAC no-dhcp-lease"; exit 1; fi

CHECKIN="$URL/boot/$MAC/checkin?stage=discovery"
n=1
while [ $n -le 6 ]; do
  say "GET $CHECKIN (attempt $n)"
  # (no wget -T: busybox-static 1.35's wget segfaults with it; timeout(1) instead)
  if timeout 15 wget -q -O /tmp/checkin.out "$CHECKIN"; then
    echo "APPLIANCE-CHECKIN-OK $MAC uptime $(uptime_s)s"
    exit 0
  fi
  n=$((n + 1)); sleep 2
done
echo "APPLIANCE-CHECKIN-FAILED $MAC http"
exit 1
EOF
  chmod 0755 "$R/init"

  # reproducible archive: fixed mtimes and owners, sorted names, no gzip timestamp
  find "$R" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  mkdir -p "$WORK/out"
  (cd "$R" && find . -mindepth 1 | sort | cpio -o -H newc --quiet --reproducible -R 0:0) \
    | gzip -9 -n > "$WORK/out/initrd.img"
  cp "$WORK/kernel/boot/vmlinuz-$KVER" "$WORK/out/vmlinuz"
  printf 'kernel_package=%s\nkernel_deb=%s\nbusybox_deb=%s\nkernel_release=%s\nmodules=%s\n' \
    "$KPKG" "$(basename "$KDEB")" "$(basename "$BDEB")" "$KVER" "$MODULES" > "$WORK/out/BUILDINFO"
  rm -rf "$PRODUCT"
  mv "$WORK/out" "$PRODUCT"
  log "built $PRODUCT"
fi

# --- prune: the 3 newest products, and only the .deb versions in use -------------------
touch "$PRODUCT"
find "$CACHE/discovery" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn \
  | tail -n +4 | cut -d' ' -f2- | while read -r old; do rm -rf "$old"; done
for deb in "$KDEB" "$BDEB"; do
  find "$(dirname "$deb")" -maxdepth 1 -name '*.deb' ! -path "$deb" -delete
done

# --- install into OUTDIR (only files that differ) --------------------------------------
mkdir -p "$OUTDIR"
for f in vmlinuz initrd.img; do
  if ! cmp -s "$PRODUCT/$f" "$OUTDIR/$f"; then
    install -m 0644 "$PRODUCT/$f" "$OUTDIR/$f.tmp"
    mv -f "$OUTDIR/$f.tmp" "$OUTDIR/$f"
  fi
done
log "installed into $OUTDIR ($(sed -n 's/^kernel_release=//p' "$PRODUCT/BUILDINFO"))"
(cd "$OUTDIR" && sha256sum vmlinuz initrd.img)
