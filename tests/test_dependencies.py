"""slimc installs beside a user's stack: pyproject.toml gives ranges (torch, TVM and tvm-ffi
exactly pinned), constraints.txt the exact set CI installs, inside those ranges.

The lower bounds of the runtime dependencies were tested by installing slimc into a fresh
virtual environment with every one of them at the version in ``TESTED_LOWER`` (the rest as in
constraints.txt, protobuf 7.36.2 included) and running tests/test_quiet.py, test_cleanup.py,
test_codegen.py and this file there (84 passed); matplotlib, xgboost-cpu, tornado, psutil and
cloudpickle only by importing them (with TVM's RPC and XGBModel) and one plot / one training
call. onnxruntime 1.22 failed there: it reads ONNX IR version 10 at most, onnx 1.18 writes 11.
``test_lower_bounds_are_the_tested_ones`` keeps pyproject.toml from claiming an older version
than those. Upper bounds: CI's versions (constraints.txt) are the newest released of each.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PINNED = {"torch": "2.13.0", "apache-tvm": "0.27.0.post1", "apache-tvm-ffi": "0.1.14.post0"}
TESTED_LOWER = {
    "numpy": "2.0.0", "onnx": "1.18.0", "onnx-graphsurgeon": "0.5.8", "onnxruntime": "1.23.0",
    "onnxscript": "0.7.0", "matplotlib": "3.9.0", "tornado": "6.1", "psutil": "5.9.0",
    "cloudpickle": "3.0.0", "xgboost-cpu": "2.1.1",
}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(*groups: str) -> list[Requirement]:
    project = _project()
    reqs = [Requirement(r) for r in project["dependencies"]]
    for group in groups:
        reqs += [Requirement(r) for r in project["optional-dependencies"][group]]
    return reqs


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


ALL = _requirements("test", "demo", "dev")


@pytest.mark.parametrize("req", ALL, ids=lambda r: r.name)
def test_pinned_exactly_or_a_range(req):
    ops = {s.operator for s in req.specifier}
    name = canonicalize_name(req.name)
    if name in PINNED:
        assert [(s.operator, s.version) for s in req.specifier] == [("==", PINNED[name])]
    else:
        assert not ops & {"==", "==="}, f"{req}: a range, not an exact pin"
        assert ops & {">=", ">"} and ops & {"<", "<="}, f"{req}: needs a lower and upper bound"


def test_every_pin_is_listed():
    assert {canonicalize_name(r.name) for r in ALL} >= set(PINNED)


def test_constraints_lie_inside_the_ranges():
    pins = _constraints()
    # what CI installs (setup.sh --test: the demo and test extras) is all in constraints.txt
    for req in _requirements("test", "demo"):
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is missing from constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt has {name}=={pins[name]}, outside pyproject's {req}"
    assert canonicalize_name("slimc") not in pins


def test_lower_bounds_are_the_tested_ones():
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name in PINNED:
            continue
        (low,) = [Version(s.version) for s in req.specifier if s.operator in (">=", ">")]
        assert name in TESTED_LOWER, f"{name}: no tested lower bound"
        tested = Version(TESTED_LOWER[name])
        assert req.specifier.contains(tested) and low >= tested, (req, tested)


def test_setup_applies_the_constraints():
    setup = (ROOT / "setup.sh").read_text()
    assert "-c constraints.txt" in setup
