"""What head pruning did, for people: FLOPs, a table of removed heads, an importance heatmap."""

from __future__ import annotations

import math


def _numel(shape) -> int | None:
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return math.prod(shape)


def _live_nodes(graph, view) -> list:
    """View nodes whose results reach a graph output (dead code costs nothing at run time)."""
    if graph.backend == "fx":
        out = next(n for n in graph.native.graph.nodes if n.op == "output")
        need = {a.name for a in out.all_input_nodes}
    else:
        need = {o.name for o in graph.native.graph.output}
    live = []
    for n in reversed(view.nodes):
        if any(o in need for o in n.outputs):
            live.append(n)
            need.update(n.inputs)
            need.update(v for k, v in n.attrs.items() if k in ("weight_value",))
    return live[::-1]


def count_flops(graph) -> int:
    """Multiply-accumulate work of the projections and matmuls, as 2·M·N·K FLOPs per product
    (elementwise ops, softmax and norms are left out: they are a few % of a Transformer)."""
    view = graph.view()
    if graph.backend == "onnx":  # exporters leave value_info partial; measure every shape
        from .onnx import probe_shapes
        view.shapes.update(probe_shapes(graph.native, graph.sample_inputs())[0])
    total = 0
    for n in _live_nodes(graph, view):
        if n.op == "linear":
            rows = _numel((view.shape(n.outputs[0]) or (None,))[:-1])
            if rows is not None:
                total += 2 * rows * n.attrs["in_features"] * n.attrs["out_features"]
        elif n.op == "matmul" and len(n.inputs) >= 2:
            out, a = view.shape(n.outputs[0]), view.shape(n.inputs[0])
            if _numel(out) is not None and a and isinstance(a[-1], int):
                total += 2 * _numel(out) * a[-1]
        elif n.op == "attention_op":
            total += _fused_attention_flops(n, view)
        elif n.op == "sdpa" and len(n.inputs) >= 3:
            q, k = view.shape(n.inputs[0]), view.shape(n.inputs[1])
            v = view.shape(n.inputs[2])
            if _numel(q) is not None and k and v and isinstance(k[-2], int):
                total += 2 * _numel(q) * k[-2] + 2 * _numel(q[:-1]) * k[-2] * v[-1]
    return int(total)


def _fused_attention_flops(n, view) -> int:
    """2·M·N·K FLOPs of a fused ONNX attention operator: the merged QKV projection inside
    com.microsoft::Attention, and the core's two products q·kᵀ and (softmax)·v for every query
    head (key/value heads shared by grouped queries are read, not multiplied, again)."""
    a = n.attrs
    out, q = view.shape(n.outputs[0]), view.shape(n.inputs[0])
    heads = int(a.get("num_heads") or 0)
    kv = int(a.get("kv_num_heads") or heads)
    rank = a.get("rank")
    if _numel(out) is None or not q or not heads or rank not in (3, 4):
        return 0
    flops = 0
    packed = a.get("packed")
    if packed:   # x [B, S, E] @ W [E, q+k+v]: self-attention, keys as long as the queries
        flops += 2 * _numel(q[:-1]) * packed["in_features"] * sum(packed["sizes"])
        keys, d = q[1], packed["sizes"][0] // heads
    elif a.get("packed_qkv"):   # query = [q | k | v] of one projection
        keys, d = q[1], q[-1] // (heads + 2 * kv)
    else:
        k = view.shape(n.inputs[1]) if len(n.inputs) > 1 else None
        if not k or len(k) != rank:
            return flops
        keys, d = (k[1], k[-1] // kv) if rank == 3 else (k[2], k[-1])
    d_v = out[-1] // heads if rank == 3 else out[-1]
    if not isinstance(keys, int) or not d or not d_v:
        return flops
    query_rows = _numel(out) // d_v   # batch × query positions × heads
    return flops + 2 * query_rows * keys * (d + d_v)


def _fmt(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _change(before, after) -> str:
    if not before or after is None:
        return "-"
    return f"{100 * (after - before) / before:+.1f} %"


def table(stats: dict) -> str:
    """A Markdown table of what ``prune_heads`` removed (from its ``PassResult.stats``)."""
    before, after = stats["heads_before"], stats["heads_after"]
    removed = stats.get("removed", {})
    lines = ["| layer | heads before | heads after | removed |", "|---:|---:|---:|---|"]
    for layer in sorted(before):
        gone = removed.get(layer, [])
        lines.append(f"| {layer} | {before[layer]} | {after[layer]} | "
                     f"{', '.join(map(str, gone)) or '-'} |")
    nb, na = sum(before.values()), sum(after.values())
    lines.append(f"| all | {nb} | {na} | {nb - na} ({100 * (nb - na) / max(nb, 1):.0f} %) |")
    lines += ["", "| | before | after | change |", "|---|---:|---:|---:|"]
    for key, label in (("params", "parameters"), ("flops", "FLOPs (matmuls)")):
        b, a = stats.get(f"{key}_before"), stats.get(f"{key}_after", stats.get(f"{key}_before"))
        lines.append(f"| {label} | {_fmt(b)} | {_fmt(a)} | {_change(b, a)} |")
    return "\n".join(lines) + "\n"


def heatmap(scores: dict, path, removed: dict | None = None, title: str | None = None) -> None:
    """A layers × heads picture of ``scores`` ({layer: [score per head]}); removed heads are
    crossed out. Written as PNG with matplotlib (headless)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    layers = sorted(scores)
    width = max(len(scores[layer]) for layer in layers)
    grid = np.full((len(layers), width), np.nan)
    for i, layer in enumerate(layers):
        grid[i, :len(scores[layer])] = scores[layer]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * width, 1.0 + 0.4 * len(layers)), dpi=120)
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i, layer in enumerate(layers):
        for h in (removed or {}).get(layer, []):
            ax.text(h, i, "×", ha="center", va="center", color="red", fontsize=12,
                    fontweight="bold")
    ax.set_xticks(range(width))
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or "head importance (× = removed)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_report(stats: dict, folder) -> dict:
    """``report.md`` (the table) and, when the heads were chosen by score, ``heads.png`` (the
    heatmap) in ``folder``; returns their paths."""
    from pathlib import Path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {"table": folder / "report.md"}
    text = "# prune_heads\n\n"
    if stats.get("score"):
        text += f"Heads ranked by `{stats['score']}` importance.\n\n"
        out["heatmap"] = folder / "heads.png"
        heatmap(stats["scores"], out["heatmap"], stats.get("removed"),
                title=f"{stats['score']} importance (× = removed)")
        text += "![head importance](heads.png)\n\n"
    out["table"].write_text(text + table(stats))
    return out
