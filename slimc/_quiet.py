"""Dependencies' messages that say nothing to a slimc user, kept off its output.

Each filter names one message and is on only around the calls that emit it, so every other
warning (slimc's own, the dependencies' real ones, the same message from the user's own code
outside those calls) still comes through:

- torch's ``isinstance(treespec, LeafSpec)`` FutureWarning (:func:`torch_internal_warnings`);
- TVM's "Fast mode segfaults when there are out-of-bounds indices", a line its C++ code writes
  to the process's stderr (:func:`tvm_native_noise`);
- onnx-graphsurgeon's "colored module is not installed" (:func:`plain_graphsurgeon_logs`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import warnings

# torch 2.13 deprecates pytree's LeafSpec but still builds and deep-copies LeafSpecs itself
# (GraphModule deepcopy, ExportedProgram.run_decompositions, torch.onnx.export): raised from
# torch's own code, nothing a slimc user (or slimc) can change.
_TORCH_LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


@contextlib.contextmanager
def torch_internal_warnings():
    """Hide torch's own LeafSpec FutureWarning (and nothing else) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCH_LEAFSPEC, category=FutureWarning)
        yield


# TVM's topi::take logs this (C++ LOG(WARNING), straight to stderr, once per gather lowered in
# "fast" mode, which both of TVM's frontends emit for embeddings). For a slimc artifact it is
# misleading: slimc.runtime checks every index input against its recorded range before each
# call, and gathers of indices computed inside the model are compiled in "clip" mode
# (codegen/bounds.py, README "Guarantees" 5), so no out-of-bounds index reaches a fast take.
# TVM's logging has no level to set from Python, so the line is dropped from fd 2 while TVM
# lowers; every other byte written there is passed on as it arrives.
_NATIVE_NOISE = (b"Fast mode segfaults when there are out-of-bounds indices",)

_lock = threading.Lock()
_active: _StderrFilter | None = None
_depth = 0


class _StderrFilter:
    """fd 2 redirected into a pipe; a thread copies each line back to the real stderr unless
    it holds one of ``_NATIVE_NOISE``."""

    def __init__(self):
        _flush()
        self.saved = os.dup(2)
        try:
            read, write = os.pipe()
        except OSError:
            os.close(self.saved)
            raise
        os.dup2(write, 2)
        os.close(write)
        self.read = read
        self.thread = threading.Thread(target=self._pump, name="slimc-stderr-filter",
                                       daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        try:
            while chunk := os.read(self.read, 65536):
                *lines, pending = (pending + chunk).split(b"\n")
                self._write(b"".join(line + b"\n" for line in lines if not _noise(line)))
            if pending and not _noise(pending):
                self._write(pending)
        finally:
            os.close(self.read)

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a closed stderr: drop, as a write to it would
            while data:
                data = data[os.write(self.saved, data):]

    def close(self) -> None:
        _flush()
        os.dup2(self.saved, 2)   # the pipe's last writer is gone: the pump drains it and ends
        # a child process started inside the block may still hold the pipe: do not wait for it
        # (the pump then keeps copying its output, through the saved descriptor)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            os.close(self.saved)


def _noise(line: bytes) -> bool:
    return any(n in line for n in _NATIVE_NOISE)


def _flush() -> None:
    with contextlib.suppress(Exception):
        sys.stderr.flush()


@contextlib.contextmanager
def tvm_native_noise():
    """Drop TVM's "Fast mode segfaults ..." line from stderr inside the block (re-entrant and
    safe from several threads: the first to enter installs the filter, the last to leave
    removes it). Where fd 2 cannot be redirected, the block runs unfiltered."""
    global _active, _depth
    with _lock:
        if _depth == 0:
            try:
                _active = _StderrFilter()
            except OSError:
                _active = None
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _active is not None:
                _active.close()
                _active = None


def plain_graphsurgeon_logs() -> None:
    """onnx-graphsurgeon colours its log lines with the optional ``colored`` package; without it,
    its first warning is preceded by "colored module is not installed, ..." on stdout. Where the
    package is missing the colours could not be shown anyway: switch them off, which drops that
    line and nothing else (graphsurgeon's own warnings still print)."""
    if importlib.util.find_spec("colored") is None:
        from onnx_graphsurgeon.logger import G_LOGGER
        G_LOGGER.colors = False
