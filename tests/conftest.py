"""Shared test setup.

Every pass in every test runs with verification on (TVM's test suite does the same with its
well-formedness instrument): after each pass, ``onnx.checker`` on ONNX results and
``graph.lint()`` plus a stale-code check on FX results, so a pass that leaves a malformed graph
fails the test that ran it, whatever that test asserts.
"""

from __future__ import annotations

import pytest

from slimc.passes.manager import Verify
from slimc.passes.registry import instrument_all_passes


@pytest.fixture(autouse=True)
def _verify_every_pass():
    with instrument_all_passes(Verify()):
        yield
