"""The ``slimc`` command.

Every user error is a :class:`slimc.SlimcError`: the CLI prints its message and exits with code 2,
without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputFileError, OptionError, SlimcError


def _parse_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items or []:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise OptionError(f"Cannot read the input shape {item!r}.",
                              "Write it as NAME=1x128 (dimensions separated by 'x').") from None
        if not name or any(d <= 0 for d in shapes[name]):
            raise OptionError(f"Input shape {item!r} is not valid.",
                              "Write it as NAME=1x128 with positive dimensions.")
    return shapes


def _parse_target_options(items: list[str] | None, num_cores: int | None = None) -> dict:
    """``--target-option KEY=VALUE`` (repeatable; integers and true/false are converted)."""
    options: dict = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise OptionError(f"Cannot read the target option {item!r}.",
                              "Write it as KEY=VALUE, e.g. --target-option board=rpi4.")
        low = value.strip().lower()
        options[key.strip()] = (True if low == "true" else False if low == "false"
                                else int(low) if low.lstrip("-").isdigit() else value.strip())
    if num_cores is not None:
        options["num_cores"] = num_cores
    return options


def _load_model(path: str):
    from . import load
    return load(path)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.1f}P"


def _table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(out)


def inspect_graph(g) -> dict:
    """What ``slimc inspect`` reports, as a JSON-able dict."""
    blocks = g.attention_blocks()
    params = g.num_parameters()
    nnz = g.nonzeros()
    # NaN / inf weights are valid ONNX and run, but corrupt every pass that measures weights
    # (quantize, threshold_weights, factorize_low_rank refuse them): say so up front
    nonfinite = {}
    for name, w in g.iter_weights():   # one at a time: weights() holds them all
        if np.issubdtype(w.dtype, np.floating):
            bad = int(w.size - np.count_nonzero(np.isfinite(w)))
            if bad:
                nonfinite[name] = bad
    return {
        "backend": g.backend,
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype}
                   for s in g.input_specs()],
        "parameters": params,
        "nonzeros": nnz,
        "sparsity": 0.0 if params == 0 else 1 - nnz / params,
        "serialized_bytes": g.serialized_size(),
        "nonfinite_weights": nonfinite,
        "attention": [{"layer": b.layer, "name": b.name, "heads": b.num_heads,
                       "kv_heads": b.num_kv_heads, "head_dim": b.head_dim, "form": b.form,
                       "fused_qkv": b.fused_qkv,
                       "weights": {k: getattr(b, k).weight for k in "qkvo"}} for b in blocks],
        "ops": dict(g.op_histogram().most_common()),
    }


def cmd_inspect(args) -> int:
    g = _load_model(args.model)
    info = inspect_graph(g)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model       {args.model}  ({info['backend']})")
    for s in info["inputs"]:
        print(f"input       {s['name']}: {s['dtype']}{s['shape']}")
    print(f"parameters  {info['parameters']:,}  ({_human(info['parameters'])})")
    print(f"sparsity    {info['sparsity']:.1%} zeros")
    print(f"size        {info['serialized_bytes']:,} bytes")
    bad = info["nonfinite_weights"]
    if bad:
        listed = ", ".join(f"{k} ({n})" for k, n in list(bad.items())[:8])
        print(f"WARNING     {sum(bad.values()):,} non-finite (NaN/inf) weight values in "
              f"{len(bad)} weight(s): {listed}{' ...' if len(bad) > 8 else ''}; quantize, "
              "threshold_weights and factorize_low_rank refuse them")
    att = info["attention"]
    total = sum(a["heads"] for a in att)
    print(f"\nattention   {len(att)} blocks, {total} heads")
    if att:
        rows = [[a["layer"], a["name"], a["heads"], a["kv_heads"], a["head_dim"], a["form"],
                 "yes" if a["fused_qkv"] else "no"] for a in att]
        print(_table(rows, ["layer", "name", "heads", "kv_heads", "head_dim", "form",
                            "fused_qkv"]))
    print("\nops")
    print(_table([[k, v] for k, v in info["ops"].items()], ["op", "count"]))
    return 0


def cmd_compile(args) -> int:
    import warnings

    from .codegen import compile as slimc_compile
    from .codegen.select import SlowInt8Warning, describe_kernels
    g = _load_model(args.model)
    print(f"slimc: compiling {args.model} for {args.target} ...", file=sys.stderr)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", SlowInt8Warning)
        art = slimc_compile(g, target=args.target,
                            input_shapes=_parse_shapes(args.input_shape) or None,
                            tune=None if args.no_schedules else "default", db=args.db,
                            target_options=_parse_target_options(args.target_option) or None)
    for w in said:
        if issubclass(w.category, SlowInt8Warning):
            print(f"slimc: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    art.save(args.output)
    kernels = art.metadata.get("kernels")
    if kernels:
        print(f"slimc: kernels: {describe_kernels(kernels)} ({art.metadata['schedules']})",
              file=sys.stderr)
    ranges = art.metadata.get("index_ranges", {})
    if ranges:
        listed = ", ".join(f"{k} in [{lo}, {hi}]" for k, (lo, hi) in ranges.items())
        print(f"slimc: index inputs checked before each call: {listed}", file=sys.stderr)
    for gather in art.metadata.get("clipped_indices", []):
        print(f"slimc: note: gather of computed indices ({gather}) compiled in clip mode: an "
              "index out of range reads the nearest row (not checked per call)", file=sys.stderr)
    print(f"slimc: wrote {args.output}", file=sys.stderr)
    return 0


def cmd_tune(args) -> int:
    from .codegen.tune import summary_json, tune_graph
    if args.trials is None and args.seconds is None:
        raise OptionError("slimc tune needs a budget.", "Pass --trials N and/or --seconds S.")
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise OptionError("--rpc-tracker and --rpc-key go together.",
                          "Pass both, e.g. --rpc-tracker 127.0.0.1:9190 --rpc-key rpi4.")
    options = _parse_target_options(args.target_option, args.num_cores)
    runner = None
    if args.rpc_tracker:
        from .codegen.rpc import rpc_runner
        runner = rpc_runner(args.rpc_tracker, args.rpc_key)
    g = _load_model(args.model)
    summary = tune_graph(g, args.target, db=args.db, trials=args.trials, seconds=args.seconds,
                         input_shapes=_parse_shapes(args.input_shape) or None,
                         target_options=options or None, progress=not args.quiet, runner=runner)
    print(json.dumps(summary_json(summary), indent=2) if args.json else summary.table())
    if summary.interrupted:
        print(f"slimc: interrupted; the records so far are in {args.db} (run again to resume)",
              file=sys.stderr)
        return 130
    return 0


def _read_inputs(path: str, specs) -> list[np.ndarray]:
    from .errors import InputFileError
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"No such inputs file: {p}.", "Pass an .npz written by numpy.savez.")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise InputFileError(f"{p} is not a readable .npz file ({type(e).__name__}).",
                             "Write it with numpy.savez(path, name=array, ...).") from e
    names = [s["name"] if isinstance(s, dict) else s.name for s in specs]
    if all(n in arrays for n in names):
        return [arrays[n] for n in names]
    positional = [f"arr_{i}" for i in range(len(names))]
    if all(n in arrays for n in positional):
        return [arrays[n] for n in positional]
    raise OptionError(f"{p} holds arrays {sorted(arrays)} but the model takes inputs {names}.",
                      "Name the arrays after the model's inputs (numpy.savez(path, "
                      + ", ".join(f"{n}=..." for n in names) + ")).")


def _write_npz(path: str, arrays: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".npz", dir=p.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cmd_run(args) -> int:
    from . import runtime
    m = runtime.load(args.artifact)
    inputs = _read_inputs(args.inputs, m.input_specs)
    outputs = m(*inputs)
    for name, out in zip(m.output_names, outputs):
        print(f"{name}: {out.dtype}{list(out.shape)}  mean={float(np.mean(out)):.6g} "
              f"max|x|={float(np.max(np.abs(out))) if out.size else 0:.6g}")
    if args.output:
        _write_npz(args.output, dict(zip(m.output_names, outputs)))
        print(f"slimc: wrote {args.output}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from . import runtime
    m = runtime.load(args.artifact)
    stats = m.benchmark(repeat=args.repeat, warmup=args.warmup)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(_table([[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in stats.items()],
                     ["statistic", "value"]))
    return 0


def _read_calib(path: str | None, g) -> list[tuple] | None:
    """Calibration batches from an .npz: per model input, an array of shape (N, *input_shape)
    (N batches), named after the input (or arr_0, arr_1, ... by position)."""
    if path is None:
        return None
    stacked = _read_inputs(path, g.input_specs())
    counts = {a.shape[0] if a.ndim else 0 for a in stacked}
    if len(counts) != 1 or 0 in counts:
        raise OptionError(f"{path}: every input needs the same number of calibration batches "
                          "along axis 0.", "Stack N batches per input: shape (N, *input_shape).")
    n = counts.pop()
    batches = [tuple(a[i] for a in stacked) for i in range(n)]
    from .ir.graph import check_inputs
    try:  # here, not in whichever pass first runs them, so the message names the file
        check_inputs(g.input_specs(), batches[0], exact_dtype=g.backend == "onnx")
    except SlimcError as e:
        raise type(e)(f"{path}: calibration batch 0: {e.problem}",
                      "Stack N batches per input: shape (N, *input_shape), the input's "
                      "dtype.") from None
    return batches


def _pattern_block(args) -> dict:
    opts: dict = {}
    if args.pattern:
        opts["pattern"] = args.pattern
    if args.block:
        try:
            r, c = (int(x) for x in args.block.lower().split("x"))
        except ValueError:
            raise OptionError(f"--block {args.block!r} is not ROWSxCOLS.",
                              "Write it like --block 1x8.") from None
        opts["block"] = (r, c)
    return opts


def optimize_steps(args) -> list[tuple[str, dict]]:
    """The pass list that ``slimc optimize``'s flags ask for, in the recommended order:
    prune heads → low-rank → threshold → fuse → quantize → fold → cleanup."""
    steps: list[tuple[str, dict]] = []
    if args.prune_heads is not None:
        opts = {"ratio": args.prune_heads, "score": args.score}
        if args.scope:
            opts["scope"] = args.scope
        steps.append(("prune_heads", opts))
    if args.low_rank is not None:
        steps.append(("factorize_low_rank", {"energy": args.low_rank}))
    chosen = [f for f in ("threshold", "sparsity") if getattr(args, f) is not None]
    if len(chosen) > 1:
        raise OptionError("--threshold and --sparsity are alternatives.", "Give one of them.")
    if args.pattern and args.block:
        raise OptionError("--pattern and --block are alternatives.", "Give one of them.")
    imp = {"importance": args.importance} if args.importance != "magnitude" else {}
    if args.threshold is not None:
        steps.append(("threshold_weights", {"tau": args.threshold, **_pattern_block(args),
                                            **imp}))
    elif args.sparsity is not None:
        if args.pattern:
            raise OptionError("--pattern N:M fixes the sparsity itself (N/M non-zeros).",
                              "Drop --sparsity, or use --block with --sparsity.")
        steps.append(("threshold_weights", {"sparsity": args.sparsity, **_pattern_block(args),
                                            **imp}))
    elif args.pattern:
        steps.append(("threshold_weights", {"pattern": args.pattern, **imp}))
    elif args.block:
        raise OptionError("--block needs --sparsity (the fraction of blocks to zero).",
                          "Add --sparsity S.")
    if args.fuse:
        steps.append(("fuse", {}))
    if args.quantize is not None:
        if args.quantize != "int8":
            raise OptionError(f"--quantize {args.quantize!r} is not supported.",
                              "Use --quantize int8.")
        opts = {"method": args.method}
        if args.smooth is not None:
            opts["smooth"] = args.smooth
            if args.smooth_mode != "fold":
                opts["smooth_mode"] = args.smooth_mode
        steps.append(("quantize", opts))
        steps.append(("fold_fake_quant", {}))
    if not args.no_cleanup:
        steps.append(("cleanup", {}))
    return steps


def cmd_optimize(args) -> int:
    from .recipe import Recipe
    out = Path(args.output)
    if out.suffix not in (".onnx", ".pt2"):
        raise OptionError(f"-o {out}: the output must be a .onnx or .pt2 file.",
                          "Name the output model.onnx (or model.pt2 for FX graphs).")
    g = _load_model(args.model)
    steps = optimize_steps(args)
    if args.recipe:
        recipe = Recipe.load(args.recipe)
        if any(name != "cleanup" for name, _ in steps):
            raise OptionError("--recipe and pass flags (--prune-heads, --threshold, ...) are "
                              "alternatives.", "Put every pass in the recipe.")
    else:
        recipe = Recipe(steps, name="command line")
    calib = _read_calib(args.calib, g)
    check = [g.sample_inputs()] if not args.no_check else None
    print(f"slimc: {len(recipe.passes)} pass(es): "
          + " → ".join(n for n, _ in recipe.passes), file=sys.stderr)
    new, report = recipe.apply(g, calib=calib, check_inputs=check)
    print(report.table())
    new.save(out)
    print(f"slimc: wrote {out}", file=sys.stderr)
    if args.report:
        _write_report(args.report, args.model, report, recipe)
    return 0


def _write_report(folder: str, model: str, report, recipe=None) -> None:
    """``--report DIR``: the page, Markdown and JSON of slimc.report (the pass table, the head
    scores when prune_heads ranked heads, the recipe's compile target when it names one)."""
    from .report import write_report
    target = None
    if recipe is not None and recipe.compile.get("target"):
        target = dict(recipe.compile)
        if target["target"] == "x86":  # what "x86" means on this machine
            from .codegen import host_cpu
            target.update(host_cpu())
    paths = write_report(folder, model=model, report=report, target=target)
    print(f"slimc: wrote the report {paths['html']} (and report.md, report.json)",
          file=sys.stderr)


def cmd_passes(args) -> int:
    from . import passes
    from .passes.fuse import CATALOGUE, SETS, USER_RULES
    rows = []
    for info in passes.list_passes():
        kind = "exact" if info.contract.exact else "lossy"
        summary = info.doc.splitlines()[0] if info.doc else ""
        rows.append([info.name, kind, ", ".join(info.options), summary])
    print(_table(rows, ["pass", "numerics", "options", "summary"]))
    # fuse's rules, by name as recipes take them (rules = ["DEFAULT", "my_rule"])
    rows = [[name, "user" if name in USER_RULES else
             next((s for s, rs in SETS.items() if s != "ORT" and name in rs), ""), rule.doc]
            for name, rule in CATALOGUE.items()]
    print()
    print(_table(rows, ["fusion rule", "set", "summary"]))
    return 0


def load_plugins(specs: list[str]) -> None:
    """Import what registers user passes and fusion rules: each ``--plugin`` (a ``.py`` file or
    a module name), then the modules installed packages name in the ``slimc.plugins``
    entry-point group."""
    import importlib
    import importlib.metadata
    import importlib.util
    found = [(spec, None) for spec in specs]
    found += [(ep.value, ep) for ep in importlib.metadata.entry_points(group="slimc.plugins")]
    for spec, ep in found:
        try:
            if ep is not None:
                ep.load()
            elif spec.endswith(".py"):
                path = Path(spec).resolve()
                if not path.is_file():
                    raise InputFileError(f"--plugin {spec}: no such file.", "Check the path.")
                loaded = sys.modules.get(path.stem)
                if loaded is not None and getattr(loaded, "__file__", None) == str(path):
                    continue  # main() called twice in one process: registered already
                mod_spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[path.stem] = module
                try:
                    mod_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[path.stem]
                    raise
            else:
                importlib.import_module(spec)
        except SlimcError:
            raise
        except Exception as e:
            raise InputFileError(f"Plugin {spec} failed to import: {type(e).__name__}: {e}",
                                 "Fix the plugin (run it with python to see the traceback).") \
                from e


def cmd_compress(args) -> int:
    from . import _atomic
    from .compression import (BudgetError, _check_budgets, compress, minilm_metrics,
                              parse_fraction, parse_latency)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise OptionError(f"-o {out} is a file.", "Name a folder (new or existing) for the "
                          "compressed model, its build and its report.")
    max_drop = parse_fraction(args.max_drop)
    latency, latency_ms = parse_latency(args.latency) if args.latency else (None, None)
    _check_budgets(max_drop, latency, latency_ms)  # before loading anything
    g = _load_model(args.model)
    calib = _read_calib(args.calib, g)
    metrics = None
    names = list(dict.fromkeys(args.metric or ["agreement"]))
    task = [n for n in names if n != "agreement"]
    if task:
        if "agreement" in names:
            raise OptionError("--metric agreement is the default metric; with task metrics "
                              "(wordsim, polarity) leave it out.", "Give --metric wordsim "
                              "--metric polarity, or no --metric.")
        ids = calib[0][0]
        if len(calib[0]) != 2 or np.asarray(ids).ndim != 2:
            raise OptionError(f"--metric {' '.join(task)} reads a sentence encoder taking "
                              "(input_ids, attention_mask) of shape (batch, sequence); "
                              f"{args.model} takes {len(calib[0])} input(s).",
                              "Use --metric agreement (the default) for other models.")
        metrics = minilm_metrics(seq=ids.shape[1], batch=ids.shape[0], which=task)
    shapes = {s.name: tuple(np.asarray(a).shape) for s, a in zip(g.input_specs(), calib[0])}
    res = compress(g, calib=calib, metrics=metrics, max_drop=max_drop, latency=latency,
                   latency_ms=latency_ms, target=args.target, input_shapes=shapes,
                   precisions=args.precision or ("fp32", "int8"),
                   recover_steps=args.recover_steps, max_steps=args.max_steps,
                   repeat=args.repeat, verbose=not args.quiet)
    print(res.table())
    print(f"\n{res.reason} ({res.seconds:.0f} s, {res.cpu or args.target})")
    if res.chosen is None:
        if args.report:
            from .report import write_report
            write_report(args.report, model=args.model, front=res)
            print(f"slimc: wrote the report of the search to {args.report}", file=sys.stderr)
        raise BudgetError(res.reason[0].upper() + res.reason[1:] + ".",
                          "Relax --max-drop or --latency, allow more steps (--max-steps), or "
                          "distill the cuts (--recover-steps, .pt2 models).")
    c = res.chosen
    tmp = _atomic.temp_dir(out)
    try:
        suffix = ".pt2" if g.backend == "fx" else ".onnx"
        c.graph.save(tmp / f"model{suffix}")
        shutil.copytree(c.artifact_dir, tmp / "build")
        from .report import write_report
        base = res.base
        rows = [{"": "latency (ms)", "original": base.latency_ms, "compressed": c.latency_ms},
                {"": "size on disk (MB)", "original": base.size_bytes / 1e6,
                 "compressed": c.size_bytes / 1e6},
                {"": "parameters", "original": base.params, "compressed": c.params}]
        rows += [{"": n, "original": base.metrics[n], "compressed": c.metrics[n]}
                 for n in base.metrics]
        write_report(tmp / "report", model=args.model, front=res, before_after=rows,
                     title=f"slimc compress: {args.model}")
        _atomic.write_text(tmp / "compress.json", json.dumps(res.to_json(), indent=2,
                                                                   default=str))
        _atomic.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(os.path.dirname(c.artifact_dir), ignore_errors=True)
    print(f"slimc: wrote {out}/model{suffix} ({c.name}), {out}/build (compiled), "
          f"{out}/report/index.html", file=sys.stderr)
    return 0


# the demo's default recipe (README, "The demo")
DEMO = {"drop": 1, "prune": 0.25, "ffn": 0.25, "recover_steps": 1000, "loss": "mse"}


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="slimc", description="Make Transformer models small and "
                                "fast: capture, compress, compile with TVM.")
    p.add_argument("--version", action="version", version=f"slimc {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE|FILE.py",
                   help="import a module or file that registers passes or fusion rules "
                        "(repeatable)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("inspect", help="attention blocks, parameters, sparsity, op histogram")
    s.add_argument("model", help="model file (.onnx or .pt2)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("compile", help="compile a model with TVM into an artifact directory")
    s.add_argument("model", help="model file (.onnx or .pt2)")
    s.add_argument("--target", default="x86", help="x86 (this CPU), arm, cuda, or a TVM target")
    s.add_argument("-o", "--output", required=True, help="artifact directory to write")
    s.add_argument("--input-shape", action="append", metavar="NAME=1x128",
                   help="static shape for an input with symbolic dimensions (repeatable)")
    s.add_argument("--db", metavar="DIR", help="tuning database written by `slimc tune`")
    s.add_argument("--no-schedules", action="store_true",
                   help="TVM's stock pipeline without slimc's default CPU schedules (slow)")
    s.add_argument("--target-option", action="append", metavar="KEY=VALUE",
                   help="option of a named target, e.g. board=rpi4, dotprod=true, num_cores=4, "
                   "arch=sm_90 (repeatable)")
    s.set_defaults(func=cmd_compile)

    s = sub.add_parser("tune", help="auto-tune kernels with MetaSchedule into a records database")
    s.add_argument("model", help="model file (.onnx or .pt2)")
    s.add_argument("--target", default="x86",
                   help="x86 (this CPU), arm, cuda (measured on this machine's GPU or over "
                   "--rpc-tracker), or a TVM llvm/cuda target")
    s.add_argument("--db", required=True, metavar="DIR",
                   help="records database (created, or extended and resumed)")
    s.add_argument("--trials", type=int, help="trial budget for the whole model")
    s.add_argument("--seconds", type=float, help="time budget in seconds")
    s.add_argument("--input-shape", action="append", metavar="NAME=1x128")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="summary as JSON")
    s.add_argument("--target-option", action="append", metavar="KEY=VALUE",
                   help="option of a named target, e.g. board=rpi4 (repeatable)")
    s.add_argument("--num-cores", type=int, metavar="N",
                   help="cores of the measuring device (needed for a device other than this CPU)")
    s.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="measure on the RPC servers registered at this TVM RPC tracker")
    s.add_argument("--rpc-key", metavar="KEY", help="device key of those RPC servers")
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("optimize", help="run compression / fusion passes and write the model")
    s.add_argument("model", help="model file (.onnx or .pt2)")
    s.add_argument("-o", "--output", required=True, help="output model (.onnx or .pt2)")
    s.add_argument("--recipe", help="TOML recipe listing passes and options (instead of flags)")
    s.add_argument("--prune-heads", type=float, metavar="RATIO",
                   help="remove this fraction of attention heads")
    s.add_argument("--score", default="magnitude",
                   choices=["magnitude", "taylor", "attention", "wanda"],
                   help="head importance score (taylor/attention/wanda need --calib)")
    s.add_argument("--scope", choices=["global", "per_layer"], help="head ranking scope")
    s.add_argument("--threshold", type=float, metavar="TAU", help="zero weights with |w| <= TAU")
    s.add_argument("--sparsity", type=float, metavar="S", help="zero this fraction of weights")
    s.add_argument("--pattern", metavar="N:M", help="N:M structured sparsity, e.g. 2:4")
    s.add_argument("--block", metavar="RxC", help="block sparsity with --sparsity, e.g. 1x8")
    s.add_argument("--importance", default="magnitude",
                   choices=["magnitude", "taylor", "wanda", "sparsegpt"],
                   help="weight importance for --sparsity/--pattern (taylor/wanda/sparsegpt "
                   "need --calib; sparsegpt also updates the weights it keeps)")
    s.add_argument("--low-rank", type=float, metavar="ENERGY",
                   help="truncated-SVD factorisation keeping this singular-value energy")
    s.add_argument("--fuse", action="store_true", help="apply the fusion rules")
    s.add_argument("--quantize", metavar="int8", help="quantize to int8 (fake-quant, then fold)")
    s.add_argument("--method", default="minmax",
                   choices=["minmax", "percentile", "entropy", "mse"],
                   help="quantization calibration method")
    s.add_argument("--smooth", type=float, metavar="ALPHA",
                   help="SmoothQuant before --quantize int8: migration strength in [0, 1] "
                   "(needs --calib)")
    s.add_argument("--smooth-mode", default="fold", choices=["fold", "insert"],
                   help="fold: only where the factors fold exactly into a LayerNorm/Linear; "
                   "insert: also post-norm models (BERT) with a per-channel Mul")
    s.add_argument("--calib", metavar="DATA.npz",
                   help="calibration batches: per input an array of shape (N, *input_shape)")
    s.add_argument("--no-cleanup", action="store_true", help="skip the final cleanup pass")
    s.add_argument("--no-check", action="store_true",
                   help="skip the numeric check after each pass")
    s.add_argument("--report", metavar="DIR",
                   help="write index.html, report.md, report.json and plots here")
    s.set_defaults(func=cmd_optimize)

    s = sub.add_parser("run", help="run a compiled artifact on inputs from an .npz file")
    s.add_argument("artifact", help="artifact directory written by `slimc compile`")
    s.add_argument("--inputs", required=True, help=".npz with one array per model input")
    s.add_argument("-o", "--output", help="write the outputs to this .npz")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("bench", help="time a compiled artifact on random inputs")
    s.add_argument("artifact", help="artifact directory written by `slimc compile`")
    s.add_argument("--repeat", type=int, default=20)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("passes", help="list the registered passes")
    s.add_argument("--list", action="store_true", help="list passes (the default)")
    s.set_defaults(func=cmd_passes)

    s = sub.add_parser("compress", help="search heads, FFN neurons, layers and int8 for a "
                       "latency / accuracy budget, every candidate compiled and measured")
    s.add_argument("model", help="model file (.onnx or .pt2)")
    s.add_argument("--calib", required=True, metavar="DATA.npz",
                   help="at least 4 input batches: per input an array (N, *input_shape); half "
                   "score and quantize, half are held out for the agreement metric")
    s.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder for model.onnx|.pt2, build/ (compiled), report/, compress.json")
    s.add_argument("--max-drop", default="1%",
                   help="largest relative loss of every metric (default 1%%)")
    s.add_argument("--latency", metavar="FRACTION|MSms",
                   help="latency budget: a fraction of the original build's (0.5) or ms (12ms)")
    s.add_argument("--metric", action="append", choices=["agreement", "wordsim", "polarity"],
                   help="agreement (default: cosine to the original on held-out calibration "
                   "batches); wordsim / polarity: the demo's task metrics, for "
                   "all-MiniLM-L6-v2-like sentence encoders (repeatable)")
    s.add_argument("--precision", action="append", choices=["fp32", "int8"],
                   help="precisions to build (repeatable; default both)")
    s.add_argument("--recover-steps", type=int, default=0,
                   help="distillation steps for each cut (.pt2 models only; 0: none)")
    s.add_argument("--max-steps", type=int, default=12, help="cuts along the search path")
    s.add_argument("--repeat", type=int, default=10, help="timed calls per candidate")
    s.add_argument("--target", default="x86", help="x86 (this CPU) or a TVM llvm target")
    s.add_argument("--report", metavar="DIR",
                   help="where the report goes when no candidate meets the budget")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=cmd_compress)

    s = sub.add_parser("demo", help="end-to-end demo on a real pretrained model")
    s.add_argument("--seq", type=int, default=128, help="sequence length")
    s.add_argument("--repeat", type=int, default=20,
                   help="timing rounds (original and slimc alternate in each)")
    s.add_argument("--drop", type=int, default=DEMO["drop"],
                   help="Transformer layers to drop, by block influence (default %(default)s)")
    s.add_argument("--prune", type=float, default=DEMO["prune"],
                   help="fraction of heads to remove (default %(default)s)")
    s.add_argument("--score", default="magnitude", choices=["magnitude", "taylor", "attention"])
    s.add_argument("--ffn", type=float, default=DEMO["ffn"],
                   help="fraction of FFN neurons to remove (default %(default)s)")
    s.add_argument("--recover-steps", type=int, default=DEMO["recover_steps"],
                   help="layer-mapped distillation steps after pruning (0: none; default "
                   "%(default)s)")
    s.add_argument("--loss", default=DEMO["loss"], choices=["mse", "cosine"],
                   help="distillation loss on the embedding (default %(default)s)")
    s.add_argument("--lr", type=float, default=1e-4, help="distillation learning rate")
    s.add_argument("--no-int8", dest="int8", action="store_false",
                   help="keep fp32 (default: int8 after distillation)")
    s.add_argument("--report", metavar="DIR",
                   help="write index.html, report.md, report.json and plots here")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        load_plugins(args.plugin)
        return args.func(args)
    except SlimcError as e:
        if args.debug:
            raise
        print(f"slimc: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("slimc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except Exception as e:  # a bug in slimc or a library: say so, keep the traceback for --debug
        if args.debug:
            raise
        print(f"slimc: internal error: {type(e).__name__}: {str(e).strip()[:500]}\n"
              "This is a bug in slimc (or a library it uses). Run again with --debug for the "
              "traceback and report it.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
