"""Backend-neutral planning for head pruning: which heads stay, which weight rows and columns
that keeps, and the head atoms each projection output starts with.

Math, for one attention block with ``H`` query heads, ``Hkv`` key/value heads (``R = H / Hkv``
query heads per key/value head) and head size ``d``:

* query head ``h`` owns rows ``[h*d, (h+1)*d)`` of the query projection (weight and bias) and
  columns ``[h*d, (h+1)*d)`` of the output projection;
* key/value head ``g`` owns rows ``[g*d, (g+1)*d)`` of the key and value projections and serves
  query heads ``g*R .. g*R+R-1``;
* removing query head ``h`` deletes its query rows and output columns; a key/value head goes when
  every query head of its group goes. ``repeat_kv`` maps new query head ``j`` to key/value head
  ``j // R'``, which stays right only if every kept group keeps the same number ``R'`` of query
  heads; other removals are refused.

Nothing here edits a graph: :func:`plan_heads` validates the request against the discovered
blocks, :func:`weight_edits` lists (weight, axis, kept indices) for the adapters to apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import OptionError, UnsupportedError
from ...ir.structures import AttentionBlock, Linear


@dataclass(frozen=True)
class BlockPlan:
    """The heads one attention block keeps."""

    block: AttentionBlock
    keep_q: tuple  # kept query heads, ascending
    keep_kv: tuple  # kept key/value heads, ascending

    @property
    def layer(self) -> int:
        return self.block.layer

    @property
    def removed(self) -> tuple:
        keep = set(self.keep_q)
        return tuple(h for h in range(self.block.num_heads) if h not in keep)

    @property
    def empty(self) -> bool:
        return not self.keep_q

    @property
    def head_symbol(self) -> str:
        return f"h{self.layer}"

    @property
    def group_symbol(self) -> str:
        return f"r{self.layer}"

    def sizes(self) -> dict:
        """New value of each symbol of this block."""
        out = {self.head_symbol: len(self.keep_kv)}
        if self.block.gqa:
            out[self.group_symbol] = len(self.keep_q) // max(1, len(self.keep_kv))
        return out

    def q_atoms(self) -> tuple:
        b = self.block
        if b.gqa:
            r = b.num_heads // b.num_kv_heads
            return ((b.num_kv_heads, self.head_symbol), (r, self.group_symbol), (b.head_dim, None))
        return ((b.num_heads, self.head_symbol), (b.head_dim, None))

    def kv_atoms(self) -> tuple:
        b = self.block
        return ((b.num_kv_heads, self.head_symbol), (b.head_dim, None))

    def fused_atoms(self) -> tuple:
        b = self.block
        return ((3, None), (b.num_heads, self.head_symbol), (b.head_dim, None))

    def repeat_symbols(self) -> dict:
        b = self.block
        if not b.gqa:
            return {}
        return {self.head_symbol: (self.group_symbol, b.num_heads // b.num_kv_heads)}


def _heads_of(block: AttentionBlock, layer, heads) -> list:
    if isinstance(heads, (int, np.integer)):
        heads = [heads]
    try:
        heads = list(heads)
    except TypeError:
        raise OptionError(f"heads[{layer!r}] must be a list of head indices, got "
                          f"{type(heads).__name__}.", "Pass e.g. heads={0: [1, 3]}.") from None
    bad = [h for h in heads if isinstance(h, bool) or not isinstance(h, (int, np.integer))]
    if bad:
        raise OptionError(f"heads[{layer}] holds non-integer head indices {bad!r}.",
                          "Head indices are integers counted from 0.")
    out = [h for h in heads if not 0 <= int(h) < block.num_heads]
    if out:
        raise OptionError(f"Layer {layer} ({block.name}) has {block.num_heads} heads "
                          f"(0..{block.num_heads - 1}), but heads {sorted(out)} were asked to "
                          "be removed.", "Use head indices within range.")
    return sorted({int(h) for h in heads})


def plan_block(block: AttentionBlock, remove: list, allow_empty_layer: bool) -> BlockPlan:
    """The heads ``block`` keeps once the query heads ``remove`` are gone (validated)."""
    h, hkv = block.num_heads, block.num_kv_heads
    gone = set(remove)
    keep_q = tuple(i for i in range(h) if i not in gone)
    if not keep_q and not allow_empty_layer:
        raise OptionError(f"Removing heads {sorted(gone)} would leave layer {block.layer} "
                          f"({block.name}) without any head.",
                          "Keep at least one head per layer, or pass allow_empty_layer=True "
                          "(the attention then contributes only its output bias).")
    if not block.gqa:
        return BlockPlan(block, keep_q, keep_q)
    r = h // hkv
    per_group = [sum(1 for i in range(g * r, (g + 1) * r) if i not in gone) for g in range(hkv)]
    kept = [n for n in per_group if n]
    if len(set(kept)) > 1:
        raise UnsupportedError(
            f"Layer {block.layer} ({block.name}) uses grouped-query attention: {h} query heads "
            f"share {hkv} key/value heads in groups of {r}. Removing heads {sorted(gone)} leaves "
            f"groups with {per_group} query heads; key/value sharing (repeat_kv) needs the same "
            "number of query heads in every kept group.",
            f"Remove the same number of query heads from every group (group g is heads "
            f"g*{r}..g*{r}+{r - 1}), or all {r} query heads of a group to remove its key/value "
            "head.")
    keep_kv = tuple(g for g in range(hkv) if per_group[g])
    return BlockPlan(block, keep_q, keep_kv)


def plan_heads(blocks: list, heads: dict, allow_empty_layer: bool = False) -> list:
    """Validate ``heads`` ({layer: [query head, ...]}) against ``blocks``; one BlockPlan per
    block that loses at least one head."""
    if not isinstance(heads, dict):
        raise OptionError(f"heads must be a dict {{layer: [head, ...]}}, got "
                          f"{type(heads).__name__}.", "Pass e.g. heads={0: [1, 3], 5: [0]}.")
    by_layer = {b.layer: b for b in blocks}
    plans = []
    for layer in sorted(heads, key=lambda k: (not isinstance(k, int), str(k))):
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
                or int(layer) not in by_layer:
            raise OptionError(f"Unknown attention layer {layer!r}: the model has "
                              f"{len(blocks)} attention layer(s), numbered 0..{len(blocks) - 1}.",
                              "Use layer indices as listed by graph.attention_blocks().")
        block = by_layer[int(layer)]
        remove = _heads_of(block, layer, heads[layer])
        if remove:
            plans.append(plan_block(block, remove, allow_empty_layer))
    return plans


def _head_rows(heads, head_dim: int, offset: int = 0) -> np.ndarray:
    if not heads:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(offset + h * head_dim, offset + (h + 1) * head_dim)
                           for h in heads]).astype(np.int64)


def _rows_axis(lin: Linear) -> int:
    return 0 if lin.layout == "out_in" else 1


@dataclass(frozen=True)
class WeightEdit:
    """Keep ``index`` along ``axis`` of the weight ``name`` (the ``role`` projection's weight or
    bias); ``node`` is the projection node that reads it, ``port`` its input position when the
    node is a fused attention op that takes the weight itself."""

    name: str
    axis: int
    index: np.ndarray
    role: str
    node: str
    bias: bool = False
    port: int | None = None


def weight_edits(plan: BlockPlan) -> list:
    """Every weight and bias the plan slices, with the indices it keeps."""
    b = plan.block
    d = b.head_dim
    q_keep = _head_rows(plan.keep_q, d)
    kv_keep = _head_rows(plan.keep_kv, d)
    edits = []
    inside = bool(b.nodes.get("packed_weight"))  # com.microsoft::Attention's own weight
    if b.fused_qkv:
        starts = [lin.rows[0] for lin in (b.q, b.k, b.v)]
        idx = np.concatenate([q_keep + starts[0], kv_keep + starts[1], kv_keep + starts[2]])
        edits.append(WeightEdit(b.q.weight, _rows_axis(b.q), idx, "qkv", b.q.node,
                                port=1 if inside else None))
        if b.q.bias:
            edits.append(WeightEdit(b.q.bias, 0, idx, "qkv", b.q.node, bias=True,
                                    port=2 if inside else None))
    else:
        for role, lin, keep in (("q", b.q, q_keep), ("k", b.k, kv_keep), ("v", b.v, kv_keep)):
            edits.append(WeightEdit(lin.weight, _rows_axis(lin), keep, role, lin.node))
            if lin.bias:
                edits.append(WeightEdit(lin.bias, 0, keep, role, lin.node, bias=True))
    if b.nodes.get("packed_bias"):  # MultiHeadAttention's bias input: [b_q | b_k | b_v]
        qw, kw = b.num_heads * d, b.num_kv_heads * d
        idx = np.concatenate([q_keep, qw + kv_keep, qw + kw + kv_keep])
        edits.append(WeightEdit(b.nodes["packed_bias"], 0, idx, "qkv", b.nodes["op"],
                                bias=True, port=3))
    edits.append(WeightEdit(b.o.weight, 1 - _rows_axis(b.o), q_keep, "o", b.o.node))
    return edits


def apply_edit(value: np.ndarray, edit: WeightEdit) -> np.ndarray:
    return np.ascontiguousarray(np.take(value, edit.index, axis=edit.axis))


def removed_parameters(plan: BlockPlan) -> int:
    """How many weights the plan deletes (rows of q/k/v with their biases, columns of o)."""
    b = plan.block
    dq = (b.num_heads - len(plan.keep_q)) * b.head_dim
    dkv = (b.num_kv_heads - len(plan.keep_kv)) * b.head_dim
    n = dq * b.q.in_features + dkv * (b.k.in_features + b.v.in_features) + dq * b.o.out_features
    if b.nodes.get("packed_bias"):
        n += dq + 2 * dkv
    # constant per-head side inputs of a fused attention op (attention bias, head sinks)
    n += (b.num_heads - len(plan.keep_q)) * sum(e[3] for e in b.nodes.get("head_inputs", ()))
    if b.fused_qkv:
        return n + (dq + 2 * dkv if b.q.bias else 0)
    return n + (dq if b.q.bias else 0) + (dkv if b.k.bias else 0) + (dkv if b.v.bias else 0)
