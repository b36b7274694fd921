#!/usr/bin/env bash
# Build the aarch64 sysroot that tests/test_arm.py runs slimc's runtime in, on an x86-64 machine.
#
#   scripts/setup_arm.sh            # idempotent: does nothing when the sysroot is up to date
#   SLIMC_ARM_SYSROOT=DIR scripts/setup_arm.sh
#
# What it installs:
#   host (Debian apt):  g++-aarch64-linux-gnu (links aarch64 libraries: Artifact.save for "arm")
#                       qemu-user (qemu-aarch64 runs aarch64 programs; no binfmt_misc is needed,
#                       the tests call qemu-aarch64 -L ROOT explicitly)
#   sysroot DIR/root:   Debian arm64 packages (CPython, glibc, libstdc++, ...) unpacked with
#                       dpkg -x, plus the aarch64 wheels of numpy, apache-tvm-ffi and apache-tvm
#                       at the versions .venv has (and cloudpickle + psutil, which TVM's RPC
#                       server needs), unzipped into dist-packages. libtvm_compiler
#                       is left out: a deployed slimc artifact needs libtvm_runtime only, and
#                       loading the compiler's 240 MB under qemu costs seconds per process.
#   DIR/python:         `DIR/python ARGS` runs the aarch64 CPython under qemu (a sys.executable
#                       for tools that start Python subprocesses, such as TVM's RPC server).
#
# Needs .venv (./setup.sh first) for the pinned versions, root for apt, and the network to
# Debian's archive and PyPI on the first run only. Prints one line unless something fails.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${SLIMC_ARM_SYSROOT:-.cache/arm-sysroot}
VENV_PY=.venv/bin/python

log() { echo "setup_arm: $*" >&2; }
die() { log "$*"; exit 1; }

[ -x "$VENV_PY" ] || die ".venv is missing: run ./setup.sh first (the sysroot takes its pinned \
numpy and TVM versions from it)."

# -- what the sysroot holds: the stamp changes (and the sysroot is rebuilt) when any of it does
read -r PYVER TVM_V FFI_V NUMPY_V TE_V CP_V PS_V < <("$VENV_PY" - <<'EOF'
import sys
from importlib.metadata import version
print(f"{sys.version_info[0]}.{sys.version_info[1]}", version("apache-tvm"),
      version("apache-tvm-ffi"), version("numpy"), version("typing_extensions"),
      version("cloudpickle"), version("psutil"))
EOF
)
DEBS="python${PYVER}-minimal libpython${PYVER}-minimal libpython${PYVER}-stdlib libc6 libstdc++6
libgcc-s1 zlib1g libexpat1 libffi8 libbz2-1.0 liblzma5 libuuid1 libcrypt1"
# cloudpickle and psutil: TVM's RPC server (an aarch64 device for remote tuning, codegen/rpc.py)
WHEELS="apache-tvm==$TVM_V apache-tvm-ffi==$FFI_V numpy==$NUMPY_V typing_extensions==$TE_V
cloudpickle==$CP_V psutil==$PS_V"
STAMP_TEXT="format 1; python $PYVER; debs $(echo $DEBS); wheels $(echo $WHEELS)"

have_tools() { command -v qemu-aarch64 >/dev/null && command -v aarch64-linux-gnu-g++ >/dev/null; }

if have_tools && [ -x "$DEST/root/usr/bin/python$PYVER" ] && [ -f "$DEST/.complete" ] \
        && [ "$(cat "$DEST/.complete")" = "$STAMP_TEXT" ]; then
    exit 0  # up to date
fi

LOG=$(mktemp /tmp/setup_arm.XXXXXX.log)
trap 'rm -f "$LOG"' EXIT
run() {  # run quietly; on failure show what it said
    if ! "$@" >>"$LOG" 2>&1; then
        tail -n 30 "$LOG" >&2
        die "failed: $*"
    fi
}

# -- host tools and arm64 package lists (apt-get update at most once)
updated=0
apt_update() {
    if [ "$updated" = 0 ]; then run apt-get update -qq; updated=1; fi
}
need_root() {
    [ "$(id -u)" = 0 ] || die "$1 needs root (apt-get); run this script as root, or install \
it yourself: $2"
}
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    need_root "Adding the arm64 package architecture" "dpkg --add-architecture arm64"
    run dpkg --add-architecture arm64  # before apt-get update, which then fetches arm64 lists
    apt_update
fi
if ! have_tools; then
    need_root "Installing qemu-user and g++-aarch64-linux-gnu" \
        "apt-get install qemu-user g++-aarch64-linux-gnu"
    log "installing qemu-user and g++-aarch64-linux-gnu ..."
    apt_update
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user g++-aarch64-linux-gnu
fi

log "building the aarch64 sysroot in $DEST (Python $PYVER, TVM $TVM_V runtime, numpy $NUMPY_V) ..."
mkdir -p "$(dirname "$DEST")"
WORK=$(mktemp -d "$DEST.tmp.XXXXXX")
chmod 755 "$WORK"  # mktemp makes it private
trap 'rm -f "$LOG"; rm -rf "$WORK"' EXIT
mkdir -p "$WORK/debs" "$WORK/wheels" "$WORK/root"
# arm64 .debs; the package lists may be stale (a superseded version): update once, try again
arm_debs=$(for p in $DEBS; do echo "$p:arm64"; done)
if ! (cd "$WORK/debs" && apt-get download -qq -o APT::Sandbox::User=root $arm_debs \
        >>"$LOG" 2>&1); then
    [ "$updated" = 0 ] || { tail -n 20 "$LOG" >&2; die "apt-get download failed"; }
    need_root "Updating the package lists" "apt-get update"
    apt_update
    (cd "$WORK/debs" && run apt-get download -qq -o APT::Sandbox::User=root $arm_debs)
fi
for deb in "$WORK"/debs/*.deb; do run dpkg -x "$deb" "$WORK/root"; done

# aarch64 wheels; the platform tags these releases are published under (manylinux_2_24..2_28)
plats=""
for t in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
    plats="$plats --platform ${t}_aarch64"
done
nodot=${PYVER/./}
run "$VENV_PY" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp --abi "cp$nodot" --abi abi3 --abi none $plats \
    -d "$WORK/wheels" $WHEELS
SITE="$WORK/root/usr/lib/python3/dist-packages"  # on Debian's sys.path
mkdir -p "$SITE"
for whl in "$WORK"/wheels/*.whl; do run "$VENV_PY" -m zipfile -e "$whl" "$SITE"; done
rm -f "$SITE/tvm/lib/libtvm_compiler.so"
# the first import under qemu would otherwise compile every module at emulated speed
run "$VENV_PY" -m compileall -q -j 0 "$WORK/root/usr/lib/python$PYVER" "$SITE"

cat >"$WORK/python" <<EOF
#!/bin/sh
# aarch64 CPython $PYVER with numpy and TVM's runtime, under qemu-user
# (made by scripts/setup_arm.sh)
root="\$(cd "\$(dirname "\$0")" && pwd)/root"
exec qemu-aarch64 -L "\$root" "\$root/usr/bin/python$PYVER" "\$@"
EOF
chmod +x "$WORK/python"
rm -rf "$WORK/debs" "$WORK/wheels"
echo "$STAMP_TEXT" >"$WORK/.complete"

# check it before it replaces a working sysroot
probe='import platform, numpy, tvm; print(platform.machine(), tvm.__version__)'
check=$("$WORK/python" -c "$probe" 2>>"$LOG") \
    || { tail -n 20 "$LOG" >&2; die "the new sysroot's Python does not start"; }
[ "$check" = "aarch64 $TVM_V" ] \
    || die "the new sysroot's Python says '$check', expected 'aarch64 $TVM_V'"
rm -rf "$DEST.old"
[ -e "$DEST" ] && mv "$DEST" "$DEST.old"
mv "$WORK" "$DEST"
rm -rf "$DEST.old"
log "done: $DEST/python runs aarch64 Python $PYVER ($(du -sh "$DEST" | cut -f1))"
