"""Graph passes. Each is a registered function: ``g2 = passes.NAME(g, **options)`` returns a new
graph of the same kind (``slimc.Graph``, ``torch.fx.GraphModule`` or ``onnx.ModelProto``) and never
edits ``g``; ``passes.NAME.run(g, **options)`` returns the :class:`PassResult` with statistics.
``PassManager`` runs a list of them with a numerics check and a report per pass.
"""

from .registry import (Exact, Lossy, PassInfo, PassResult, as_graph, get_pass, list_passes,
                       register_pass)
from .manager import PassManager  # noqa: E402  (after the registry it builds on)
from .cleanup import cleanup  # noqa: E402  (importing registers the pass)
from .threshold_weights import threshold_weights as threshold_weights  # noqa: E402
from .factorize_low_rank import factorize_low_rank as factorize_low_rank  # noqa: E402
from .factorize_low_rank import low_rank as low_rank  # noqa: E402
from .prune_heads import prune_heads as prune_heads  # noqa: E402
from .prune_ffn import prune_ffn as prune_ffn  # noqa: E402
from .drop_layers import drop_layers as drop_layers  # noqa: E402
from .fuse import fuse as fuse  # noqa: E402
from .quantize import quantize as quantize  # noqa: E402
from .smooth_quant import smooth_quant as smooth_quant  # noqa: E402
from .fold_fake_quant import fold_fake_quant as fold_fake_quant  # noqa: E402

__all__ = ["Exact", "Lossy", "PassInfo", "PassResult", "as_graph", "get_pass", "list_passes",
           "register_pass", "PassManager", "cleanup"]
