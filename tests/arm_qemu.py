"""The aarch64 sysroot of scripts/setup_arm.sh, for tests that run code on aarch64 under qemu."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSROOT = Path(os.environ.get("SLIMC_ARM_SYSROOT", REPO / ".cache" / "arm-sysroot"))
CROSS_CXX = "aarch64-linux-gnu-g++"


def aarch64_python() -> Path:
    """The qemu wrapper of the sysroot's aarch64 CPython. Fails (does not skip) saying how to
    install what is missing: CI installs it, so a missing piece is a broken setup."""
    python = SYSROOT / "python"
    missing = [what for what, ok in [
        ("qemu-aarch64 (Debian: qemu-user)", shutil.which("qemu-aarch64")),
        (f"{CROSS_CXX} (Debian: g++-aarch64-linux-gnu)", shutil.which(CROSS_CXX)),
        (f"the aarch64 sysroot {SYSROOT}", python.is_file() and (SYSROOT / ".complete").is_file()),
    ] if not ok]
    if missing:
        pytest.fail("The ARM tests need " + ", ".join(missing) + ". Install them with "
                    "scripts/setup_arm.sh (./setup.sh --test runs it; CI installs them).",
                    pytrace=False)
    return python
