"""TeacherCache: the teacher's top-k log-probs over a tokenized dataset, computed once and memory-mapped.

Layout of a cache folder (all arrays little-endian `.npy`, opened with mmap):

    meta.json          key, inputs of the key, shapes, k, vocab size, statistics
    tokens.npy         int32  [N]      every example's tokens, concatenated
    target_mask.npy    bool   [N]      True where the token is a training target
    offsets.npy        int64  [E + 1]  example e is tokens[offsets[e]:offsets[e+1]]
    sources.npy        int64  [E]      index of example e among the dataset's tokenized sequences
    topk_ids.npy       uint16 | int32 [N, k]   teacher's top-k next-token ids at each position, best first
    topk_logprobs.npy  float16 [N, k]  their log-probs (T = 1)
    tail_logmass.npy   float32 [N]     log of the probability mass outside the top-k

Row i describes the distribution of token i + 1 given tokens[..i], so the last row of each example is unused
(kept so that rows and tokens share one index). The folder is built in a temporary sibling and renamed into
place, so a cache either exists whole or not at all; its name is its content key (`cache_key`: the teacher,
tokenizer, data, k, length and chat template it was computed from).
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
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import data as data_mod
from .preflight import check_disk

FORMAT_VERSION = 1
ARRAYS = ("tokens", "target_mask", "offsets", "sources", "topk_ids", "topk_logprobs", "tail_logmass")


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
        "v": FORMAT_VERSION,
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


@dataclass
class TeacherCache:
    path: Path
    meta: dict
    tokens: np.ndarray
    target_mask: np.ndarray
    offsets: np.ndarray
    sources: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logmass: np.ndarray

    @classmethod
    def open(cls, path: Path) -> TeacherCache:
        meta = json.loads((path / "meta.json").read_text())
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        return cls(path=path, meta=meta, **arrays)

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
        """Teacher rows for a batch, padded to `length` positions: (ids [B, L, k], logprobs, tail [B, L])."""
        k = self.top_k
        ids = np.zeros((len(example_ids), length, k), dtype=np.int32)
        lps = np.zeros((len(example_ids), length, k), dtype=np.float32)
        tail = np.zeros((len(example_ids), length), dtype=np.float32)
        for b, e in enumerate(example_ids):
            start, end = self.offsets[e], self.offsets[e + 1]
            n = min(end - start, length)
            ids[b, :n] = self.topk_ids[start : start + n]
            lps[b, :n] = self.topk_logprobs[start : start + n]
            tail[b, :n] = self.tail_logmass[start : start + n]
        return ids, lps, tail


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


def reconstruction_kl(logits: mx.array, ids: mx.array, logprobs: mx.array, tail: mx.array, mask) -> float:
    """Mean KL(full teacher || top-k + uniform tail) over masked positions: what the cache loses.

    With p the full distribution and r the reconstruction (the cached float16 log-probs on the top-k, the
    tail mass spread evenly over the other V - k tokens): KL = Σ p log p − Σ_topk p·r_i − r_tail·(1 − Σ_topk p).
    In NumPy, a few rows at a time (it runs on the first batches of every build)."""
    vocab, k = logits.shape[-1], ids.shape[-1]
    flat = np.asarray(logits.astype(mx.float32)).reshape(-1, vocab)
    ids_np = np.asarray(ids).reshape(-1, k).astype(np.int64)
    cached = np.asarray(logprobs.astype(mx.float16)).astype(np.float32).reshape(-1, k)
    tail_each = np.asarray(tail).reshape(-1) - math.log(max(vocab - k, 1))
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
) -> TeacherCache:
    """Run the teacher once over `examples` and write the cache folder `out` atomically."""
    lengths = [len(e.tokens) for e in examples]
    n_tokens = int(sum(lengths))
    vocab = None
    out.parent.mkdir(parents=True, exist_ok=True)
    # per token: the token, its mask, k ids (up to 4 bytes) and k float16 log-probs, the tail's log-mass
    check_disk(out.parent, n_tokens * (4 + 1 + 6 * top_k + 4) + 8 * len(examples), "the teacher cache")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        tokens = np.concatenate([e.tokens for e in examples]).astype(np.int32)
        mask = np.concatenate([e.target_mask for e in examples]).astype(bool)
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "target_mask.npy", mask)
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "sources.npy", np.arange(len(examples)) if sources is None else np.asarray(sources, np.int64))
        arrays: dict[str, np.memmap] | None = None
        recon, t0, done = [], time.perf_counter(), 0
        for b, idx in enumerate(data_mod.eval_batches(lengths, batch_size)):
            if should_stop and should_stop():
                from .errors import Cancelled

                raise Cancelled("teacher cache build cancelled")
            toks, tmask = data_mod.collate([examples[i] for i in idx], pad_id)
            logits = model(mx.array(toks))
            if arrays is None:
                vocab = logits.shape[-1]
                id_dtype = np.uint16 if vocab <= 65536 else np.int32
                arrays = {
                    "topk_ids": np.lib.format.open_memmap(tmp / "topk_ids.npy", "w+", id_dtype, (n_tokens, top_k)),
                    "topk_logprobs": np.lib.format.open_memmap(
                        tmp / "topk_logprobs.npy", "w+", np.float16, (n_tokens, top_k)
                    ),
                    "tail_logmass": np.lib.format.open_memmap(tmp / "tail_logmass.npy", "w+", np.float32, (n_tokens,)),
                }
                for name in arrays:  # take the blocks now: a full disk is an error here, not a SIGBUS mid-write
                    _reserve(tmp / f"{name}.npy")
            ids, lps, tail = teacher_topk(logits, top_k)
            if b < sample_batches:
                next_is_target = np.zeros_like(tmask)
                next_is_target[:, :-1] = tmask[:, 1:]
                recon.append(reconstruction_kl(logits, ids, lps, tail, next_is_target))
            ids_np, lps_np, tail_np = np.array(ids), np.array(lps), np.array(tail)
            for row, e in enumerate(idx):
                s, n = offsets[e], lengths[e]
                arrays["topk_ids"][s : s + n] = ids_np[row, :n]
                arrays["topk_logprobs"][s : s + n] = lps_np[row, :n]
                arrays["tail_logmass"][s : s + n] = tail_np[row, :n]
            done += int(sum(lengths[i] for i in idx))
            if on_progress:
                on_progress(done, n_tokens)
        assert arrays is not None  # made by the first batch; no examples at all already failed in np.concatenate
        for a in arrays.values():
            a.flush()
        elapsed = time.perf_counter() - t0
        row_bytes = sum(a.dtype.itemsize * (a.shape[1] if a.ndim == 2 else 1) for a in arrays.values())
        meta = {
            **meta,
            "format_version": FORMAT_VERSION,
            "key": key,
            "top_k": top_k,
            "vocab_size": vocab,
            "examples": len(examples),
            "tokens": n_tokens,
            "target_tokens": int(mask.sum()),
            "bytes_per_token": row_bytes,
            "reconstruction_kl": float(np.mean(recon)) if recon else None,
            "build_seconds": elapsed,
            "build_tokens_per_second": n_tokens / elapsed if elapsed else None,
        }
        del arrays
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, out)
        except OSError:  # another builder finished first: theirs is identical by construction
            shutil.rmtree(tmp, ignore_errors=True)
        return TeacherCache.open(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class CacheStore:
    """Caches under one root, named by key; `get` finds a finished one."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> TeacherCache | None:
        p = self.path(key)
        return TeacherCache.open(p) if (p / "meta.json").is_file() else None
