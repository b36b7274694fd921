"""Graph surgery on ONNX models that several passes share: fresh names, a topological order,
dropping what an edit left without readers.

Born in ``passes/quantize`` and moved here so that passes never import one another's modules.
"""

from __future__ import annotations

import onnx


class Namer:
    """Fresh value / node / initializer names."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.taken = {i.name for i in g.initializer} | {i.name for i in g.input}
        self.taken |= {o.name for o in g.output}
        for n in g.node:
            self.taken.update(n.output)
            self.taken.update(n.input)
            self.taken.add(n.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def toposort(model: onnx.ModelProto) -> None:
    """Order the nodes so every value is produced before it is read (stable: nodes keep their
    relative order where the data allows)."""
    g = model.graph
    nodes = list(g.node)
    known = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    done, order, visiting = set(), [], set()

    def needs(n):
        out = list(n.input)
        for a in n.attribute:  # values read inside subgraphs come from outside too
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                for sn in sub.node:
                    out.extend(sn.input)
        return out

    def visit(i):
        if i in done:
            return
        stack = [(i, iter(needs(nodes[i])))]
        visiting.add(i)
        while stack:
            j, it = stack[-1]
            for v in it:
                if v in known or v not in producer:
                    continue
                p = producer[v]
                if p not in done and p not in visiting:
                    visiting.add(p)
                    stack.append((p, iter(needs(nodes[p]))))
                    break
            else:
                stack.pop()
                visiting.discard(j)
                done.add(j)
                order.append(nodes[j])

    for i in range(len(nodes)):
        visit(i)
    del g.node[:]
    g.node.extend(order)


def drop_unused(model: onnx.ModelProto, candidates) -> int:
    """Remove the producers (nodes, initializers) of ``candidates`` that nothing reads any more,
    walking up through their inputs; returns how many nodes went."""
    g = model.graph
    removed = 0
    gone: set[str] = set()
    todo = list(candidates)
    while todo:
        readers: dict[str, int] = {}
        for n in g.node:
            for v in n.input:
                readers[v] = readers.get(v, 0) + 1
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    for sn in sub.node:
                        for v in sn.input:
                            readers[v] = readers.get(v, 0) + 1
        outputs = {o.name for o in g.output}
        nxt = []
        for v in dict.fromkeys(todo):
            if readers.get(v) or v in outputs:
                continue
            for i, n in enumerate(g.node):
                if v in n.output:
                    if all(not readers.get(o) and o not in outputs for o in n.output):
                        nxt.extend(n.input)
                        gone.update(n.output)
                        del g.node[i]
                        removed += 1
                    break
            else:
                for i, t in enumerate(g.initializer):
                    if t.name == v:
                        del g.initializer[i]
                        # IR < 4 models list initializers among the inputs too
                        for j, vi in enumerate(g.input):
                            if vi.name == v:
                                del g.input[j]
                                break
                        break
        todo = nxt
    for i in reversed(range(len(g.value_info))):
        if g.value_info[i].name in gone:
            del g.value_info[i]
    return removed
