"""The data side of a run: the rows each step trains on, and a data file tokenized for the bundle."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pocketzo.runtime.data import Dataset, TextEncoder


class BatchSampler:
    """Stateless seeded sampling: step t takes rows [tB, (t+1)B) of an endless chain of
    per-epoch permutations, so any step's batch is known without replaying earlier ones."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def _epoch(self, epoch: int) -> npt.NDArray[np.int64]:
        return np.random.default_rng([self.seed, 0xDA7A, epoch]).permutation(self.n)

    def indices(self, step: int) -> npt.NDArray[np.int64]:
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = np.divmod(pos, self.n)
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):  # a batch spans at most a few epochs
            at = epochs == e
            out[at] = self._epoch(int(e))[offsets[at]]
        return out


def load_data(encoder: TextEncoder, path: str | Path) -> Dataset:
    """Tokenize a data file; says on stderr how many rows were cut to the bundle's max_length."""
    data = encoder.dataset(path)
    if data.n_truncated:
        print(f"note: {data.n_truncated} of {len(data)} rows of {path} were cut to max_length "
              f"{encoder.task.max_length}", file=sys.stderr)
    return data
