#!/usr/bin/env bash
# Prepares the Linux guest that ftvm's tests boot: Debian's stock cloud kernel (downloaded and
# unpacked here, never committed) and a small busybox initramfs that loads the virtio-mmio
# drivers, reports what the guest sees and powers off.
#
# Outputs, in target/linux-guest/ (git-ignored):
#   bzImage            the kernel as Debian ships it (/boot/vmlinuz-*)
#   vmlinux            the uncompressed x86-64 ELF kernel, taken out of the bzImage's payload
#   initramfs.cpio.gz  newc cpio, gzip: busybox-static, the virtio modules, /init
#   VERSION            key=value lines: Debian package and version, kernel release, modules
#
# Usage: scripts/linux-guest.sh [--force]
#   A rerun with every output present does nothing; --force rebuilds from a fresh download.
# Network: only apt (Debian's package registry). Installs the Debian packages it needs with
# apt-get, and only those that are missing (that needs root).
#
# The guest's /init, in order: mounts proc, sysfs and devtmpfs (tmpfs if that fails); prints
# FTVM-LINUX-INIT; insmods the modules in dependency order (a failure prints
# "ftvm-insmod-failed: <module>"); prints "cpus-online: <cpu list>", one "diskstats: <line>"
# per line of /proc/diskstats, one "net: <if> rx_bytes=… rx_packets=… tx_bytes=… tx_packets=…"
# per interface in /sys/class/net; prints FTVM-LINUX-DONE; then `poweroff -f`. It reads
# nothing from the kernel command line.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

out=target/linux-guest
meta=linux-image-cloud-amd64
# The drivers a guest needs for ftvm's devices (virtio-mmio found through ACPI, LNRO0005);
# their dependencies come from modules.dep.
want_modules=(virtio_mmio virtio_blk virtio_net)
outputs=(vmlinux bzImage initramfs.cpio.gz VERSION)

log() { echo "linux-guest: $*"; }
die() { echo "linux-guest: error: $*" >&2; exit 1; }
trap 'echo "linux-guest: error: command failed (line $LINENO): $BASH_COMMAND" >&2' ERR

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) die "unknown argument '$arg' (usage: $0 [--force])" ;;
  esac
done

summary() {
  log "kernel $(sed -n 's/^release=//p' "$out/VERSION") (Debian package $(sed -n 's/^package=//p' "$out/VERSION") $(sed -n 's/^version=//p' "$out/VERSION"))"
  local f
  for f in "${outputs[@]}"; do
    printf 'linux-guest:   %-52s %10s bytes\n' "$(realpath "$out/$f")" "$(stat -c %s "$out/$f")"
  done
}

all_present() {
  local f
  for f in "${outputs[@]}"; do [ -s "$out/$f" ] || return 1; done
}

if [ "$force" = 0 ] && all_present; then
  log "already prepared (use --force to rebuild):"
  summary
  exit 0
fi

mkdir -p "$out"
# One build at a time (tests may run this script in parallel).
exec 9>"$out/.lock"
flock 9
if [ "$force" = 0 ] && all_present; then
  log "prepared by another run meanwhile:"
  summary
  exit 0
fi

# --- Debian packages ---------------------------------------------------------------------
apt_updated=0
apt_update() {
  if [ "$apt_updated" = 0 ]; then
    [ "$(id -u)" = 0 ] || die "apt-get update needs root (run this script as root)"
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed (is Debian's package registry reachable?)"
    apt_updated=1
  fi
}

# need_pkgs PKG...: installs those of PKG that are not installed.
need_pkgs() {
  local p missing=()
  for p in "$@"; do
    if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]; then
      missing+=("$p")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then return 0; fi
  [ "$(id -u)" = 0 ] || die "missing Debian packages ${missing[*]}: install them or run this script as root"
  log "installing ${missing[*]}"
  for p in "${missing[@]}"; do
    apt-cache show --no-all-versions "$p" >/dev/null 2>&1 || { apt_update; break; }
  done
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# busybox-static: the guest's only program; cpio: the archive; kmod: depmod, which writes the
# modules.dep that Debian's package leaves to its postinst; binutils: readelf; file: a check.
need_pkgs busybox-static cpio kmod binutils file gzip
command -v depmod >/dev/null || PATH="$PATH:/sbin:/usr/sbin"

# --- the kernel package ------------------------------------------------------------------
apt-cache show --no-all-versions "$meta" >/dev/null 2>&1 || apt_update
apt-cache show --no-all-versions "$meta" >/dev/null 2>&1 \
  || die "apt knows no package $meta, even after apt-get update (check /etc/apt/sources.list*)"
meta_version=$(apt-cache show --no-all-versions "$meta" | sed -n 's/^Version: //p' | head -n1)
pkg=$(apt-cache show --no-all-versions "$meta" | sed -n 's/^Depends: //p' | head -n1 \
  | grep -o 'linux-image-[0-9][^ ,()|]*-cloud-amd64' | head -n1) || true
[ -n "$pkg" ] || die "could not find the linux-image-<version>-cloud-amd64 package that $meta $meta_version depends on"
version=$(apt-cache show --no-all-versions "$pkg" | sed -n 's/^Version: //p' | head -n1)
[ -n "$version" ] || die "apt knows no version of $pkg"
log "$meta $meta_version -> $pkg $version"

build="$out/.build"
rm -rf "$build"
mkdir -p "$build/deb"
(
  cd "$build/deb"
  sandbox=()
  if [ "$(id -u)" = 0 ]; then sandbox=(-o APT::Sandbox::User=root); fi
  apt-get download -qq "${sandbox[@]}" "$pkg=$version"
) || die "apt-get download $pkg=$version failed"
debs=("$build"/deb/"${pkg}"_*.deb)
deb=${debs[0]}
[ -f "$deb" ] || die "apt-get download left no ${pkg}_*.deb"
log "unpacking $(basename "$deb")"
root="$build/root"
dpkg -x "$deb" "$root"

vmlinuzs=("$root"/boot/vmlinuz-*)
vmlinuz=${vmlinuzs[0]}
[ -f "$vmlinuz" ] || die "$pkg has no /boot/vmlinuz-*"
release=${vmlinuz##*/vmlinuz-}
moddir="$root/lib/modules/$release"
[ -d "$moddir" ] || die "$pkg has no /lib/modules/$release"

# --- vmlinux out of the bzImage ----------------------------------------------------------
# le FILE OFFSET SIZE: the little-endian unsigned SIZE-byte (1, 2, 4, 8) integer at OFFSET.
le() { od -An -tu"$3" -j "$2" -N "$3" "$1" | tr -d ' \n'; }
hexbytes() { od -An -tx1 -j "$2" -N "$3" "$1" | tr -d ' \n'; }

[ "$(le "$vmlinuz" $((0x1fe)) 2)" = $((0xaa55)) ] || die "$vmlinuz: no boot sector signature 0xaa55"
[ "$(hexbytes "$vmlinuz" $((0x202)) 4)" = 48647253 ] || die "$vmlinuz: no 'HdrS' setup header"
boot_proto=$(le "$vmlinuz" $((0x206)) 2)
[ "$boot_proto" -ge $((0x208)) ] \
  || die "$vmlinuz: boot protocol $(printf %#x "$boot_proto") has no payload fields (needs 2.08+)"
setup_sects=$(le "$vmlinuz" $((0x1f1)) 1)
if [ "$setup_sects" = 0 ]; then setup_sects=4; fi
pm_start=$(( (setup_sects + 1) * 512 ))
payload_offset=$(le "$vmlinuz" $((0x248)) 4)
payload_length=$(le "$vmlinuz" $((0x24c)) 4)
payload_start=$((pm_start + payload_offset))
size=$(stat -c %s "$vmlinuz")
if [ "$payload_length" -le 4 ] || [ $((payload_start + payload_length)) -gt "$size" ]; then
  die "$vmlinuz: payload ($payload_start + $payload_length) lies outside the file ($size bytes)"
fi

magic=$(hexbytes "$vmlinuz" "$payload_start" 6)
# The kernel build appends the uncompressed size (le32) to every payload: the gzip trailer's
# ISIZE is it already, the others get 4 extra bytes after the stream, which their
# decompressors would call trailing garbage, so those are cut off.
strip=4
case "$magic" in
  1f8b*)         compression=gzip;  strip=0; decomp=(gzip -dc);               decomp_pkg=gzip ;;
  fd377a585a00)  compression=xz;    decomp=(xz -dc);                          decomp_pkg=xz-utils ;;
  28b52ffd*)     compression=zstd;  decomp=(zstd -dcq);                       decomp_pkg=zstd ;;
  02214c18*)     compression=lz4;   decomp=(lz4 -dcq);                        decomp_pkg=lz4 ;;
  425a68*)       compression=bzip2; decomp=(bzip2 -dc);                       decomp_pkg=bzip2 ;;
  5d000000*)     compression=lzma;  decomp=(xz --format=lzma -dc);            decomp_pkg=xz-utils ;;
  894c5a4f*)     compression=lzo;   decomp=(lzop -dc);                        decomp_pkg=lzop ;;
  *) die "$vmlinuz: unknown payload compression (magic $magic at offset $payload_start)" ;;
esac
need_pkgs "$decomp_pkg"
expected=$(le "$vmlinuz" $((payload_start + payload_length - 4)) 4)
log "payload: $compression, $payload_length bytes at $payload_start (setup_sects $setup_sects, boot protocol $(printf %x.%02x $((boot_proto >> 8)) $((boot_proto & 255))))"
dd if="$vmlinuz" bs=1M iflag=skip_bytes,count_bytes skip="$payload_start" \
    count=$((payload_length - strip)) status=none \
  | "${decomp[@]}" > "$build/vmlinux.bin" \
  || die "decompressing the $compression payload of $vmlinuz failed"
got=$(stat -c %s "$build/vmlinux.bin")
[ $((got % 4294967296)) = "$expected" ] \
  || die "decompressed payload is $got bytes, the kernel recorded $expected"

elf=$build/vmlinux.bin
[ "$(hexbytes "$elf" 0 4)" = 7f454c46 ] || die "decompressed payload is not an ELF file"
ehdr=$(readelf -h "$elf") || die "readelf cannot read the decompressed payload"
[[ "$ehdr" =~ Class:[[:space:]]*ELF64 ]] || die "decompressed payload is not a 64-bit ELF"
[[ "$ehdr" =~ Machine:[[:space:]]*Advanced\ Micro\ Devices\ X86-64 ]] \
  || die "decompressed payload is not an x86-64 ELF"
# The payload is the ELF followed by the relocation table the decompressor uses for KASLR;
# vmlinux is the ELF alone: up to the end of its headers, segments and sections.
phoff=$(le "$elf" 32 8); shoff=$(le "$elf" 40 8)
phentsize=$(le "$elf" 54 2); phnum=$(le "$elf" 56 2)
shentsize=$(le "$elf" 58 2); shnum=$(le "$elf" 60 2)
end=$((shoff + shentsize * shnum))
if [ $((phoff + phentsize * phnum)) -gt "$end" ]; then end=$((phoff + phentsize * phnum)); fi
for ((i = 0; i < phnum; i++)); do
  ph=$((phoff + i * phentsize))
  e=$(( $(le "$elf" $((ph + 8)) 8) + $(le "$elf" $((ph + 32)) 8) ))
  if [ "$e" -gt "$end" ]; then end=$e; fi
done
for ((i = 0; i < shnum; i++)); do
  sh=$((shoff + i * shentsize))
  if [ "$(le "$elf" $((sh + 4)) 4)" = 8 ]; then continue; fi # SHT_NOBITS
  e=$(( $(le "$elf" $((sh + 24)) 8) + $(le "$elf" $((sh + 32)) 8) ))
  if [ "$e" -gt "$end" ]; then end=$e; fi
done
[ "$end" -le "$got" ] || die "the ELF's headers reach past the payload ($end > $got bytes)"
head -c "$end" "$elf" > "$build/vmlinux"
rm -f "$elf"
readelf -h "$build/vmlinux" >/dev/null || die "vmlinux (the first $end bytes of the payload) is not a valid ELF"
log "vmlinux: $(file -b "$build/vmlinux" | cut -d, -f1-2) ($end bytes; $((got - end)) bytes of relocations left out)"
cp "$vmlinuz" "$build/bzImage"

# --- initramfs ---------------------------------------------------------------------------
if [ ! -s "$moddir/modules.dep" ]; then
  # Debian's package leaves modules.dep to its postinst (depmod); write it in the unpacked tree.
  depmod -b "$root" "$release" || die "depmod -b $root $release failed"
fi
[ -s "$moddir/modules.dep" ] || die "no modules.dep for $release"

# modpath NAME: the modules.dep path of module NAME ("-" and "_" are the same in names).
modpath() {
  local n=${1//-/_}
  awk -F: -v n="$n" '{ p = $1; b = p; sub(/.*\//, "", b); sub(/\.ko(\.(xz|zst|gz))?$/, "", b);
    gsub(/-/, "_", b); if (b == n) { print p; exit } }' "$moddir/modules.dep"
}
# deps PATH: the modules PATH depends on (modules.dep lists them all, transitively).
deps() {
  awk -F: -v p="$1" '$1 == p { sub(/^ +/, "", $2); print $2; exit }' "$moddir/modules.dep"
}
declare -A seen=()
order=()
visit() {
  local p=$1 d
  if [ -n "${seen[$p]:-}" ]; then return 0; fi
  seen[$p]=1
  for d in $(deps "$p"); do visit "$d"; done
  order+=("$p")
}
for m in "${want_modules[@]}"; do
  if grep -qE "/${m//_/[-_]}\.ko\$" "$moddir/modules.builtin" 2>/dev/null; then
    log "module $m is built into the kernel"
    continue
  fi
  p=$(modpath "$m")
  [ -n "$p" ] || die "module $m is neither in $pkg's modules.dep nor built in"
  visit "$p"
done

ird="$build/initramfs"
mkdir -p "$ird"/{bin,sbin,dev,proc,sys,tmp,root,etc,lib/modules/"$release"}
cp "$(command -v busybox || echo /bin/busybox)" "$ird/bin/busybox"
[[ "$(file -b "$ird/bin/busybox")" == *"statically linked"* ]] \
  || die "$(command -v busybox) is not statically linked (is busybox-static installed?)"
for a in $("$ird/bin/busybox" --list); do
  if [ "$a" != busybox ]; then ln -s busybox "$ird/bin/$a"; fi
done
# The kernel's built-in initramfs has /dev/console too; this one does not rely on it.
if [ "$(id -u)" = 0 ]; then
  mknod -m 600 "$ird/dev/console" c 5 1
  mknod -m 666 "$ird/dev/null" c 1 3
fi

insmods=()
for p in "${order[@]}"; do
  src="$moddir/$p"
  dst="lib/modules/$release/${p%.ko*}.ko"
  mkdir -p "$ird/$(dirname "$dst")"
  case "$p" in
    *.ko)     cp "$src" "$ird/$dst" ;;
    *.ko.xz)  need_pkgs xz-utils; xz -dc "$src" > "$ird/$dst" ;;
    *.ko.zst) need_pkgs zstd; zstd -dcq "$src" > "$ird/$dst" ;;
    *.ko.gz)  gzip -dc "$src" > "$ird/$dst" ;;
    *) die "module $p: unknown compression" ;;
  esac
  insmods+=("/$dst")
done
# A modules.dep for the guest's own use (busybox modprobe); /init does not need it.
for p in "${order[@]}"; do
  awk -F: -v p="$p" '$1 == p' "$moddir/modules.dep"
done | sed -E 's/\.ko(\.(xz|zst|gz))?/.ko/g' > "$ird/lib/modules/$release/modules.dep"

{
  cat <<'EOF'
#!/bin/busybox sh
# ftvm's Linux test guest (written by scripts/linux-guest.sh): load the virtio drivers, report
# what the kernel sees, power off. It reads nothing from the kernel command line.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mount -t tmpfs tmpfs /dev
echo FTVM-LINUX-INIT
# Modules, dependencies first.
for m in \
EOF
  for m in "${insmods[@]}"; do printf '    %s \\\n' "$m"; done
  cat <<'EOF'
    ; do
  insmod "$m" || echo "ftvm-insmod-failed: $m"
done
echo "cpus-online: $(cat /sys/devices/system/cpu/online)"
while read -r line; do echo "diskstats: $line"; done < /proc/diskstats
for n in /sys/class/net/*; do
  [ -d "$n/statistics" ] || continue
  s=$n/statistics
  echo "net: ${n##*/} rx_bytes=$(cat $s/rx_bytes) rx_packets=$(cat $s/rx_packets) tx_bytes=$(cat $s/tx_bytes) tx_packets=$(cat $s/tx_packets)"
done
echo FTVM-LINUX-DONE
poweroff -f
echo "ftvm-poweroff-failed"
while :; do sleep 1; done
EOF
} > "$ird/init"
chmod 755 "$ird/init"

(
  cd "$ird"
  # Fixed times, so that the same inputs give the same archive.
  find . -exec touch -h -d @0 {} +
  find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet
) | gzip -9 -n > "$build/initramfs.cpio.gz"

modnames=$(for p in "${order[@]}"; do b=${p##*/}; printf '%s ' "${b%%.ko*}"; done)
cat > "$build/VERSION" <<EOF
package=$pkg
version=$version
meta=$meta $meta_version
release=$release
compression=$compression
modules=${modnames% }
EOF

# VERSION last: all outputs present means a complete build.
rm -f "$out/VERSION"
for f in vmlinux bzImage initramfs.cpio.gz VERSION; do mv -f "$build/$f" "$out/$f"; done
rm -rf "$build"
log "modules in the initramfs, in load order: ${modnames% }"
log "done:"
summary
