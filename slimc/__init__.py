"""slimc: an ahead-of-time compiler toolkit that makes Transformer models small and fast."""

__version__ = "0.1.0"

from .errors import SlimcError  # noqa: E402
from .ir import AttentionBlock, Graph, Linear, capture, load  # noqa: E402


def __getattr__(name):
    # heavy subpackages (TVM, passes) load on first use, so `import slimc` stays fast
    import importlib
    if name in ("passes", "codegen", "runtime"):
        return importlib.import_module(f".{name}", __name__)
    if name == "compile":
        from .codegen import compile
        return compile
    if name == "compress":
        from .compression import compress
        return compress
    if name == "recover":
        from .passes.prune_heads.recover import recover
        return recover
    raise AttributeError(f"module 'slimc' has no attribute {name!r}")


__all__ = ["SlimcError", "Graph", "AttentionBlock", "Linear", "capture", "load", "compile",
           "recover", "compress", "passes", "codegen", "runtime", "__version__"]
