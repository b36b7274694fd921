"""Artifacts: a compiled model saved as a directory, ``lib.so`` + ``metadata.json``.

Weights are bound into the library as constants (both TVM frontends' default): an artifact is
self-contained, one file to load, and TVM can fold and pre-pack weights at compile time. The cost
is a library as large as the weights (BERT-base: about 440 MB) and no swapping weights without
compiling again.

Saving is atomic: everything is written into a temporary directory beside the destination,
flushed, then swapped with the destination in one step (``slimc/_atomic.py``), so a failed or
killed save leaves the previous artifact or the new one, never a partial one.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

from .._atomic import replace_dir, temp_dir
from ..errors import ArtifactError, TargetError
from ..runtime import FORMAT_VERSION, LIBRARY_FILE, METADATA_FILE, machine_arch


def _fcompile(triple: str, cc: str | None):
    """The compiler ``export_library`` links with: ``cc`` if given, the system one for this
    machine's architecture, else a GNU cross compiler for ``triple`` found on PATH."""
    from tvm.support import cc as tvm_cc
    if cc:
        if shutil.which(cc) is None:
            raise TargetError(f"The compiler {cc!r} is not on PATH.",
                              "Pass the full path of a C++ compiler for the target as cc=...")
        return tvm_cc.cross_compiler(cc)
    arch = machine_arch(triple)
    if arch == machine_arch(platform.machine()):
        return None
    candidates = [f"{arch}-linux-gnu-g++", f"{arch}-linux-gnu-gcc"]
    found = next((c for c in candidates if shutil.which(c)), None)
    if found is None:
        raise TargetError(
            f"Saving a library for {triple} on this {platform.machine()} machine needs a cross "
            f"compiler to link it; none was found ({' or '.join(candidates)}).",
            f"Install one (Debian/Ubuntu: apt install g++-{arch}-linux-gnu) or pass "
            "cc='/path/to/compiler' to save().")
    return tvm_cc.cross_compiler(found)


def _is_artifact(path: Path) -> bool:
    return (path / METADATA_FILE).is_file()


class Artifact:
    """A compiled model: a TVM Relax VM executable and its metadata. ``save(dir)`` writes it."""

    def __init__(self, executable, metadata: dict, device_code=None):
        self.executable = executable
        self.metadata = metadata
        # CUDA builds: the kernels compiled ahead of time (codegen/cuda.py DeviceCode), packed
        # into lib.so in place of their source
        self.device_code = device_code
        self.compile_seconds: float | None = None   # set by slimc.compile

    @property
    def target(self) -> str:
        return self.metadata["target"]["tvm"]

    def __repr__(self) -> str:
        ins = ", ".join(f"{s['name']}: {s['dtype']}{s['shape']}" for s in self.metadata["inputs"])
        return f"<slimc.Artifact ({ins}) for {self.metadata['target']['name'] or self.target}>"

    def save(self, path, *, cc: str | None = None) -> Path:
        """Write the artifact directory ``path`` (replacing an artifact already there).

        ``cc``: the C++ compiler that links ``lib.so``; needed only to cross-compile (e.g. for
        "arm" on an x86 machine) when no ``<arch>-linux-gnu-g++`` is on PATH.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ArtifactError(f"{path} is a file; an artifact is a directory.",
                                "Choose another output path.")
        if path.is_dir() and any(path.iterdir()) and not _is_artifact(path):
            raise ArtifactError(f"{path} exists and is not a slimc artifact; slimc will not "
                                "replace it.", "Choose a new or empty directory.")
        fcompile = _fcompile(self.metadata["target"]["triple"], cc)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(path)
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be shared
            lib = tmp / LIBRARY_FILE
            try:
                pack = self.device_code.pack_imports if self.device_code is not None else None
                self.executable.export_library(str(lib), fcompile=fcompile, fpack_imports=pack)
            except Exception as e:
                raise TargetError(f"Linking {LIBRARY_FILE} failed: {str(e).strip()[-400:]}",
                                  "Check the C++ compiler (pass cc=... to choose one).") from e
            meta = {"format_version": FORMAT_VERSION, **self.metadata,
                    "library_bytes": lib.stat().st_size}
            (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            replace_dir(tmp, path)   # swaps with a previous artifact in one step
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path
