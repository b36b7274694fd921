"""Capture and the thin graph layer that passes see."""

from .capture import capture, load
from .graph import Graph, TensorSpec
from .structures import AttentionBlock, FFNBlock, Linear, TransformerLayer

__all__ = ["AttentionBlock", "FFNBlock", "Graph", "Linear", "TensorSpec", "TransformerLayer",
           "capture", "load"]
