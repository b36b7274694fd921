"""slimc.report: the HTML/Markdown/JSON report, its PNGs, and that it renders in a real browser.

The pictures are checked against the data they show: the heatmap is decoded back through the
viridis colour map cell by cell (so a transposed, shifted or wrong grid fails), removed heads must
carry the red × and kept heads must not, and each plotted series' colour must be in its PNG.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from zoo import ZOO, to_onnx

import slimc
from slimc import passes
from slimc.errors import OptionError
from slimc.passes import PassManager
from slimc.report import MISSING, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTION_TABLES = {"passes": "passes-table", "heads": "heads-table",
                  "accuracy": "accuracy-table", "latency": "latency-table"}


# ---------------------------------------------------------------------------------------------
# helpers


def _read_png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50, img.shape
    return img[..., :3].astype(np.float64)


def _viridis_index(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel: the nearest viridis entry (0..255) and the distance to it (computed once
    per distinct colour: screenshots have millions of pixels but few colours)."""
    import matplotlib
    lut = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3]
    q = np.round(img * 255).astype(np.int64)
    packed = (q[..., 0] << 16) | (q[..., 1] << 8) | q[..., 2]
    colours, inverse = np.unique(packed.ravel(), return_inverse=True)
    rgb = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1) / 255
    d = np.linalg.norm(rgb[:, None, :] - lut[None], axis=2)
    best, dist = d.argmin(1)[inverse], d.min(1)[inverse]
    return best.reshape(img.shape[:2]), dist.reshape(img.shape[:2])


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of the runs of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def _decode_heatmap(path: Path, layers: int, heads: int):
    """The heatmap PNG read back: per cell the normalised value (0..1) its colour encodes, and
    whether a red × is drawn in it."""
    img = _read_png(path)
    index, dist = _viridis_index(img)
    is_v = dist < 0.03
    col = is_v.sum(0)
    runs = _runs(col > 0.5 * col.max())
    x0, x1 = max(runs, key=lambda r: r[1] - r[0])  # the heatmap; its colour bar is narrow
    assert any(r[0] > x1 for r in runs), f"no colour bar right of the heatmap: {runs}"
    rows = _runs(is_v[:, x0:x1].mean(1) > 0.5)
    y0, y1 = max(rows, key=lambda r: r[1] - r[0])
    cw, ch = (x1 - x0) / heads, (y1 - y0) / layers
    values = np.zeros((layers, heads))
    crossed = np.zeros((layers, heads), dtype=bool)
    for i in range(layers):
        for h in range(heads):
            top, left = y0 + i * ch, x0 + h * cw
            # a corner patch (the × sits in the middle of the cell)
            patch = index[int(top + 0.1 * ch):int(top + 0.3 * ch) + 1,
                          int(left + 0.1 * cw):int(left + 0.3 * cw) + 1]
            values[i, h] = np.median(patch) / 255
            mid = img[int(top + 0.25 * ch):int(top + 0.75 * ch),
                      int(left + 0.25 * cw):int(left + 0.75 * cw)]
            red = (mid[..., 0] > 0.8) & (mid[..., 1] < 0.35) & (mid[..., 2] < 0.35)
            crossed[i, h] = red.sum() >= 5
    return values, crossed


def _has_colour(img: np.ndarray, hex_colour: str, min_pixels: int = 30) -> bool:
    rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img - rgb).max(axis=2) < 0.04).sum()) >= min_pixels


def _median_ms(g, inputs, repeat=5) -> float:
    g.run(*inputs)  # warm-up: the first run pays one-off costs
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        g.run(*inputs)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def _cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


# ---------------------------------------------------------------------------------------------
# a report of a real run on the tiny BERT


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    module, inputs, _ = ZOO["bert"]()
    g = slimc.capture(module, inputs)
    x = g.example_inputs
    steps = [("prune_heads", {"ratio": 0.25, "score": "magnitude"}),
             ("threshold_weights", {"sparsity": 0.3}), ("cleanup", {})]
    _, report = PassManager(steps).run(g, check_inputs=[x])
    ref = g.run(*x)[0]
    accuracy = []  # measured here: how far head pruning moves the outputs
    for ratio in (0.0, 0.25, 0.5):
        out = passes.prune_heads(g, ratio=ratio).run(*x)[0]
        accuracy.append({"compression": ratio, "cosine to original": _cosine(out, ref),
                         "setting": f"prune_heads(ratio={ratio})"})
    latency = []  # measured here: torch on the thresholded graph
    for sparsity in (0.0, 0.5, 0.9):
        t = passes.threshold_weights(g, sparsity=sparsity)
        latency.append({"sparsity": 1 - t.nonzeros() / t.num_parameters(),
                        "torch ms": _median_ms(t, x)})
    folder = tmp_path_factory.mktemp("report")
    paths = write_report(folder, model="zoo bert", report=report, accuracy=accuracy,
                         latency=latency)
    return {"folder": folder, "paths": paths, "report": report, "accuracy": accuracy,
            "latency": latency,
            "data": json.loads((folder / "report.json").read_text(encoding="utf-8"))}


def test_files_written_atomically(bert_run):
    folder = bert_run["folder"]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["accuracy.png", "heads.png", "index.html", "latency.png", "report.json",
                     "report.md"]  # no temporary file left behind, no tuning picture invented
    for key in ("heads", "accuracy", "latency"):
        _read_png(bert_run["paths"][key])


def test_heatmap_shows_the_prune_heads_scores(bert_run):
    stats = bert_run["report"]["prune_heads"].stats
    heads = bert_run["data"]["heads"]
    assert heads["score"] == "magnitude" and heads["layers"] == [0, 1]
    assert heads["scores"] == [stats["scores"][0], stats["scores"][1]]
    grid = np.array(heads["scores"])
    assert grid.shape == (2, 4)  # layers × heads of the zoo BERT
    values, crossed = _decode_heatmap(bert_run["paths"]["heads"], *grid.shape)
    want = (grid - grid.min()) / (grid.max() - grid.min())
    np.testing.assert_allclose(values, want, atol=0.02)
    removed = np.zeros(grid.shape, dtype=bool)
    for layer, hs in stats["removed"].items():
        removed[layer, hs] = True
    assert removed.sum() == 2  # 25 % of 8 heads
    np.testing.assert_array_equal(crossed, removed)
    assert {int(k): v for k, v in heads["removed"].items()} == \
        {k: v for k, v in stats["removed"].items() if v}


def test_line_plots_hold_the_measured_series(bert_run):
    data = bert_run["data"]
    acc = data["accuracy"]
    assert acc["x"] == "compression" and list(acc["series"]) == ["cosine to original"]
    assert acc["series"]["cosine to original"] == {
        "x": [r["compression"] for r in bert_run["accuracy"]],
        "y": [r["cosine to original"] for r in bert_run["accuracy"]]}
    assert acc["series"]["cosine to original"]["y"][0] == pytest.approx(1.0, abs=1e-6)
    lat = data["latency"]
    want = sorted(bert_run["latency"], key=lambda r: r["sparsity"])
    assert lat["series"]["torch ms"] == {"x": [r["sparsity"] for r in want],
                                         "y": [r["torch ms"] for r in want]}
    # the first series is drawn in matplotlib's first colour, and the pictures differ
    for key in ("accuracy", "latency"):
        img = _read_png(bert_run["paths"][key])
        assert _has_colour(img, "#1f77b4"), f"{key}.png has no line"
        assert not _has_colour(img, "#ff7f0e"), f"{key}.png has a second line"
    assert bert_run["paths"]["accuracy"].read_bytes() != bert_run["paths"]["latency"].read_bytes()


def test_markdown_and_json_match_the_pass_report(bert_run):
    report, data = bert_run["report"], bert_run["data"]
    assert data["passes"] == report.to_dict()
    md = (bert_run["folder"] / "report.md").read_text(encoding="utf-8")
    html_text = (bert_run["folder"] / "index.html").read_text(encoding="utf-8")
    for row in report.rows:
        cells = f"| {row.name} | {row.contract}"
        assert cells in md, cells
        assert f"<td>{row.name}</td>" in html_text
        assert f"{row.parameters:,}" in md
    assert "![magnitude importance heatmap](heads.png)" in md
    # sections without data: one line, no table, listed in the JSON
    assert set(data["not_measured"]) == {"before_after", "front", "target", "tuning"}
    assert md.count(MISSING) == 4 and html_text.count(MISSING) == 4
    assert data["tuning"] is None and "tuning-table" not in html_text


def test_rewrite_replaces_and_a_bad_row_leaves_the_old_report(tmp_path):
    first = write_report(tmp_path, model="m", head_scores=[[1.0, 2.0], [3.0, 4.0]],
                         latency=[{"sparsity": 0.0, "ms": 2.0}, {"sparsity": 0.5, "ms": 1.5}])
    assert {"heads", "latency"} <= set(first)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(OptionError, match="not a number"):
        write_report(tmp_path, model="m", accuracy=[{"compression": "20 %", "acc": 0.9}])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    write_report(tmp_path, model="m2")  # nothing measured: every picture of the old one goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "report.json",
                                                         "report.md"]
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert data["model"] == "m2" and len(data["not_measured"]) == 8


def test_tuning_and_target_sections(tmp_path):
    from slimc.codegen.tune import TaskStatus, TuneSummary
    tasks = [TaskStatus(f"fused_matmul{i}", weight=2, flops=1e6 * (i + 1), trials=8,
                        budget=8, best_ms=0.01 * (i + 1), done=True) for i in range(3)]
    summary = TuneSummary(tasks=3, tuned=3, skipped=0, trials=24, records=24, seconds=1.5,
                          estimated_ms=0.12, per_task=tasks, history=[(0.5, 0.2), (1.0, 0.12)])
    write_report(tmp_path, model="m", tuning=summary,
                 target={"target": "x86", "cpu": "znver4", "features": {"avx2": True}})
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| fused_matmul2 | 2 | 3.00 | 8 | 0.0300 |" in md  # most expensive first
    assert md.index("fused_matmul2") < md.index("fused_matmul0")
    assert "| features | avx2: yes |" in md
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert data["tuning"]["seconds_to_90_percent"] == summary.seconds_to_reach(0.9)


def test_demo_report_tables(tmp_path):
    from slimc import demo
    row = {"heads": 72, "parameters": 1000, "onnx_bytes": 4000, "tvm_ms": 8.0, "ort_ms": 16.0,
           "torch_ms": 200.0, "wordsim": 0.73, "polarity": 0.73, "tvm_vs_torch": 1e-7,
           "metric_executor": "TVM"}
    after = dict(row, heads=54, parameters=900, tvm_ms=7.0, wordsim=0.71)
    stats = {"score": "magnitude", "scores": {0: [1.0, 2.0, 3.0], 1: [0.5, 4.0, 2.5]},
             "removed": {0: [0], 1: [0]}}
    demo._write_report(str(tmp_path), {"original": row, "slimc": after}, stats,
                       {"cpu": "znver4", "cores": 2}, 128)
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert [r[""] for r in data["before_after"]][:2] == ["attention heads", "parameters"]
    assert data["before_after"][0]["change"] == "-25.0%"
    assert data["accuracy"]["series"]["WordSim-353 Spearman"] == {"x": [0.0, 0.25],
                                                                  "y": [0.73, 0.71]}
    assert data["latency"]["series"]["torch (ms)"]["y"] == [200.0, 200.0]
    assert data["heads"]["scores"] == [[1.0, 2.0, 3.0], [0.5, 4.0, 2.5]]
    assert data["not_measured"] == ["passes", "front", "tuning"]


# ---------------------------------------------------------------------------------------------
# in a real browser


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("Chromium is not installed, and the report test opens the page in it: run "
                    "./setup.sh --test (it installs Debian's chromium).")
    return exe


def _browser(args: list[str], page: Path, profile: Path) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--force-device-scale-factor=1",
           "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000", *args,
           page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


class _Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append(attrs.get("id"))
        elif tag == "img":
            self.images.append(attrs.get("src"))

    def handle_data(self, data):
        self.text.append(data)


def test_renders_in_headless_chromium(bert_run, tmp_path):
    page = bert_run["folder"] / "index.html"
    shot = tmp_path / "shot.png"
    _browser([f"--screenshot={shot}", "--window-size=1200,3600"], page, tmp_path / "profile")
    img = _read_png(shot)
    assert img.shape[:2] == (3600, 1200)
    assert img.std() > 0.05, "the screenshot is blank"
    # the page's own colours are greys; viridis and the line colour come only from the PNGs,
    # so finding them in the screenshot shows the browser loaded and drew the pictures
    _, dist = _viridis_index(img)
    _, heat = _viridis_index(_read_png(bert_run["paths"]["heads"]))
    assert (dist < 0.03).sum() >= 0.9 * (heat < 0.03).sum()
    blue = sum(_has_colour(_read_png(bert_run["paths"][k]), "#1f77b4", 1)
               for k in ("accuracy", "latency"))
    assert blue == 2 and _has_colour(img, "#1f77b4", 200)

    dom = _Dom()
    dom.feed(_browser(["--dump-dom"], page, tmp_path / "profile").stdout)
    assert set(SECTION_TABLES.values()) <= set(dom.tables)
    assert sorted(dom.images) == ["accuracy.png", "heads.png", "latency.png"]
    for src in dom.images:
        assert (page.parent / src).read_bytes()[:8] == PNG_MAGIC
    text = " ".join(dom.text)
    assert "prune_heads" in text and "threshold_weights" in text
    assert text.count(MISSING) == 4  # before_after, front, target, tuning


# ---------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "bert.onnx"
    path.write_bytes(to_onnx("bert").SerializeToString())
    return path


def test_optimize_report_cli(bert_onnx, tmp_path, capsys):
    from slimc.cli import main
    model = bert_onnx
    out, rep = tmp_path / "small.onnx", tmp_path / "rep"
    assert main(["optimize", str(model), "-o", str(out), "--prune-heads", "0.25",
                 "--report", str(rep)]) == 0
    assert "index.html" in capsys.readouterr().err
    names = {p.name for p in rep.iterdir()}
    assert names == {"index.html", "report.md", "report.json", "heads.png"}
    data = json.loads((rep / "report.json").read_text(encoding="utf-8"))
    assert [p["name"] for p in data["passes"]["passes"]] == ["prune_heads", "cleanup"]
    assert np.array(data["heads"]["scores"]).shape == (2, 4)
    assert sum(map(len, data["heads"]["removed"].values())) == 2
    assert set(data["not_measured"]) == {"before_after", "accuracy", "latency", "front",
                                         "target", "tuning"}
    _read_png(rep / "heads.png")
    md = (rep / "report.md").read_text(encoding="utf-8")
    assert "| prune_heads |" in md and "![magnitude importance heatmap](heads.png)" in md
    assert sum(b.num_heads for b in slimc.load(out).attention_blocks()) == 6


def test_optimize_report_cli_recipe_target(bert_onnx, tmp_path):
    from slimc.cli import main
    from slimc.codegen import host_cpu
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\nname = "threshold_weights"\nsparsity = 0.5\n\n'
                      '[compile]\ntarget = "x86"\n', encoding="utf-8")
    rep = tmp_path / "rep"
    assert main(["optimize", str(bert_onnx), "-o", str(tmp_path / "o.onnx"), "--recipe",
                 str(recipe), "--report", str(rep)]) == 0
    data = json.loads((rep / "report.json").read_text(encoding="utf-8"))
    cpu = host_cpu()
    assert data["target"]["target"] == "x86" and data["target"]["cpu"] == cpu["cpu"]
    assert data["heads"] is None and not (rep / "heads.png").exists()  # no scores: no picture
    md = (rep / "report.md").read_text(encoding="utf-8")
    assert f"| cpu | {cpu['cpu']} |" in md
