"""TeacherCache: the teacher's top-k log-probs over a tokenized dataset, computed once and memory-mapped.

Layout of a cache folder (format 2, what `build` writes; arrays little-endian, opened with mmap):

    meta.json          key, inputs of the key, shapes, k, vocab size, statistics, format_version, codec parameters
    tokens.npy         int32  [N]      every example's tokens, concatenated
    target_mask.npy    bool   [N]      True where the token is a training target
    offsets.npy        int64  [E + 1]  example e is tokens[offsets[e]:offsets[e+1]]
    sources.npy        int64  [E]      index of example e among the dataset's tokenized sequences
    head.npy           uint16 | uint32 [N]  per row: argmax position << 4 | Rice parameter (cache_codec)
    tail.npy           float16 [N]     log of the probability mass outside the top-k
    unary.bin          bytes           the rows' unary codes, one byte-aligned segment per example
    payload.bin        bytes           the rows' bit fields, one byte-aligned segment per example
    streams.npy        int64  [E, 2]   where example e's segments start in unary.bin and payload.bin

Rows hold the teacher's top-k ids, their log-probs (T = 1) and the tail mass, coded by `cache_codec` (its
docstring has the format and the measurements behind it): 113 bytes per row at k = 64 on SmolLM2 (vocabulary
49152) where format 1 took 260, for +0.0004 nats of reconstruction KL. meta.json's bytes_per_token is what the
rows take (head, tail, both streams and streams.npy, over the tokens). Examples are written in build order, so
a segment ends where the next one written starts (`streams` sorted). `TeacherCache.rows` decodes a batch at
once (vectorised NumPy) and returns each row best first, as format 1 stored it; `TeacherCache.prefetch` decodes
the next batch in a background thread while the training step runs, so that `rows` reads as fast as format 1.

Format 1 (caches built before format 2; they still open and read as they always did):

    meta.json, tokens.npy, target_mask.npy, offsets.npy, sources.npy as above, and
    topk_ids.npy       uint16 | int32 [N, k]   teacher's top-k next-token ids at each position, best first
    topk_logprobs.npy  float16 [N, k]  their log-probs (T = 1)
    tail_logmass.npy   float32 [N]     log of the probability mass outside the top-k

Row i describes the distribution of token i + 1 given tokens[..i], so the last row of each example is unused
(kept so that rows and tokens share one index). The folder is built in a temporary sibling and renamed into
place, so a cache either exists whole or not at all; its name is its content key (`cache_key`: the teacher,
tokenizer, data, k, length and chat template it was computed from). The key does not depend on the format:
a cache of the same inputs in either format is the same teacher signal, so one built before format 2 is still
found and reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import data as data_mod
from .cache_codec import Codec
from .preflight import check_disk

FORMAT_VERSION = 2  # what `build` writes; `TeacherCache.open` reads 1 and 2
KEY_VERSION = 1  # in the content key; unchanged by format 2, which stores the same signal
COMMON = ("tokens", "target_mask", "offsets", "sources")
FORMAT1_ROWS = ("topk_ids", "topk_logprobs", "tail_logmass")
PREFETCH_BATCHES = 4  # batches a format-2 reader decodes ahead at most (see `TeacherCache.prefetch`)


def cache_key(
    *,
    teacher: str,
    tokenizer: str,
    dataset: str,
    top_k: int,
    max_seq_len: int,
    template: str | None,
    subset: np.ndarray | None = None,
) -> str:
    """Content address: the same teacher weights, tokenizer, data, k, length and chat template give the same key.

    `subset` (sorted sequence indices) names a cache of part of the dataset; None is the whole dataset.
    """
    parts = {
        "v": KEY_VERSION,
        "teacher": teacher,
        "tokenizer": tokenizer,
        "dataset": dataset,
        "top_k": top_k,
        "max_seq_len": max_seq_len,
        "template": template or "",
    }
    if subset is not None:
        parts["subset"] = hashlib.sha256(np.asarray(subset, dtype=np.int64).tobytes()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class _Format1Rows:
    """Rows of a format-1 cache: plain arrays, read as they always were."""

    def __init__(self, path: Path, meta: dict):
        self.top_k = meta["top_k"]
        self.topk_ids = np.load(path / "topk_ids.npy", mmap_mode="r")
        self.topk_logprobs = np.load(path / "topk_logprobs.npy", mmap_mode="r")
        self.tail_logmass = np.load(path / "tail_logmass.npy", mmap_mode="r")

    def rows(self, offsets: np.ndarray, example_ids: np.ndarray, length: int):
        k = self.top_k
        ids = np.zeros((len(example_ids), length, k), dtype=np.int32)
        lps = np.zeros((len(example_ids), length, k), dtype=np.float32)
        tail = np.zeros((len(example_ids), length), dtype=np.float32)
        for b, e in enumerate(example_ids):
            start, end = offsets[e], offsets[e + 1]
            n = min(end - start, length)
            ids[b, :n] = self.topk_ids[start : start + n]
            lps[b, :n] = self.topk_logprobs[start : start + n]
            tail[b, :n] = self.tail_logmass[start : start + n]
        return ids, lps, tail


class _Format2Rows:
    """Rows of a format-2 cache: per-row head and tail, and each example's segments of the two bit streams.

    Decoding costs far more than format 1's copies, so a batch can be decoded ahead, in a background thread
    (`prefetch`), while the training step runs; `rows` then only waits for it and pads."""

    def __init__(self, path: Path, meta: dict):
        self.codec = Codec.from_meta(meta["codec"], meta["top_k"], meta["vocab_size"])
        self.head = np.load(path / "head.npy", mmap_mode="r")
        self.tail = np.load(path / "tail.npy", mmap_mode="r")
        self.unary = _open_bytes(path / "unary.bin")
        self.payload = _open_bytes(path / "payload.bin")
        starts = np.load(path / "streams.npy")
        # each example's segments end where those of the example written after it start
        order = np.argsort(starts[:, 0], kind="stable")
        ends = np.empty_like(starts)
        ends[order[:-1]] = starts[order[1:]]
        if len(order):
            ends[order[-1]] = (len(self.unary), len(self.payload))
        self.starts, self.ends = starts, ends
        self._decoder: ThreadPoolExecutor | None = None
        self._ahead: dict[bytes, Future[_Decoded]] = {}  # decodes under way or done, by example ids

    def prefetch(self, offsets: np.ndarray, example_ids: np.ndarray) -> None:
        """Start decoding these examples' rows in the background; `rows` for the same examples takes them."""
        example_ids = np.array(example_ids, dtype=np.int64)  # a copy: the caller may reuse its array
        key = example_ids.tobytes()
        if key in self._ahead:
            return
        if self._decoder is None:
            self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-cache-decode")
        while len(self._ahead) >= PREFETCH_BATCHES:  # batches prefetched and never read: drop the oldest
            self._ahead.pop(next(iter(self._ahead))).cancel()
        self._ahead[key] = self._decoder.submit(self._decode, offsets, example_ids)

    def rows(self, offsets: np.ndarray, example_ids: np.ndarray, length: int):
        example_ids = np.asarray(example_ids, dtype=np.int64)
        ahead = self._ahead.pop(example_ids.tobytes(), None)
        decoded = ahead.result() if ahead is not None else self._decode(offsets, example_ids)
        return decoded.padded(self.top_k, length)

    def _decode(self, offsets: np.ndarray, example_ids: np.ndarray) -> _Decoded:
        """Every row of these examples: a segment starts at an example's first row, so whole examples decode."""
        first, end = offsets[example_ids], offsets[example_ids + 1]
        ids, logprobs, tail = self.codec.decode(
            _gather(self.head, first, end),
            _gather(self.tail, first, end),
            _gather(self.unary, self.starts[example_ids, 0], self.ends[example_ids, 0]),
            _gather(self.payload, self.starts[example_ids, 1], self.ends[example_ids, 1]),
            end - first,
        )
        return _Decoded(ids, logprobs, tail, end - first)

    @property
    def top_k(self) -> int:
        return self.codec.top_k


@dataclass(frozen=True)
class _Decoded:
    """Decoded rows of a batch of examples, concatenated: ids / logprobs [R, k], tail [R], `count` [B] each."""

    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray
    count: np.ndarray

    def padded(self, k: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [B, length, k], logprobs, tail [B, length]): each example's first `length` rows, zeros after."""
        batch = len(self.count)
        ids = np.zeros((batch, length, k), dtype=np.int32)
        lps = np.zeros((batch, length, k), dtype=np.float32)
        tail = np.zeros((batch, length), dtype=np.float32)
        at = 0
        for b, n in enumerate(self.count):
            keep = min(n, length)
            ids[b, :keep], lps[b, :keep], tail[b, :keep] = (
                a[at : at + keep] for a in (self.ids, self.logprobs, self.tail)
            )
            at += n
        return ids, lps, tail


def _open_bytes(path: Path) -> np.ndarray:
    """A raw byte file, memory-mapped (an empty one as an empty array: mmap refuses size 0)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _gather(a: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """a[starts[i]:ends[i]] for each i, concatenated (one copy out of the memory map)."""
    return np.concatenate([a[s:e] for s, e in zip(starts, ends)] + [np.zeros(0, a.dtype)])


@dataclass
class TeacherCache:
    path: Path
    meta: dict
    tokens: np.ndarray
    target_mask: np.ndarray
    offsets: np.ndarray
    sources: np.ndarray
    reader: _Format1Rows | _Format2Rows

    @classmethod
    def open(cls, path: Path) -> TeacherCache:
        meta = json.loads((path / "meta.json").read_text())
        version = meta.get("format_version", 1)
        if version not in (1, 2):
            raise RuntimeError(f"teacher cache {path.name} has format {version}; this worker reads formats 1 and 2")
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in COMMON}
        reader = _Format1Rows(path, meta) if version == 1 else _Format2Rows(path, meta)
        return cls(path=path, meta=meta, reader=reader, **arrays)

    @property
    def format_version(self) -> int:
        return self.meta.get("format_version", 1)

    @property
    def top_k(self) -> int:
        return self.meta["top_k"]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def positions(self, sources: np.ndarray) -> np.ndarray:
        """Cache example index of each dataset sequence index in `sources` (all must be cached)."""
        pos = np.searchsorted(self.sources, sources)
        if np.any(pos >= len(self.sources)) or np.any(self.sources[np.minimum(pos, len(self.sources) - 1)] != sources):
            raise RuntimeError(f"teacher cache {self.path.name} lacks some of the requested sequences")
        return pos

    def examples(self) -> list[data_mod.Example]:
        o = self.offsets
        return [
            data_mod.Example(
                tokens=np.asarray(self.tokens[o[e] : o[e + 1]]),
                target_mask=np.asarray(self.target_mask[o[e] : o[e + 1]]),
                source=e,
            )
            for e in range(len(self))
        ]

    def rows(self, example_ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Teacher rows for a batch, padded to `length` positions: (ids [B, L, k] int32, logprobs float32,
        tail [B, L] float32); each row best first. Padding rows are zeros."""
        return self.reader.rows(self.offsets, example_ids, length)

    def prefetch(self, example_ids: np.ndarray) -> None:
        """Start reading the rows of a batch that `rows` will be asked for next (the same example ids), so that
        they are ready by then: a format-2 cache decodes them in a background thread (NumPy's loops and mx.eval
        release the GIL, so this overlaps with the training step); format 1 has nothing to do ahead. A batch prefetched and
        never read costs only its decode (the last PREFETCH_BATCHES are kept)."""
        if isinstance(self.reader, _Format2Rows):
            self.reader.prefetch(self.offsets, example_ids)


def teacher_topk(logits: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """Top-k token ids (best first), their log-probs, and the log of the mass outside them, per position."""
    logits = logits.astype(mx.float32)
    ids, top = _block_topk(logits, k)
    order = mx.argsort(-top, axis=-1)
    ids, top = mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(top, order, axis=-1)
    logprobs = top - _logsumexp(logits)
    # 1 - sum(p_topk) is exact enough here: when it underflows the tail weighs nothing in any divergence.
    tail = mx.log(mx.maximum(1.0 - mx.exp(logprobs).sum(axis=-1), 1e-30))
    return ids, logprobs, tail


def _block_topk(logits: mx.array, k: int, block: int = 32) -> tuple[mx.array, mx.array]:
    """Exact top-k (unordered) in two stages: the top-k values lie in the k blocks of `block` logits with the
    largest maxima (any other block's maximum is below k values), so select those blocks, then the top k of
    their k·block candidates. A fraction of a full-vocabulary partition (bench/cache_speed.py measures it)."""
    *lead, vocab = logits.shape
    n_blocks = -(-vocab // block)
    if n_blocks <= k or k * block >= vocab:
        ids = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
        return ids, mx.take_along_axis(logits, ids, axis=-1)
    x = logits
    if n_blocks * block != vocab:
        x = mx.concatenate([x, mx.full((*lead, n_blocks * block - vocab), -math.inf, dtype=x.dtype)], axis=-1)
    blocks = x.reshape(*lead, n_blocks, block)
    best = mx.argpartition(-blocks.max(axis=-1), kth=k - 1, axis=-1)[..., :k]  # [..., k]
    cand = mx.take_along_axis(blocks, best[..., None], axis=-2).reshape(*lead, k * block)
    sel = mx.argpartition(-cand, kth=k - 1, axis=-1)[..., :k]
    ids = mx.take_along_axis(best, sel // block, axis=-1) * block + sel % block
    return ids, mx.take_along_axis(cand, sel, axis=-1)


def _logsumexp(logits: mx.array, chunk: int = 16) -> mx.array:
    """logsumexp over the vocabulary, keepdims. On the CPU in NumPy, a few rows at a time through one reused
    buffer: MLX's CPU exp is scalar code, NumPy's is vectorised (several times faster over 50k logits)."""
    if mx.default_device() != mx.cpu:
        return mx.logsumexp(logits, axis=-1, keepdims=True)
    flat = np.asarray(logits).reshape(-1, logits.shape[-1])
    out = np.empty((flat.shape[0], 1), dtype=np.float32)
    buf = np.empty((min(chunk, len(flat)), flat.shape[1]), dtype=np.float32)
    for s in range(0, len(flat), chunk):
        x = flat[s : s + chunk]
        m = x.max(axis=-1, keepdims=True)
        b = buf[: len(x)]
        np.subtract(x, m, out=b)
        np.exp(b, out=b)
        out[s : s + chunk] = m + np.log(b.sum(axis=-1, keepdims=True))
    return mx.array(out.reshape(*logits.shape[:-1], 1))


def reconstruction_kl(
    logits: mx.array,
    ids: mx.array | np.ndarray,
    logprobs: mx.array | np.ndarray,
    tail: mx.array | np.ndarray,
    mask,
) -> float:
    """Mean KL(full teacher || top-k + uniform tail) over masked positions: what the cache loses.

    With p the full distribution and r the reconstruction (`logprobs` on the top-k, as the cache gives them back,
    the `tail` mass spread evenly over the other V - k tokens): KL = Σ p log p − Σ_topk p·r_i − r_tail·(1 − Σ_topk p).
    In NumPy, a few rows at a time (it runs on the first batches of every build)."""
    vocab, k = logits.shape[-1], ids.shape[-1]
    flat = np.asarray(logits.astype(mx.float32)).reshape(-1, vocab)
    ids_np = np.asarray(ids).reshape(-1, k).astype(np.int64)
    cached = np.asarray(logprobs, dtype=np.float32).reshape(-1, k)
    tail_each = np.asarray(tail, dtype=np.float32).reshape(-1) - math.log(max(vocab - k, 1))
    rows = np.flatnonzero(np.asarray(mask).reshape(-1))
    total = 0.0
    for s in range(0, len(rows), 16):
        r = rows[s : s + 16]
        x = flat[r] - flat[r].max(axis=-1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
        p = np.exp(logp)
        p_top = np.take_along_axis(p, ids_np[r], axis=-1)
        kl = (p * logp).sum(-1) - (p_top * cached[r]).sum(-1) - tail_each[r] * (1.0 - p_top.sum(-1))
        total += float(kl.sum())
    return total / max(len(rows), 1)


def _reserve(path: Path) -> None:
    with open(path, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def build(
    model,
    examples: list[data_mod.Example],
    out: Path,
    *,
    key: str,
    top_k: int,
    batch_size: int,
    pad_id: int,
    meta: dict,
    sources: np.ndarray | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    sample_batches: int = 4,
    format_version: int = FORMAT_VERSION,
) -> TeacherCache:
    """Run the teacher once over `examples` and write the cache folder `out` atomically.

    `format_version` 1 writes the old layout (for comparisons: bench/cache_quality.py, tests); the default is 2.
    `reconstruction_kl` in meta.json is measured on the first `sample_batches` batches as stored (read back)."""
    if format_version not in (1, 2):
        raise ValueError(f"unknown teacher cache format {format_version}")
    lengths = [len(e.tokens) for e in examples]
    n_tokens = int(sum(lengths))
    out.parent.mkdir(parents=True, exist_ok=True)
    # per token: the token and its mask, then the rows: format 1 takes k ids (up to 4 bytes), k float16
    # log-probs and the tail; format 2 ~1.8 bytes per top-k entry (2 allowed for here) and its 4-byte head + tail
    row_bytes_max = 6 * top_k + 4 if format_version == 1 else 2 * top_k + 4
    check_disk(out.parent, n_tokens * (5 + row_bytes_max) + 24 * len(examples), "the teacher cache")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    writer: _Format1Writer | _Format2Writer | None = None
    try:
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        tokens = np.concatenate([e.tokens for e in examples]).astype(np.int32)
        mask = np.concatenate([e.target_mask for e in examples]).astype(bool)
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "target_mask.npy", mask)
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "sources.npy", np.arange(len(examples)) if sources is None else np.asarray(sources, np.int64))
        recon, t0, done = [], time.perf_counter(), 0
        for b, idx in enumerate(data_mod.eval_batches(lengths, batch_size)):
            if should_stop and should_stop():
                from .errors import Cancelled

                raise Cancelled("teacher cache build cancelled")
            toks, tmask = data_mod.collate([examples[i] for i in idx], pad_id)
            logits = model(mx.array(toks))
            ids, lps, tail = teacher_topk(logits, top_k)
            ids_np, lps_np, tail_np = np.array(ids), np.array(lps), np.array(tail)
            n_rows = np.array([lengths[e] for e in idx], dtype=np.int64)
            valid = np.arange(toks.shape[1])[None, :] < n_rows[:, None]  # the rows the cache keeps, example by example
            if writer is None:
                vocab = logits.shape[-1]
                writer = (
                    _Format1Writer(tmp, n_tokens, top_k, vocab)
                    if format_version == 1
                    else _Format2Writer(tmp, n_tokens, len(examples), Codec.fit(ids_np[valid], vocab))
                )
            stored = writer.write(idx, offsets[idx], n_rows, ids_np[valid], lps_np[valid], tail_np[valid])
            if b < sample_batches:
                stored = writer.read_back(stored)
                next_is_target = np.zeros_like(tmask)
                next_is_target[:, :-1] = tmask[:, 1:]
                back_ids, back_lps, back_tail = ids_np.copy(), lps_np.copy(), tail_np.copy()
                back_ids[valid], back_lps[valid], back_tail[valid] = stored
                recon.append(reconstruction_kl(logits, back_ids, back_lps, back_tail, next_is_target))
            done += int(n_rows.sum())
            if on_progress:
                on_progress(done, n_tokens)
        assert writer is not None  # made by the first batch; no examples at all already failed in np.concatenate
        row_bytes = writer.close()
        elapsed = time.perf_counter() - t0
        meta = {
            **meta,
            "format_version": format_version,
            "key": key,
            "top_k": top_k,
            "vocab_size": writer.vocab_size,
            "examples": len(examples),
            "tokens": n_tokens,
            "target_tokens": int(mask.sum()),
            "bytes_per_token": row_bytes if format_version == 1 else round(row_bytes / max(n_tokens, 1), 2),
            "reconstruction_kl": float(np.mean(recon)) if recon else None,
            "build_seconds": elapsed,
            "build_tokens_per_second": n_tokens / elapsed if elapsed else None,
        }
        if isinstance(writer, _Format2Writer):
            meta["codec"] = writer.codec.to_meta()
        writer = None
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, out)
        except OSError:  # another builder finished first: theirs is identical by construction
            shutil.rmtree(tmp, ignore_errors=True)
        return TeacherCache.open(out)
    except BaseException:
        if writer is not None:
            writer.discard()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _Format1Writer:
    """Format 1: fixed-size rows in memory-mapped .npy files, written in place at each example's offset."""

    def __init__(self, tmp: Path, n_tokens: int, top_k: int, vocab_size: int):
        self.vocab_size = vocab_size
        id_dtype = np.uint16 if vocab_size <= 65536 else np.int32
        self.arrays = {
            "topk_ids": np.lib.format.open_memmap(tmp / "topk_ids.npy", "w+", id_dtype, (n_tokens, top_k)),
            "topk_logprobs": np.lib.format.open_memmap(tmp / "topk_logprobs.npy", "w+", np.float16, (n_tokens, top_k)),
            "tail_logmass": np.lib.format.open_memmap(tmp / "tail_logmass.npy", "w+", np.float32, (n_tokens,)),
        }
        for name in self.arrays:  # take the blocks now: a full disk is an error here, not a SIGBUS mid-write
            _reserve(tmp / f"{name}.npy")

    def write(self, idx, starts, n_rows, ids, lps, tail):
        """Rows of the examples `idx` (concatenated, `n_rows` each); returns what `read_back` takes."""
        lps16 = lps.astype(np.float16)
        at = 0
        for s, n in zip(starts, n_rows):
            self.arrays["topk_ids"][s : s + n] = ids[at : at + n]
            self.arrays["topk_logprobs"][s : s + n] = lps16[at : at + n]
            self.arrays["tail_logmass"][s : s + n] = tail[at : at + n]
            at += n
        return ids, lps16, tail

    def read_back(self, written):
        """The rows as a reader gets them: (ids, logprobs, tail)."""
        ids, lps16, tail = written
        return ids, lps16.astype(np.float32), tail

    def discard(self) -> None:
        pass

    def close(self) -> int:
        """Flush; the bytes of one row."""
        for a in self.arrays.values():
            a.flush()
        return sum(a.dtype.itemsize * (a.shape[1] if a.ndim == 2 else 1) for a in self.arrays.values())


class _Format2Writer:
    """Format 2: head and tail in place at each example's offset; the streams appended example by example."""

    def __init__(self, tmp: Path, n_tokens: int, n_examples: int, codec: Codec):
        self.codec, self.vocab_size, self.tmp = codec, codec.vocab_size, tmp
        self.head = np.lib.format.open_memmap(tmp / "head.npy", "w+", codec.head_dtype, (n_tokens,))
        self.tail = np.lib.format.open_memmap(tmp / "tail.npy", "w+", np.float16, (n_tokens,))
        for name in ("head", "tail"):  # a full disk is an error here, not a SIGBUS mid-write
            _reserve(tmp / f"{name}.npy")
        self.starts = np.zeros((n_examples, 2), dtype=np.int64)
        self.unary = open(tmp / "unary.bin", "wb")
        self.payload = open(tmp / "payload.bin", "wb")

    def write(self, idx, starts, n_rows, ids, lps, tail):
        """Rows of the examples `idx` (concatenated, `n_rows` each); returns what `read_back` takes."""
        packed = self.codec.encode(ids, lps, tail, n_rows)
        at = 0
        for s, n in zip(starts, n_rows):
            self.head[s : s + n] = packed.head[at : at + n]
            self.tail[s : s + n] = packed.tail[at : at + n]
            at += n
        self.starts[idx, 0] = self.unary.tell() + np.cumsum(packed.unary_bytes) - packed.unary_bytes
        self.starts[idx, 1] = self.payload.tell() + np.cumsum(packed.payload_bytes) - packed.payload_bytes
        self.unary.write(packed.unary.tobytes())
        self.payload.write(packed.payload.tobytes())
        return packed, n_rows

    def read_back(self, written):
        """The rows as a reader gets them: (ids, logprobs, tail), decoded."""
        packed, n_rows = written
        return self.codec.decode(packed.head, packed.tail, packed.unary, packed.payload, n_rows)

    def discard(self) -> None:
        """Close the stream files of a build that failed (its folder is removed next)."""
        for f in (self.unary, self.payload):
            try:
                f.close()
            except OSError:  # the buffered rest of a file on a full disk: it is being removed anyway
                pass

    def close(self) -> int:
        """Flush and close; the bytes all rows take (head, tail, streams and their offsets)."""
        self.head.flush()
        self.tail.flush()
        np.save(self.tmp / "streams.npy", self.starts)
        sizes = self.unary.tell() + self.payload.tell()
        for f in (self.unary, self.payload):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return int(self.head.nbytes + self.tail.nbytes + sizes + self.starts.nbytes)


class CacheStore:
    """Caches under one root, named by key; `get` finds a finished one."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> TeacherCache | None:
        p = self.path(key)
        return TeacherCache.open(p) if (p / "meta.json").is_file() else None
