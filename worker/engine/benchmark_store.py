"""The reference's full next-token distributions, kept on disk while candidates are scored one at a time.

Candidates are loaded after the reference has been freed, yet KL / JS and top-1 / top-5 agreement need the
reference's whole distribution at every target position. The reference pass appends, per batch, its log-probs
at the batch's target positions (padding and prompt positions are never stored) to a scratch file; each
candidate pass reads the same batch back through a memory-mapped window that is unmapped again right after,
so neither the file nor the mapping grows the process's memory.

Precision: log-probs are stored as float16 (half the bytes of float32; float32 would double a file that
already holds a whole vocabulary per target token) and renormalised (log_softmax of the stored values) when
read back, so candidates are compared with a proper distribution. On the tiny test models that moves KL by
about 1e-6 relative, and a model's KL against its own stored distribution stays under 1e-6 nats per token
(tests/engine/test_benchmark.py holds both). The reference's argmax per position is kept exactly, as int32,
in memory: float16 rounding could turn a near-tie into a different argmax.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import losses
from .errors import UserError

SCRATCH_DIR = ".benchmark-scratch"  # inside the run's out_dir; removed when the benchmark ends, however it ends
STORED_DTYPE = np.float16
HEADROOM_BYTES = 64 << 20  # left free beside the scratch file for report.json, report.md and the charts
FLOAT16_MIN = float(np.finfo(np.float16).min)


def scratch_bytes(n_positions: int, vocab: int) -> int:
    """Bytes of the scratch file: one float16 log-prob per target position and vocabulary entry."""
    return n_positions * vocab * np.dtype(STORED_DTYPE).itemsize


def _size(n: float) -> str:
    for div, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk holding `folder`, or its nearest existing parent."""
    return shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free


def ensure_free_space(folder: Path, n_positions: int, vocab: int) -> None:
    """UserError if the disk holding `folder` cannot take the scratch file (and a little room beside it)."""
    needed = scratch_bytes(n_positions, vocab)
    free = free_bytes(folder)
    if needed + HEADROOM_BYTES > free:
        raise UserError(
            f"data.text: the benchmark keeps the reference's full distribution on disk while it scores the "
            f"candidates one at a time: {n_positions} target tokens × {vocab} vocabulary entries × 2 bytes "
            f"(float16) = {_size(needed)} in {folder}, but only {_size(free)} is free there; lower max_examples "
            f"or max_seq_len, or free disk space"
        )


class ReferenceStore:
    """The reference's float16 log-probs [N, V] at every target position of the text phase, batch after batch.

    Use as a context manager: the scratch folder is created fresh on entry (a stale one from a killed run is
    replaced) and removed on exit, also when the benchmark fails or is cancelled. The reference pass calls
    `append` once per batch, in batch order, then `seal`; candidate passes call `read(i)` for batch i.
    """

    def __init__(self, folder: Path, n_positions: int):
        self.folder, self.n_positions = folder, n_positions
        self.path = folder / "reference_logprobs.f16"
        self.vocab: int | None = None
        self._file: io.BufferedWriter | None = None
        self._batches: list[tuple[int, int]] = []  # (first row, rows) per batch
        self._argmax: list[np.ndarray] = []

    def __enter__(self) -> ReferenceStore:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        return self

    def __exit__(self, *exc) -> None:
        self.seal()
        shutil.rmtree(self.folder, ignore_errors=True)

    def append(self, log_p: mx.array, argmax: mx.array) -> None:
        """One batch of the reference: log-probs [n, V] (float32) and argmax [n] at its target positions."""
        file = self._file if self._file is not None else self._open(log_p.shape[-1])
        start = self._batches[-1][0] + self._batches[-1][1] if self._batches else 0
        if start + log_p.shape[0] > self.n_positions:
            raise ValueError(f"more target positions than the {self.n_positions} the store was sized for")
        # float16's range ends at ±65504; log-probs below that are as good as −inf for every metric
        np.asarray(mx.maximum(log_p, FLOAT16_MIN).astype(mx.float16)).tofile(file)
        self._batches.append((start, log_p.shape[0]))
        self._argmax.append(np.asarray(argmax, dtype=np.int32))

    def seal(self) -> None:
        """The reference pass is done: flush the file so candidates can read it."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def read(self, i: int) -> tuple[mx.array, mx.array]:
        """Batch i as the reference view `text_sums` takes: (float32 log-probs [n, V], argmax [n])."""
        if self._file is not None:
            raise RuntimeError("read before seal(): the reference pass has not finished")
        start, n = self._batches[i]
        assert self.vocab is not None  # set by the first append
        itemsize = np.dtype(STORED_DTYPE).itemsize
        window = np.memmap(
            self.path, dtype=STORED_DTYPE, mode="r", offset=start * self.vocab * itemsize, shape=(n, self.vocab)
        )
        stored = mx.array(window)  # a copy, so the window can be unmapped right away: the pages read do not
        del window  # stay counted in the process's memory
        return losses.log_softmax_t(stored), mx.array(self._argmax[i])

    def _open(self, vocab: int) -> io.BufferedWriter:
        ensure_free_space(self.folder, self.n_positions, vocab)  # again, with the logits' real width
        self.vocab = vocab
        self._file = open(self.path, "wb")
        return self._file
