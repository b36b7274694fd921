"""``cleanup``: remove what computes nothing; fold what computes only constants."""

from __future__ import annotations

from ...errors import OptionError
from ..registry import Exact, PassResult, register_pass


@register_pass("cleanup", contract=Exact())
def cleanup(graph, /, *, fold_constants: bool = True,
            max_fold_bytes: int = 1 << 20) -> PassResult:
    """Remove no-op and dead nodes and fold constant subgraphs.

    Math:
        no-op:  f(x) = x  for Identity, Dropout at inference, a Cast / copy to the type and
                layout x already has, a view / reshape / expand / transpose that leaves shape and
                strides (FX) or static shape (ONNX) unchanged, x + 0, x * 1; and FX metadata
                asserts whose condition torch.export already fixed.  Readers of f(x) read x.
        fold:   a node whose inputs are all weights or literals becomes a weight holding its
                value, computed once by the reference executor (torch / onnxruntime).
        dead:   a node nothing reads (directly or through other nodes) and without side effects
                is erased, and so are the weights only it read.

    Pre:
        An FX graph from ``torch.export`` (metadata ``val`` on nodes; a node without it is left
        alone), or any valid ONNX model. Options: ``fold_constants`` (default on);
        ``max_fold_bytes`` (default 1 MiB): a folded value larger than this stays computation,
        except on FX where it replaces weights that nothing else reads (``transpose(W)``).

    Post:
        Same inputs, same outputs (ONNX output names unchanged); no node left that one more
        ``cleanup`` would remove (a second run reports ``modified=False``). Where nothing
        applies the graph is returned unchanged (ONNX: byte-identical serialization).
        ``stats``: nodes_before, nodes_after, removed (op kind -> count), noops, dead, folded.

    Numerics:
        Exact. No-ops and dead nodes do not touch values; a folded value is what the runtime
        would compute (onnxruntime may fuse differently when folding, hence 1e-5, not 0).
    """
    if not isinstance(max_fold_bytes, int) or isinstance(max_fold_bytes, bool) \
            or max_fold_bytes < 0:
        raise OptionError(f"cleanup: max_fold_bytes must be a byte count >= 0, got "
                          f"{max_fold_bytes!r}.", "Pass e.g. max_fold_bytes=1 << 20.")
    if graph.backend == "fx":
        from . import fx
        modified, stats = fx.cleanup(graph.native, fold=bool(fold_constants),
                                     max_fold_bytes=max_fold_bytes)
    else:
        from . import onnx
        graph.native, modified, stats = onnx.cleanup(graph.native, fold=bool(fold_constants),
                                                     max_fold_bytes=max_fold_bytes)
    return PassResult(graph, modified, stats)


__all__ = ["cleanup"]
