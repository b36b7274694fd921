"""slimc's error family.

Every error a user can cause is a :class:`SlimcError`: a one-paragraph message that names the problem
and what to do about it. The CLI prints the message and exits with code 2 (no traceback unless
``--debug``).
"""

from __future__ import annotations


class SlimcError(Exception):
    """Base class of every error slimc raises on bad input or an impossible request."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} {fix}")


class InputFileError(SlimcError):
    """A model file that is missing, unreadable, truncated or corrupt."""


class CaptureError(SlimcError):
    """A torch module that torch.export cannot capture."""


class UnsupportedError(SlimcError):
    """An operator, model form or conversion slimc does not support."""


class ShapeError(SlimcError):
    """Inputs whose number, shapes or dtypes do not match the model."""


class IndexRangeError(SlimcError, IndexError):
    """An index input (token ids, positions) holding a value outside the table it indexes.

    Also an :class:`IndexError`, which torch raises for the same input."""


class RunError(SlimcError):
    """TVM's runtime failed while running a compiled model (e.g. it could not allocate the
    memory an input's shape needs)."""


class TargetError(SlimcError):
    """An unknown or unusable compilation target."""


class OptionError(SlimcError):
    """An impossible option value (out of range, wrong type, conflicting)."""


class PassError(SlimcError):
    """A pass failed, or broke its declared numerics contract."""


class ArtifactError(SlimcError):
    """A compiled artifact directory that is missing, incomplete or from another version."""


class BudgetError(SlimcError):
    """``slimc compress`` ran, but no candidate met the budget (exit code 3): the message names
    the nearest candidates, and the report holds the whole front."""

    exit_code = 3
