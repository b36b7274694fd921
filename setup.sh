#!/usr/bin/env bash
# Set up slimc on a fresh machine: a virtual environment in .venv with slimc and the exact
# dependency versions of constraints.txt. `./setup.sh --test` also installs what the test suite
# needs.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PY" --version)" >&2
    "$PY" -m venv .venv
fi
extras="demo"
if [ "${1:-}" = "--test" ]; then
    extras="demo,test"
fi
echo "setup: installing slimc[$extras] (torch CPU build, TVM, onnx, onnxruntime) ..." >&2
# constraints.txt: the exact versions CI uses, inside pyproject.toml's ranges
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt \
    -e ".[$extras]"
if [ "${1:-}" = "--test" ]; then
    # tests/test_arm.py: qemu-user, the aarch64 cross compiler and an aarch64 sysroot with
    # numpy + TVM's runtime in .cache/arm-sysroot (a no-op once built; apt-get update at most once)
    scripts/setup_arm.sh
    # tests/test_report.py opens the HTML report in headless Chromium (Debian's chromium)
    if ! command -v chromium >/dev/null 2>&1; then
        sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
        echo "setup: installing chromium (apt) ..." >&2
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
            || { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y -qq chromium >/dev/null; }
    fi
fi
echo "setup: done" >&2
