"""Word n-gram language models with interpolated modified Kneser-Ney smoothing, written as ARPA.

    model = KneserNey.estimate(["ENTER SIX TWO FOUR", "ERASE C Q Q"], order=4)
    model.write_arpa("lm.arpa")          # for the beam-search decoder (KenLM reads it)
    model.logprob("SIX", ("ENTER",))     # log10 p(SIX | ENTER)

The estimate is Chen and Goodman's, as KenLM's ``lmplz`` makes it: the highest order uses counts,
lower orders the number of distinct words seen before an n-gram (continuation counts; n-grams that
start with ``<s>`` keep their counts), three discounts per order from its counts of counts, each
order interpolated with the one below and the unigrams with the uniform distribution over the
vocabulary (``<unk>`` gets that share). Interpolated probabilities are stored with their
interpolation weights as back-off weights, so the ARPA file gives exactly the interpolated model.

The counts live in Python dictionaries: fine for the transcripts of a labelled corpus (millions of
words); for far larger text, build the ARPA file with KenLM's ``lmplz`` and pass it instead.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
Ngram = tuple[str, ...]


def _discounts(adjusted: Counter) -> tuple[float, float, float]:
    """Modified Kneser-Ney's D1, D2, D3+ from the counts of counts of one order. Where a small
    corpus leaves them undefined or out of range, the usual fallback of 0.5, 1.0, 1.5 (Chen and
    Goodman's ranges: 0 < D_k < k)."""
    n = Counter(min(c, 4) for c in adjusted.values())
    fallback = (0.5, 1.0, 1.5)
    if not all(n[k] for k in (1, 2, 3, 4)):
        return fallback
    y = n[1] / (n[1] + 2 * n[2])
    found = (1 - 2 * y * n[2] / n[1], 2 - 3 * y * n[3] / n[2], 3 - 4 * y * n[4] / n[3])
    return tuple(d if 0 < d < k + 1 else f for k, (d, f) in enumerate(zip(found, fallback, strict=True)))


@dataclass
class KneserNey:
    """An estimated model: ``probs[n][ngram]`` log10 probabilities of the n-grams seen (order
    ``n`` = ``len(ngram)``), ``backoffs[ngram]`` log10 back-off weights of those seen as contexts."""

    order: int
    probs: list[dict[Ngram, float]]
    backoffs: dict[Ngram, float]

    @classmethod
    def estimate(cls, sentences: Iterable[str], order: int = 3) -> KneserNey:
        """``sentences``: one string per sentence, words separated by whitespace (already
        normalised: case, punctuation)."""
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        counts: Counter = Counter()
        for sentence in sentences:
            words = [BOS, *sentence.split(), EOS]
            if len(words) == 2:
                continue
            for n in range(1, order + 1):
                for i in range(len(words) - n + 1):
                    counts[tuple(words[i: i + n])] += 1
        if not counts:
            raise ValueError("no words in the text: the LM needs at least one non-empty sentence")
        # Adjusted counts: raw at the top order and for n-grams from <s>, else continuation counts.
        adjusted: list[Counter] = [Counter() for _ in range(order + 1)]
        for gram, c in counts.items():
            if len(gram) == order or gram[0] == BOS:
                adjusted[len(gram)][gram] += c
            if len(gram) > 1:  # gram[1:] was seen after one more distinct word
                suffix = gram[1:]
                if suffix[0] != BOS:
                    adjusted[len(suffix)][suffix] += 1
        adjusted[1].pop((BOS,), None)  # <s> is never predicted
        vocabulary = {g[0] for g in adjusted[1]} | {EOS, UNK}
        probs: list[dict[Ngram, float]] = [{} for _ in range(order + 1)]
        backoffs: dict[Ngram, float] = {}
        lower: dict[Ngram, float] = {}  # interpolated probabilities of the order below (linear)
        for n in range(1, order + 1):
            d1, d2, d3 = _discounts(adjusted[n])
            by_context: dict[Ngram, list[tuple[str, int]]] = defaultdict(list)
            for gram, c in adjusted[n].items():
                by_context[gram[:-1]].append((gram[-1], c))
            current: dict[Ngram, float] = {}
            for context, followers in by_context.items():
                total = sum(c for _, c in followers)
                kinds = Counter(min(c, 3) for _, c in followers)
                gamma = (d1 * kinds[1] + d2 * kinds[2] + d3 * kinds[3]) / total
                for word, c in followers:
                    discounted = (c - (d1, d2, d3)[min(c, 3) - 1]) / total
                    below = lower[(*context[1:], word)] if n > 1 else 1.0 / len(vocabulary)
                    current[(*context, word)] = discounted + gamma * below
                if n == 1:
                    current[(UNK,)] = current.get((UNK,), 0.0) + gamma / len(vocabulary)
                else:
                    backoffs[context] = math.log10(gamma) if gamma > 0 else -99.0
            probs[n] = {g: math.log10(p) for g, p in current.items()}
            lower = current
        probs[1][(BOS,)] = -99.0
        backoffs.setdefault((BOS,), 0.0)
        return cls(order, probs, backoffs)

    def logprob(self, word: str, context: Ngram = ()) -> float:
        """log10 p(word | context), backing off as a reader of the ARPA file does."""
        context = tuple(context)[-(self.order - 1):] if self.order > 1 else ()
        weight = 0.0
        while True:
            gram = (*context, word)
            if gram in self.probs[len(gram)]:
                return weight + self.probs[len(gram)][gram]
            if not context:
                return weight + self.probs[1][(UNK,)]
            weight += self.backoffs.get(context, 0.0)
            context = context[1:]

    @property
    def words(self) -> list[str]:
        """The vocabulary, without the sentence markers and ``<unk>``."""
        return sorted(g[0] for g in self.probs[1] if g[0] not in (BOS, EOS, UNK))

    def write_arpa(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n\\data\\\n")
            for n in range(1, self.order + 1):
                f.write(f"ngram {n}={len(self.probs[n])}\n")
            for n in range(1, self.order + 1):
                f.write(f"\n\\{n}-grams:\n")
                for gram in sorted(self.probs[n]):
                    line = f"{self.probs[n][gram]:.6f}\t{' '.join(gram)}"
                    if n < self.order and gram in self.backoffs:
                        line += f"\t{self.backoffs[gram]:.6f}"
                    f.write(line + "\n")
            f.write("\n\\end\\\n")
