"""Layer dropping on a ``torch.fx.GraphModule`` (from ``torch.export``): rewire only.

Every reader of a dropped layer's output node reads its input node instead; then the nodes
left without readers go, walking up from the old output (torch.export's shape assertions on a
value do not keep it alive), and so do the parameters and buffers no ``get_attr`` reads any
more.
"""

from __future__ import annotations

import torch
import torch.fx

_CHECKS = {"_assert_tensor_metadata", "_assert_scalar"}
_REMOVABLE = ("call_function", "call_method", "call_module", "get_attr")


def _is_check(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and getattr(n.target, "_opname", "") in _CHECKS


def _drop_dead(gm: torch.fx.GraphModule, start: list[torch.fx.Node]) -> set[str]:
    """Erase the nodes of ``start`` that nothing but checks reads, and upwards from them; the
    ``get_attr`` targets erased."""
    targets, erased = set(), set()
    todo = list(start)
    while todo:
        n = todo.pop()
        if id(n) in erased or n.op not in _REMOVABLE:
            continue
        if any(not _is_check(u) for u in n.users):
            continue
        for u in list(n.users):
            gm.graph.erase_node(u)
            erased.add(id(u))
        inputs = list(n.all_input_nodes)
        if n.op == "get_attr":
            targets.add(n.target)
        gm.graph.erase_node(n)
        erased.add(id(n))
        todo.extend(inputs)
    return targets


def _delete_attr(gm: torch.fx.GraphModule, target: str) -> None:
    *path, leaf = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return
    if hasattr(owner, leaf):
        delattr(owner, leaf)


def drop(gm: torch.fx.GraphModule, subs: list[tuple[str, str]]) -> None:
    """Apply ``subs`` (``(output, input)`` node names, last layer first) to ``gm`` in place."""
    nodes = {n.name: n for n in gm.graph.nodes}
    old = []
    for out, inp in subs:
        nodes[out].replace_all_uses_with(nodes[inp])
        old.append(nodes[out])
    gone = _drop_dead(gm, old)
    still = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in sorted(gone - still):
        _delete_attr(gm, target)
    gm.graph.lint()
    gm.recompile()
