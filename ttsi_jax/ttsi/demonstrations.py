"""Ordinary in-context learning's demonstrations (the `icl` variant): for an input, the examples
of the training split most like it, by TF-IDF cosine similarity of their words.

The paper compares TT-SI's self-written in-context examples against "ordinary ICL with
training-set demonstrations" without saying how those were chosen; the nearest ones by request
and tools are the usual strong choice (kNN demonstrations), so the baseline is not a straw man.
No randomness: every seed shows an input the same demonstrations.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Sequence

from ttsi_jax.tasks.base import Example

_WORD = re.compile(r"[a-z0-9]+")


def words(example: Example) -> list[str]:
  """What similarity reads: the request, and the offered functions' names and descriptions (a
  name's parts too: `get_weather` gives get, weather)."""
  texts = [example.question]
  for function in example.functions:
    texts += [str(function.get("name", "")), str(function.get("description", ""))]
  return _WORD.findall(" ".join(texts).lower())


class Retriever:
  """The nearest pool examples to a query, by the cosine of TF-IDF vectors (smoothed idf,
  log(1 + N) / (1 + df)) + 1, as scikit-learn's TfidfVectorizer), ties to the earlier example."""

  def __init__(self, pool: Sequence[Example]):
    if not pool:
      raise ValueError("The training split has no examples to show as demonstrations.")
    self.pool = list(pool)
    counts = [collections.Counter(words(ex)) for ex in self.pool]
    df = collections.Counter(w for c in counts for w in c)
    self._idf = {w: math.log((1 + len(self.pool)) / (1 + n)) + 1 for w, n in df.items()}
    self._postings: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for index, c in enumerate(counts):
      weights = self._weights(c)
      for w, x in weights.items():
        self._postings[w].append((index, x))

  def _weights(self, counts: collections.Counter) -> dict[str, float]:
    """Unit-length TF-IDF weights of the words the pool knows (others match nothing)."""
    raw = {w: n * self._idf[w] for w, n in counts.items() if w in self._idf}
    norm = math.sqrt(sum(x * x for x in raw.values())) or 1.0
    return {w: x / norm for w, x in raw.items()}

  def ranked(self, example: Example) -> list[int]:
    """Every pool index, the most similar to `example` first."""
    similarity = [0.0] * len(self.pool)
    for w, x in self._weights(collections.Counter(words(example))).items():
      for index, y in self._postings[w]:
        similarity[index] += x * y
    return sorted(range(len(self.pool)), key=lambda index: (-similarity[index], index))
