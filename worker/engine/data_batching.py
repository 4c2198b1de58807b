"""Splitting and batching tokenized examples: a train/valid holdout by record, length-bucketed batches in a
seeded order per epoch, fixed evaluation batches, and padding a batch into arrays (`collate`).

Numpy, no MLX; the examples come from data_tokenize.py. batches.py pairs a split's batches with its teachers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from worker.engine.data_tokenize import Example
from worker.engine.errors import UserError


def holdout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, valid) split by source record, so windows of one document never straddle the split.

    Deterministic in `seed`; at least one record goes to each side; original order is kept within each.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    sources = sorted({e.source for e in examples})
    if len(sources) < 2:
        raise UserError(f"cannot hold out a validation split from {len(sources)} record(s); give a validation dataset")
    n_valid = min(max(1, round(fraction * len(sources))), len(sources) - 1)
    picked = _rng(seed, 0).permutation(len(sources))[:n_valid]
    valid_sources = {sources[i] for i in picked}
    train = [e for e in examples if e.source not in valid_sources]
    valid = [e for e in examples if e.source in valid_sources]
    return train, valid


def length_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Index batches of similar length, in a shuffled order, for one epoch.

    Sorting by length before cutting batches keeps padding small; shuffling the order of the batches (and
    breaking length ties with a seeded random key) keeps epochs from repeating the same sequence.
    """
    n = len(lengths)
    if n == 0:
        return []
    rng = _rng(seed, epoch)
    order = np.lexsort((rng.random(n), np.asarray(lengths)))  # by length, ties by random key
    if n <= batch_size:
        return [order]
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Batches sorted by length in a fixed order, so every evaluation sees identical batches."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(examples: list[Example], pad_id: int, pad_to: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [B, L], target_mask bool [B, L]), L = longest rounded up to a multiple of `pad_to`.

    Rounding the length means few distinct batch shapes, hence few MLX recompilations.
    """
    longest = max(len(e.tokens) for e in examples)
    width = _round_up(longest, pad_to)
    tokens = np.full((len(examples), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), width), dtype=bool)
    for row, e in enumerate(examples):
        tokens[row, : len(e.tokens)] = e.tokens
        mask[row, : len(e.tokens)] = e.target_mask
    return tokens, mask


def padding_fraction(batches: Sequence[np.ndarray], lengths: Sequence[int], pad_to: int = 8) -> float:
    """Share of the collated positions that are padding (with `collate`'s rounding), to report bucketing."""
    lens = np.asarray(lengths)
    total = padded = 0
    for b in batches:
        if len(b) == 0:
            continue
        width = _round_up(int(lens[b].max()), pad_to)
        total += width * len(b)
        padded += width * len(b) - int(lens[b].sum())
    return padded / total if total else 0.0


def _round_up(n: int, multiple: int) -> int:
    return max(1, math.ceil(n / multiple)) * multiple if multiple > 1 else n


def _rng(seed: int, epoch: int) -> np.random.Generator:
    """A generator from (seed, epoch); negative seeds are folded into range rather than rejected."""
    return np.random.default_rng([seed % 2**63, epoch % 2**63])
