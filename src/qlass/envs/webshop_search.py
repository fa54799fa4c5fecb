"""BM25 product search for WebShop, built on ``bm25s``.

WebShop searches a Lucene index through Pyserini (BM25 with k1 = 0.9, b = 0.4, an English analyzer:
lower-casing, Lucene's English stop words, Porter stemming) and shows the top 50 hits. This module
reproduces that ranking in-process with:

- ``bm25s`` — maintained (releases through 2025), numpy-only, scores a query against a sparse
  term-document matrix in microseconds for the 1,000-product catalog and milliseconds for the full
  1.18M products, and implements Lucene's BM25 variant (``method="lucene"``). ``rank-bm25`` was
  rejected: unmaintained since 2022 and it scores every document in pure Python per query.
  Running Pyserini itself would need a JVM and Lucene index files.
- ``PyStemmer`` — the Snowball project's C stemmers; its ``porter`` stemmer is the algorithm of
  Lucene's ``PorterStemFilter``.

Ties are broken by catalog order (as Lucene breaks them by document id), and only documents that
match at least one query term are returned, so a search is deterministic and can return nothing.
"""

from __future__ import annotations

import logging
import re
from array import array

import numpy as np

from ..errors import require

SEARCH_RETURN_N = 50
K1, B = 0.9, 0.4
# Lucene's default English stop-word set (EnglishAnalyzer.ENGLISH_STOP_WORDS_SET).
LUCENE_STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there "
    "these they this to was will with".split()
)
_TOKEN = re.compile(r"(?u)\b\w+\b")


class ProductSearch:
    """A BM25 index over product search texts, added one at a time, then :meth:`finish`-ed."""

    def __init__(self, k1: float = K1, b: float = B, top_n: int = SEARCH_RETURN_N) -> None:
        require("bm25s", "webshop")
        stemmer_mod = require("Stemmer", "webshop")
        self._stem = stemmer_mod.Stemmer("porter").stemWord
        self._cache: dict[str, str] = {}
        self._vocab: dict[str, int] = {}
        self._docs: list[array] = []  # compact int32 term ids (4 bytes a token: the full catalog fits)
        self.k1, self.b, self.top_n = k1, b, top_n
        self._bm25 = None

    def terms(self, text: str) -> list[str]:
        """The analysed terms of ``text``: lower-cased word tokens, stop words removed, stemmed."""
        out = []
        for word in _TOKEN.findall(text.lower()):
            if word in LUCENE_STOPWORDS:
                continue
            stem = self._cache.get(word)
            if stem is None:
                stem = self._cache[word] = self._stem(word)
            out.append(stem)
        return out

    def add(self, text: str) -> None:
        """Index the next document (documents are numbered in the order added)."""
        if self._bm25 is not None:
            raise RuntimeError("ProductSearch: add() after finish()")
        vocab = self._vocab
        self._docs.append(array("i", [vocab.setdefault(t, len(vocab)) for t in self.terms(text)]))

    def finish(self) -> ProductSearch:
        """Build the score matrix; the per-document token lists are released."""
        import bm25s

        # An empty document still needs a column; give it a token no query can produce.
        empty = self._vocab.setdefault("\x00", len(self._vocab))
        corpus = [doc or array("i", [empty]) for doc in self._docs]
        bm25 = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
        quiet = logging.getLogger("bm25s")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # bm25s logs every index build at DEBUG level on its own logger
        try:
            bm25.index((corpus, dict(self._vocab)), show_progress=False)
        finally:
            quiet.setLevel(level)
        self._bm25 = bm25
        self._n = len(corpus)
        self._docs = []
        return self

    def __len__(self) -> int:
        return self._n if self._bm25 is not None else len(self._docs)

    def search(self, keywords: str) -> list[int]:
        """Document numbers of the best ``top_n`` matches for ``keywords``, best first."""
        if self._bm25 is None:
            raise RuntimeError("ProductSearch: search() before finish()")
        ids = [self._vocab[t] for t in self.terms(keywords) if t in self._vocab]
        if not ids:
            return []
        scores = np.asarray(self._bm25.get_scores(ids), dtype=np.float64)
        hits = np.flatnonzero(scores > 0)
        if len(hits) > self.top_n:
            # keep every document tied with the n-th score, then order by (-score, document number)
            cut = np.partition(scores[hits], len(hits) - self.top_n)[len(hits) - self.top_n]
            hits = hits[scores[hits] >= cut]
        order = np.lexsort((hits, -scores[hits]))
        return [int(i) for i in hits[order][: self.top_n]]
