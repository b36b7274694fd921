"""Attention-head importance scores, shared by both backends (numpy + torch).

``head_scores(graph, score=...)`` returns ``{layer: scores[num_heads]}``, higher = more
important, normalised per layer to unit L2 norm (Michel et al. 2019, "Are Sixteen Heads Really
Better than One?"), so one global ranking can compare layers. ``select_heads`` turns scores and
a ratio into the ``heads={layer: [head, ...]}`` that ``prune_heads`` removes.

Scores:

* ``"magnitude"``: ‖[W_q rows of h; W_k, W_v rows of h's key/value head; W_o columns of h]‖₂.
  No data needed; both backends.
* ``"taylor"``: I_h = E_batches |∂L/∂m_h| (Michel et al.), with a mask m (all ones) scaling each
  head's context before the output projection: the first-order change of L when head h goes.
  ``loss`` picks L: a callable ``loss(outputs, batch_index) -> scalar tensor`` (labelled data);
  ``"kl"`` (default): KL(teacher ‖ model) over the last axis of every float output taken as
  logits, the teacher being the unpruned model itself. At m = 1 the KL and its gradient are
  exactly zero, so L is the KL's sampled form −log q(ŷ) with ŷ drawn from the teacher (its
  expectation is the KL plus a constant), and E|∂L/∂m_h| is the Fisher-style sensitivity;
  ``"mse"``: I_h = ‖∂y/∂m_h‖, the first-order size of the output change when head h goes,
  estimated with Rademacher probes v (E_v[(v·∂y/∂m_h)²] = ‖∂y/∂m_h‖²). Needs torch autograd:
  FX graphs only (an ONNX graph raises a clear error).
* ``"attention"``: the head's confidence, mean over queries of the largest attention
  probability (Voita et al. 2019: confident heads are the important ones), on calibration
  batches. Both backends.
* ``"wanda"``: Wanda's weight score (Sun et al. 2023) summed over the head's weights,
  Σ |W_ij|·‖X_j‖₂ over the rows of W_q for head h and of W_k, W_v for its key/value head, and
  over the columns of W_o for head h, X being each projection's input on the calibration
  batches (‖X_j‖₂ over every token). Both backends.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..errors import OptionError, PassError, UnsupportedError
from . import _calib

SCORES = ("magnitude", "taylor", "attention", "wanda")


# -- calibration data ---------------------------------------------------------------------------

def calibration_batches(graph, calib) -> list:
    """``calib`` as a list of input tuples (numpy), each checked against the model's inputs."""
    if calib is None:
        raise OptionError("This importance score needs calibration data: calib=[inputs, ...].",
                          "Pass a few input tuples like the model's example inputs, or use "
                          "score='magnitude'.")
    return _calib.check_batches(graph, calib, "this importance score")


# -- scores ------------------------------------------------------------------------------------

def _rows(w: np.ndarray, layout: str, start: int, stop: int) -> np.ndarray:
    return w[start:stop] if layout == "out_in" else w[:, start:stop]


def _cols(w: np.ndarray, layout: str, start: int, stop: int) -> np.ndarray:
    return w[:, start:stop] if layout == "out_in" else w[start:stop]


def magnitude_scores(graph, blocks: list) -> dict:
    out = {}
    for b in blocks:
        d, r = b.head_dim, b.num_heads // b.num_kv_heads
        ws = {k: graph.get_weight(lin.weight) for k, lin in (("q", b.q), ("k", b.k),
                                                              ("v", b.v), ("o", b.o))}
        scores = []
        for h in range(b.num_heads):
            g = h // r
            sq = 0.0
            for key, lin, head in (("q", b.q, h), ("k", b.k, g), ("v", b.v, g)):
                off = lin.rows[0] if lin.rows else 0
                sq += float(np.sum(_rows(ws[key], lin.layout, off + head * d,
                                         off + (head + 1) * d).astype(np.float64) ** 2))
            sq += float(np.sum(_cols(ws["o"], b.o.layout, h * d, (h + 1) * d)
                               .astype(np.float64) ** 2))
            scores.append(math.sqrt(sq))
        out[b.layer] = np.array(scores)
    return out


def wanda_scores(graph, blocks: list, batches: list) -> dict:
    from ._calib import input_stats, linear_sites
    wanted = {lin.node for b in blocks for lin in (b.q, b.k, b.v, b.o)}
    sites = {s.node: s for s in linear_sites(graph.native) if s.node in wanted}
    stats = input_stats(graph.native, list(sites.values()), batches)
    out = {}
    for b in blocks:
        d, r = b.head_dim, b.num_heads // b.num_kv_heads
        # |W|·‖X‖ on each projection's canonical (out, in) matrix
        sc = {}
        for key, lin in (("q", b.q), ("k", b.k), ("v", b.v), ("o", b.o)):
            w = graph.get_weight(lin.weight).astype(np.float64)
            c = w if lin.layout == "out_in" else w.T
            sc[key] = np.abs(c) * stats[sites[lin.node].x].norm[None, :]
        scores = []
        for h in range(b.num_heads):
            g = h // r
            total = 0.0
            for key, lin, head in (("q", b.q, h), ("k", b.k, g), ("v", b.v, g)):
                off = lin.rows[0] if lin.rows else 0
                total += float(sc[key][off + head * d:off + (head + 1) * d].sum())
            total += float(sc["o"][:, h * d:(h + 1) * d].sum())
            scores.append(total)
        out[b.layer] = np.array(scores)
    return out


def taylor_scores(graph, blocks: list, batches: list, loss: str | Callable = "kl",
                  probes: int = 4, seed: int = 0) -> dict:
    if graph.backend != "fx":
        raise UnsupportedError(
            "score='taylor' needs gradients with respect to a head mask, which slimc computes "
            "with torch autograd on FX graphs; an ONNX graph has no torch equivalent here.",
            "Capture the torch module with slimc.capture() and prune the FX graph, or use "
            "score='magnitude' or score='attention' on the ONNX graph.")
    _calib.check_loss(loss)
    from .prune_heads.fx import with_head_masks
    gm, masks = with_head_masks(graph.native, blocks)
    return _calib.mask_gradients(gm, masks, batches, loss, probes=probes, seed=seed)


def _per_head(probs: np.ndarray, dims: list, block) -> np.ndarray:
    """Rearrange attention probabilities to (heads, rows, keys), whatever axis holds heads."""
    syms = {f"h{block.layer}", f"r{block.layer}"}
    axis = next(i for i, d in enumerate(dims) if any(s in syms for _, s in d))
    atoms = dims[axis]
    first = next(i for i, (_, s) in enumerate(atoms) if s in syms)
    last = max(i for i, (_, s) in enumerate(atoms) if s in syms)
    pre = math.prod(v for v, _ in atoms[:first])
    post = math.prod(v for v, _ in atoms[last + 1:])
    shape = probs.shape
    p = probs.reshape(shape[:axis] + (pre, block.num_heads, post) + shape[axis + 1:])
    p = np.moveaxis(p, axis + 1, 0)
    return p.reshape(block.num_heads, -1, shape[-1])


def _sdpa_probs(q, k, mask, node) -> np.ndarray:
    """softmax(q kᵀ · scale + mask) as the SDPA node computes it (not materialised in the
    graph)."""
    import torch

    from .prune_heads.fx import sdpa_args
    args = sdpa_args(node)
    scale = args.get("scale")
    if scale is None:
        scale = 1 / math.sqrt(q.shape[-1])
    is_causal = bool(args.get("is_causal", False))
    if k.shape[-3] != q.shape[-3] and q.dim() >= 3:  # enable_gqa: repeat key heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    return torch.softmax(s, dim=-1).numpy()


def attention_scores(graph, blocks: list, batches: list) -> dict:
    if graph.backend == "fx":
        from .prune_heads.fx import head_dims, record, sdpa_args
        dims, _ = head_dims(graph.native, blocks)
        nodes = {n.name: n for n in graph.native.graph.nodes}
        want, where = set(), {}
        for b in blocks:
            if b.form == "sdpa":
                node = nodes[b.nodes["sdpa"]]
                mask = sdpa_args(node).get("attn_mask")
                names = [a.name for a in node.args[:2]] + ([mask.name] if mask is not None
                                                          else [])
                where[b.layer] = ("sdpa", names, node)
                want.update(names)
            else:
                where[b.layer] = ("softmax", b.nodes["softmax"], None)
                want.add(b.nodes["softmax"])
        values = record(graph.native, want, batches)
    else:
        from .prune_heads.onnx import head_dims, node_output, record
        dims, _ = head_dims(graph.native, blocks, batches[0])
        where = {b.layer: ("softmax", node_output(graph.native, b.nodes["softmax"]), None)
                 for b in blocks}
        values = record(graph.native, {w[1] for w in where.values()}, batches)
    out = {}
    for b in blocks:
        kind, name, node = where[b.layer]
        conf = np.zeros(b.num_heads)
        for seen in values:
            if kind == "sdpa":
                q, k = seen[name[0]], seen[name[1]]
                mask = seen[name[2]] if len(name) > 2 else None
                probs, d = _sdpa_probs(q, k, mask, node), dims[name[0]]
            else:
                probs = np.asarray(seen[name].detach() if hasattr(seen[name], "detach")
                                   else seen[name])
                d = dims[name]
            conf += _per_head(np.asarray(probs, dtype=np.float64), d, b).max(-1).mean(-1)
        out[b.layer] = conf / len(values)
    return out


def normalize_per_layer(scores: dict) -> dict:
    """Each layer's scores divided by their L2 norm (Michel et al. 2019)."""
    out = {}
    for layer, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        n = float(np.linalg.norm(s))
        out[layer] = s / n if n > 0 else s
    return out


def head_scores(graph, score: str = "magnitude", calib=None, blocks: list | None = None,
                loss: str | Callable = "kl", normalize: bool = True) -> dict:
    """{layer: importance of each query head} (higher = keep), normalised per layer."""
    if score not in SCORES:
        raise OptionError(f"Unknown head importance score {score!r}.",
                          f"Use one of {', '.join(SCORES)}.")
    blocks = graph.attention_blocks() if blocks is None else blocks
    if score == "magnitude":
        if calib is not None:
            raise OptionError("score='magnitude' reads the weights only; calib is not used.",
                              "Drop calib=, or use score='taylor' or 'attention'.")
        scores = magnitude_scores(graph, blocks)
    elif score == "taylor":
        # on ONNX, taylor_scores says why it cannot run before calib is even looked at
        batches = calibration_batches(graph, calib) if graph.backend == "fx" else []
        scores = taylor_scores(graph, blocks, batches, loss)
    elif score == "wanda":
        scores = wanda_scores(graph, blocks, calibration_batches(graph, calib))
    else:
        scores = attention_scores(graph, blocks, calibration_batches(graph, calib))
    bad = {layer: int(np.size(s) - np.isfinite(s).sum()) for layer, s in scores.items()
           if not np.isfinite(s).all()}
    if bad:  # NaN sorts anywhere: the ranking, and so the heads removed, would be arbitrary
        raise PassError(f"The {score} head scores of layer(s) {sorted(bad)} are not finite "
                        "(NaN or infinite): the attention weights"
                        f"{'' if score == 'magnitude' else ' or the calibration activations'} "
                        "hold non-finite values.",
                        "Fix the model's weights (slimc inspect lists non-finite ones), or "
                        "name the heads to remove with heads={...}.")
    return normalize_per_layer(scores) if normalize else scores


# -- selection ----------------------------------------------------------------------------------

def _units(block, s: np.ndarray) -> list:
    """Removal units of one layer, cheapest first: single heads; under grouped-query attention
    one head from every group at once (the t-th least important of each group), so the groups
    stay equal and every key/value head stays."""
    if not block.gqa:
        return [(float(s[h]), [int(h)]) for h in np.argsort(s, kind="stable")]
    r = block.num_heads // block.num_kv_heads
    ranked = [sorted(range(g * r, (g + 1) * r), key=lambda h: (s[h], h))
              for g in range(block.num_kv_heads)]
    return [(float(np.mean([s[grp[t]] for grp in ranked])), [grp[t] for grp in ranked])
            for t in range(r)]


def select_heads(blocks: list, scores: dict, ratio: float, scope: str = "global",
                 allow_empty_layer: bool = False) -> dict:
    """The ``round(ratio × heads)`` least important heads as {layer: [head, ...]}.

    ``scope="global"`` ranks all heads together (scores normalised per layer first);
    ``"per_layer"`` removes ``round(ratio × H_l)`` heads from every layer. A layer keeps at
    least one head unless ``allow_empty_layer``.
    """
    if scope not in ("global", "per_layer"):
        raise OptionError(f"Unknown scope {scope!r}.", "Use scope='global' or 'per_layer'.")
    chosen: dict = {b.layer: [] for b in blocks}
    left = {b.layer: b.num_heads for b in blocks}

    def take(layer, heads, budget) -> bool:
        n = len(heads)
        if n > budget or (left[layer] - n < 1 and not allow_empty_layer):
            return False
        chosen[layer].extend(heads)
        left[layer] -= n
        return True

    if scope == "per_layer":
        for b in blocks:
            budget = round(ratio * b.num_heads)
            for _, heads in _units(b, scores[b.layer]):
                if take(b.layer, heads, budget):
                    budget -= len(heads)
    else:
        budget = round(ratio * sum(b.num_heads for b in blocks))
        units = [(s, b.layer, heads) for b in blocks for s, heads in _units(b, scores[b.layer])]
        # a stable sort keeps a GQA layer's units in order (their scores never decrease)
        for _, layer, heads in sorted(units, key=lambda u: (u[0], u[1])):
            if budget <= 0:
                break
            if take(layer, heads, budget):
                budget -= len(heads)
    return {layer: sorted(h) for layer, h in chosen.items() if h}


__all__ = ["SCORES", "attention_scores", "calibration_batches", "head_scores",
           "magnitude_scores", "normalize_per_layer", "select_heads", "taylor_scores",
           "wanda_scores"]
