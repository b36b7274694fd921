"""TVM code generation: targets, Relax build, artifacts. Every TVM import of slimc's compiler
side lives in this package (TVM's Python API changes between releases; the churn stays here)."""

from .build import compile, resolve_input_shapes, schedule_hook, static_onnx, to_relax
from .export import Artifact
from .targets import NAMES as TARGETS
from .targets import host_cpu, resolve_target

__all__ = ["TARGETS", "Artifact", "compile", "host_cpu", "resolve_input_shapes", "resolve_target",
           "schedule_hook", "static_onnx", "to_relax"]
