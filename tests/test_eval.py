"""slimc.eval's confidence intervals: the bootstrap itself on synthetic data with a known
answer (coverage, narrowing, determinism), and each metric's ``ci=True`` on cheap
deterministic fake embedders over the real data sets (no model), plus the held-out text."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from slimc import eval as ev
from slimc.errors import OptionError, SlimcError

DIM = 16


class FakeTok:
    """A tokenizer stand-in: each text becomes one id, a CRC of the text (0 for padding)."""

    def __call__(self, texts, padding=None, truncation=None, max_length=8, return_tensors=None):
        ids = np.zeros((len(texts), max_length), np.int64)
        ids[:, 0] = [zlib.crc32(t.encode()) if t else 0 for t in texts]
        return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}


def hash_embed(ids, mask):
    """A random unit vector per text, the same every run: no signal about anything."""
    out = np.stack([np.random.default_rng(int(i)).standard_normal(DIM) for i in ids[:, 0]])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


# -- the bootstrap ----------------------------------------------------------------------------
def test_estimate_formatting():
    e = ev.Estimate(0.72891, 0.67123, 0.77891, 353)
    assert str(e) == "0.7289 [0.671, 0.779]"
    assert float(e) == 0.72891
    assert e.half_width == pytest.approx(0.05384)
    assert e.contains(0.7) and not e.contains(0.8)
    with pytest.raises(AttributeError):
        e.value = 1.0  # frozen


def _mean_ci(x, **kw):
    return ev.bootstrap_ci(lambda idx: x[idx].mean(-1), len(x), vectorized=True, **kw)


def test_ci_contains_point_and_narrows_with_more_items():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.5, 1.0, 100), rng.normal(0.5, 1.0, 1600)
    a, b = _mean_ci(small), _mean_ci(large)
    for e, x in ((a, small), (b, large)):
        assert e.lo < e.value < e.hi and e.value == pytest.approx(x.mean())
        # the percentile interval of a mean is ~ ±1.96 standard errors
        se = x.std(ddof=1) / np.sqrt(len(x))
        assert e.half_width == pytest.approx(1.96 * se, rel=0.15)
    assert 3.0 < a.half_width / b.half_width < 5.3  # 16x the items: ~4x narrower


def test_ci_covers_the_true_value_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    hits = sum(_mean_ci(rng.exponential(1.0, 60), resamples=400, seed=k).contains(1.0)
               for k in range(300))
    assert 0.86 <= hits / 300 <= 0.99  # percentile bootstrap on a skewed mean undercovers a bit


def test_ci_is_deterministic_and_seeded():
    x = np.random.default_rng(3).normal(size=200)
    assert _mean_ci(x, seed=7) == _mean_ci(x, seed=7)
    assert _mean_ci(x, seed=7) != _mean_ci(x, seed=8)
    loop = ev.bootstrap_ci(lambda idx: x[idx].mean(), len(x), seed=7)
    assert (loop.lo, loop.hi) == pytest.approx((_mean_ci(x, seed=7).lo, _mean_ci(x, seed=7).hi))


def test_ci_level_orders_intervals():
    x = np.random.default_rng(4).normal(size=300)
    e80, e99 = _mean_ci(x, level=0.8), _mean_ci(x, level=0.99)
    assert e99.lo < e80.lo < e80.hi < e99.hi


@pytest.mark.parametrize("kw", [{"n_items": 1}, {"resamples": 0}, {"level": 1.0},
                                {"level": 0}])
def test_bootstrap_refuses_bad_options(kw):
    args = {"n_items": 10, **kw}
    with pytest.raises(OptionError):
        ev.bootstrap_ci(lambda idx: 0.0, args.pop("n_items"), **args)


def test_bootstrap_refuses_a_statistic_that_is_not_finite():
    with pytest.raises(SlimcError, match="not finite"):
        ev.bootstrap_ci(lambda idx: np.nan, 20)


def test_similarity_spearman_vectorised_matches_scipy():
    from scipy.stats import spearmanr
    rng = np.random.default_rng(5)
    human = rng.integers(0, 10, 353).astype(float)  # ties, as in the real scores
    cos = human + rng.normal(0, 3, 353)
    idx = rng.integers(0, 353, (5, 353))
    want = [spearmanr(cos[i], human[i]).statistic for i in idx]
    np.testing.assert_allclose(ev._spearman_rows(cos[idx], human[idx]), want, atol=1e-12)
    e = ev.similarity_spearman(cos, human, ci=True)
    assert e.value == pytest.approx(spearmanr(cos, human).statistic)
    assert e.lo < e.value < e.hi < 1.0
    assert ev.similarity_spearman(cos, human) == e.value  # ci=False: the same float


# -- the metrics on fake embedders --------------------------------------------------------------
def test_wordsim_with_random_embeddings_is_near_zero_and_its_ci_covers_zero():
    tok = FakeTok()
    plain = ev.wordsim_spearman(hash_embed, tok)
    e = ev.wordsim_spearman(hash_embed, tok, ci=True)
    assert isinstance(plain, float) and e.value == plain and e.n == 353
    assert abs(plain) < 0.15 and e.contains(0.0)
    assert 0.08 < e.half_width < 0.14  # ~1.96 / sqrt(353) for no correlation


def test_polarity_with_a_perfect_signal_is_near_one():
    texts, labels = ev.polarity()
    label_of = {zlib.crc32(t.encode()): y for t, y in zip(texts, labels)}

    def signal(ids, mask):
        out = hash_embed(ids, mask)
        out[:, 0] += [4.0 * (2 * label_of.get(int(i), 0) - 1) for i in ids[:, 0]]
        return out

    e = ev.polarity_accuracy(signal, FakeTok(), ci=True, repeats=3)
    assert e.n == 200 and e.value > 0.97 and e.lo > 0.94 and e.hi <= 1.0


def test_polarity_random_is_chance_and_ci_false_keeps_the_old_figure():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    tok = FakeTok()
    texts, labels = ev.polarity()
    x = ev.embed(hash_embed, tok, texts, 64, 32)
    old = float(cross_val_score(LogisticRegression(max_iter=2000), x, labels,
                                cv=StratifiedKFold(n_splits=5)).mean())
    assert ev.polarity_accuracy(hash_embed, tok) == old
    e = ev.polarity_accuracy(hash_embed, tok, ci=True, repeats=3)
    assert e.contains(0.5) and abs(e.value - 0.5) < 0.1
    assert e == ev.polarity_accuracy(hash_embed, tok, ci=True, repeats=3)  # deterministic


def test_teacher_agreement_is_one_against_itself_and_less_against_noise():
    tok = FakeTok()
    same = ev.teacher_agreement(hash_embed, hash_embed, tok, ci=True)
    assert same.value == pytest.approx(1.0) and same.lo == pytest.approx(1.0) and same.n == 100

    def noisy(ids, mask):
        return hash_embed(ids, mask) + 0.5 * hash_embed(ids + 1, mask)

    drift = ev.teacher_agreement(noisy, hash_embed, tok, ci=True)
    assert 0.8 < drift.lo < drift.value < drift.hi < 0.95  # 1/sqrt(1.25) ~ 0.894
    with pytest.raises(OptionError):
        ev.cosine_agreement(np.ones((3, 4)), np.ones((2, 4)))


def test_lee_spearman_random_covers_zero_with_a_document_bootstrap():
    e = ev.lee_spearman(hash_embed, FakeTok(), ci=True, resamples=200)
    assert e.n == 50 and e.contains(0.0)
    # 50 documents, not 1,225 independent pairs: wider than 1.96 / sqrt(1225)
    assert e.half_width > 1.96 / np.sqrt(1225)


def test_simlex_is_loaded_whole():
    rows = ev.simlex999()
    assert len(rows) == 999 and rows[0] == ("old", "new", 1.58)


# -- held-out text --------------------------------------------------------------------------
def test_heldout_text_is_disjoint_from_calibration_text():
    held = ev.heldout_text(145)
    assert len(held) == len(set(held)) == 145 and all(len(s.split()) >= 4 for s in held)
    assert ev.heldout_text() == held[:100]
    background = "\n".join(ev.lee_background())
    assert len(ev.lee_background()) == 300
    assert not [s for s in held if s in background]
    with pytest.raises(OptionError, match="145"):
        ev.heldout_text(146)


# -- the demo's table and report --------------------------------------------------------------
def _demo_rows():
    row = {"heads": 72, "parameters": 1000, "onnx_bytes": 4000, "tvm_ms": 8.0, "ort_ms": 16.0,
           "torch_ms": 200.0, "tvm_vs_torch": 1e-7, "metric_executor": "TVM",
           "wordsim": ev.Estimate(0.72891, 0.67123, 0.77891, 353),
           "polarity": ev.Estimate(0.8, 0.755, 0.845, 200),
           "agreement": ev.Estimate(1.0, 1.0, 1.0, 100)}
    after = dict(row, heads=54, wordsim=ev.Estimate(0.71, 0.65, 0.76, 353),
                 agreement=ev.Estimate(0.97, 0.965, 0.975, 100))
    return row, after


def test_demo_table_shows_each_metric_with_its_interval():
    from slimc import demo
    before, after = _demo_rows()
    table = {r[0]: r[1:] for r in demo._rows(before, after)}
    assert table["WordSim-353 Spearman"] == ("0.7289 [0.671, 0.779]", "0.7100 [0.650, 0.760]",
                                             "-2.6%")
    assert table["agreement with original (cos)"][1] == "0.9700 [0.965, 0.975]"
    assert "0.7289 [0.671, 0.779]" in demo._table(before, after)
    # an older caller's rows (plain floats, no agreement) still make a table
    plain = {k: float(v) if isinstance(v, ev.Estimate) else v for k, v in before.items()
             if k != "agreement"}
    rows = {r[0]: r[1:] for r in demo._rows(plain, plain)}
    assert rows["polarity accuracy"] == ("0.8000", "0.8000", "+0.0%")
    assert "agreement with original (cos)" not in rows


def test_demo_report_keeps_values_numeric_and_intervals_as_text(tmp_path):
    import json

    from slimc import demo
    before, after = _demo_rows()
    demo._write_report(str(tmp_path), {"original": before, "slimc": after},
                       {"score": "magnitude"}, {"cpu": "znver4", "cores": 2}, 128)
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    series = data["accuracy"]["series"]
    assert series["WordSim-353 Spearman"]["y"] == [0.72891, 0.71]
    assert series["agreement with original (cos)"]["y"] == [1.0, 0.97]
    assert data["accuracy"]["rows"][1]["WordSim-353 Spearman 95 % CI"] == "[0.650, 0.760]"
    assert "WordSim-353 Spearman 95 % CI" not in series


def test_wiki_text_is_clean_prose_disjoint_from_the_evaluation_text():
    paras = ev.wiki_text()
    assert len(paras) > 4000 and sum(len(p.split()) for p in paras) > 300_000
    assert not any(p.startswith(("{{", "[[", "|", "*")) for p in paras)
    assert sum("[[" in p or "{{" in p or "'''" in p for p in paras) < 0.01 * len(paras)
    corpus = " ".join(paras)
    texts, _ = ev.polarity()
    held = ev.heldout_text(145)
    assert not any(t in corpus for t in texts + held if len(t) > 40)


def test_distill_batches_shapes_lengths_and_determinism():
    tok, _ = ev.load_minilm()
    a = ev.distill_batches(tok, 64, 40, seed=3)
    b = ev.distill_batches(tok, 64, 40, seed=3)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    lengths = np.array([m.sum() for _, m in a])
    assert all(ids.shape == m.shape == (1, 64) for ids, m in a)
    assert (lengths == 64).sum() >= 10 and (lengths <= 41).sum() >= 10  # full and short
    for ids, m in a:
        n = int(m.sum())
        assert ids[0, 0] == tok.cls_token_id and ids[0, n - 1] == tok.sep_token_id
        assert (ids[0, n:] == tok.pad_token_id).all() and (m[0, :n] == 1).all()
    with pytest.raises(OptionError, match="distillation text"):
        ev.distill_batches(tok, 64, 2, source="imdb")
