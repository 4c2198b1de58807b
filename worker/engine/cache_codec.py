"""Compact teacher rows (teacher cache format 2): 113 bytes per row at k = 64 where format 1 took 260.

A row is the teacher's top-k ids, their log-probs and the log of the mass outside them (`cache.teacher_topk`).
Format 1 stored uint16/int32 ids + float16 log-probs + a float32 tail: 4k + 4 (V <= 65536) or 6k + 4 bytes.
At k = 64 the ids alone took 128 B, so packing them to ceil(log2 V) bits and quantising the log-probs cannot
reach 128 B/row. Format 2 codes what carries information; numbers measured on SmolLM2-135M over Shakespeare
(4064 target positions, vocabulary 49152, bench/cache_quality.py; per row at k = 16 / 64 / 256):

- Ids are a set: stored sorted ascending, as gaps (g = id - previous id, from -1), each gap Exp-Golomb coded
  with a parameter per sorted position (`id_params`, fitted on the first batch of the build). A BPE vocabulary
  puts frequent tokens at low ids, so a row's first gaps are small and its last ones large, and the position
  predicts their size: 19 / 69 / 242 B (16-bit ids: 32 / 128 / 512 B; Elias-Fano, blind to the skew, 27 / 92
  / 304 B; a uniformly random set of 64 would need log2 C(49152, 64) / 8 = 88 B).
- Log-probs are stored in the same (id) order, so no rank permutation is needed. An error ε in log p_i costs
  KL ≈ p_i·ε²/2, the same for every entry when √p is quantised with a uniform step s: level m = round(√p / s)
  (fine near p = 1, coarse far down). The step shrinks with k, s = 1 / (LP_STEP_SCALE·√k), so the added KL,
  ≈ k·s²/6, is the same 4e-4 nats at every k (measured +0.0004 nats: +0.03 / +0.07 / +0.16 %). Entries below
  √p = s/2 get DEEP_LEVELS more levels, DEEP_STEP nats apart in log p (anything deeper, -inf included, decodes
  to the last of them); their weight in any divergence is nil. Each row's levels are Rice coded with the
  row's best parameter: ~5 bits per entry, 10 / 40 / 154 B (float16: 32 / 128 / 512 B). A fixed 4-bit or
  6-bit codebook (relative to the row's max, fitted by Lloyd-Max) costs more KL per byte: +0.008 / +0.0009
  nats at k = 64 for 32 / 48 B.
- The row's scale is not stored: the decoder renormalises the levels so that the top-k mass is 1 - tail,
  which makes the reconstruction an exact distribution (and its error second order).
- The tail log-mass as float16 (relative precision 2^-11: its effect on the KL is ~1e-8 nats).
- The argmax's position among the sorted ids, so that rows come back best first with the exact teacher top-1
  (near-ties may share a level).

Per row: a fixed `head` (argmax position << 4 | Rice parameter: 2 bytes) and the float16 tail (2 bytes), and
two bit streams for the variable-length parts, split so that everything decodes with vectorised NumPy, a
batch of rows at once:

- unary: for each row, k Exp-Golomb prefixes (id gaps), then k Rice quotients (levels), each as that many
  0 bits and a 1. Every row has exactly 2k ones, so np.flatnonzero over the unpacked bits finds every symbol;
  the n-th one's position less n counts the zeros before it, a running sum of the symbols for free.
- payload: for each row, k id fields (prefix + id_params[j] bits each), then k Rice remainders (the row's
  Rice parameter bits each). Their widths follow from the unary symbols and the head, so those running sums
  give every field's bit offset, and one gather of 4 bytes per field reads them.

Decoding (8 x 128 rows at k = 64, bench/cache_speed.py --read-only) takes a few milliseconds on a CPU core,
~12 times format 1's copies; `TeacherCache.prefetch` decodes the next batch in a background thread, which
makes reading it as fast as format 1. Each row comes back best first from a single sort of (rank << id bits
| id) keys, and the renormalisation reads exp from a table over (top level, level) pairs.

The streams are cut into byte-aligned segments, one per example of the cache, that decode on their own. The
size varies with the data: on synthetic rows with Zipf-distributed ids (tests/engine/test_cache_codec.py)
116 B/row at V = 49152 and 125 B/row at V = 151936; with uniformly random ids at V = 151936, ~148 B/row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

LP_STEP_SCALE = 20.0  # step of √p: s = 1 / (LP_STEP_SCALE·√k); the added KL is ≈ 1 / (6·LP_STEP_SCALE²) nats
DEEP_LEVELS = 2  # levels below √p = s/2, DEEP_STEP nats apart in log p
DEEP_STEP = 3.0
RICE_MAX = 15  # Rice parameters 0..15 (4 bits of the head)
MAX_FIELD_BITS = 25  # a payload field is read from the 4 bytes it starts in
EXP_TABLE_LEVELS = 2048  # the decoder tabulates exp over (level, level) up to this many levels (k <~ 10000)


@dataclass(frozen=True)
class Packed:
    """Encoded rows: per-row head and tail, and the two streams cut into byte-aligned segments."""

    head: np.ndarray  # uint16 | uint32 [R]: argmax position (in sorted-id order) << 4 | Rice parameter
    tail: np.ndarray  # float16 [R]: log of the mass outside the top-k
    unary: np.ndarray  # uint8: the unary stream, segment after segment
    payload: np.ndarray  # uint8: the payload stream, segment after segment
    unary_bytes: np.ndarray  # int64 [S]: bytes of each segment in `unary`
    payload_bytes: np.ndarray  # int64 [S]


@dataclass(frozen=True)
class Codec:
    """The parameters of one cache's rows; `to_meta` / `from_meta` keep them in meta.json."""

    top_k: int
    vocab_size: int
    lp_step: float  # s: the step of √p
    id_params: np.ndarray  # int64 [k]: Exp-Golomb parameter of the gap at each sorted position
    deep_levels: int = DEEP_LEVELS
    deep_step: float = DEEP_STEP

    @classmethod
    def fit(cls, ids: np.ndarray, vocab_size: int) -> Codec:
        """Parameters for rows like `ids` [R, k] (the first batch of a build): the cheapest Exp-Golomb
        parameter for each sorted position; the log-prob step from k alone."""
        k = ids.shape[-1]
        if not 1 <= k <= vocab_size:
            raise ValueError(f"top-k {k} must be between 1 and the vocabulary size {vocab_size}")
        if vocab_size > 1 << (MAX_FIELD_BITS - 1):
            raise ValueError(f"vocabulary of {vocab_size} tokens is too large for cache format 2")
        gaps = _gaps(np.sort(np.asarray(ids, dtype=np.int64).reshape(-1, k), axis=1))
        params = np.arange(_bit_length(np.array([vocab_size]))[0] + 1)
        cost = np.stack([_eg_bits(gaps, b).mean(axis=0) if len(gaps) else np.zeros(k) for b in params])
        return cls(top_k=k, vocab_size=vocab_size, lp_step=lp_step(k), id_params=params[cost.argmin(axis=0)])

    def to_meta(self) -> dict:
        return {
            "lp_step": self.lp_step,
            "deep_levels": self.deep_levels,
            "deep_step": self.deep_step,
            "id_params": [int(b) for b in self.id_params],
        }

    @classmethod
    def from_meta(cls, codec: dict, top_k: int, vocab_size: int) -> Codec:
        return cls(
            top_k=top_k,
            vocab_size=vocab_size,
            lp_step=float(codec["lp_step"]),
            id_params=np.asarray(codec["id_params"], dtype=np.int64),
            deep_levels=int(codec["deep_levels"]),
            deep_step=float(codec["deep_step"]),
        )

    @property
    def head_dtype(self) -> type[np.unsignedinteger]:
        return np.uint16 if self.top_k <= 1 << 12 else np.uint32

    # ---------------------------------------------------------------------------------------------------
    # log-prob levels

    def levels(self, logprobs: np.ndarray) -> np.ndarray:
        """Level index of each log-prob (int64, 0 = least likely): DEEP_LEVELS log-spaced levels, then √p/s."""
        lp = np.nan_to_num(np.asarray(logprobs, dtype=np.float64), nan=-np.inf, posinf=0.0)
        s, d = self.lp_step, self.deep_levels
        m = np.rint(np.exp(0.5 * lp) / s).astype(np.int64)
        deep = np.clip(np.floor((-lp - self._deep_top) / self.deep_step), 0, d - 1).astype(np.int64)
        return np.where(m >= 1, m + d - 1, d - 1 - deep)

    def level_logprobs(self, levels: np.ndarray) -> np.ndarray:
        """The (unnormalised) log-prob each level stands for, float64."""
        v = np.asarray(levels, dtype=np.int64)
        d = self.deep_levels
        m = np.maximum(v - d + 1, 1)
        deep = -(self._deep_top + (d - 1 - np.minimum(v, d - 1) + 0.5) * self.deep_step)
        return np.where(v >= d, 2.0 * np.log(m * self.lp_step), deep)

    @property
    def _deep_top(self) -> float:
        """-log p where √p = s/2: the deep levels start below it."""
        return -2.0 * math.log(self.lp_step / 2)

    # ---------------------------------------------------------------------------------------------------
    # rows

    def encode(self, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, rows: np.ndarray) -> Packed:
        """Rows ids/logprobs [R, k], tail [R], in segments of `rows` [S] rows each (sum = R)."""
        k = self.top_k
        ids = np.asarray(ids, dtype=np.int64).reshape(-1, k)
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        if len(ids) and (ids[:, 0].min() < 0 or ids[:, -1].max() >= self.vocab_size):
            raise ValueError(f"token ids outside the vocabulary of {self.vocab_size}")
        lps = np.take_along_axis(np.asarray(logprobs, dtype=np.float64).reshape(-1, k), order, axis=1)
        rows = np.asarray(rows, dtype=np.int64)

        gaps = _gaps(ids)
        if len(gaps) and gaps.min() < 1:
            raise ValueError("repeated token id in a top-k row")
        beta = self.id_params[None, :]
        q = (gaps - 1) >> beta
        prefix = _bit_length(q + 1) - 1
        id_fields = ((q + 1 - (1 << prefix)) << beta) | ((gaps - 1) & ((1 << beta) - 1))

        levels = self.levels(lps)
        lps_for_argmax = np.nan_to_num(lps, nan=-np.inf)
        argmax = lps_for_argmax.argmax(axis=1) if len(lps) else np.zeros(0, np.int64)
        rice = _best_rice(levels)
        quot = levels >> rice[:, None]
        rem = levels & ((1 << rice[:, None]) - 1)

        unary, unary_bytes = _pack_unary(np.concatenate([prefix, quot], axis=1), rows)
        widths = np.concatenate([prefix + beta, np.broadcast_to(rice[:, None], rem.shape)], axis=1)
        payload, payload_bytes = _pack_fields(np.concatenate([id_fields, rem], axis=1), widths, rows)
        return Packed(
            head=((argmax << 4) | rice).astype(self.head_dtype),
            tail=np.asarray(tail, dtype=np.float32).reshape(-1).astype(np.float16),
            unary=unary,
            payload=payload,
            unary_bytes=unary_bytes,
            payload_bytes=payload_bytes,
        )

    def decode(
        self,
        head: np.ndarray,
        tail: np.ndarray,
        unary: np.ndarray,
        payload: np.ndarray,
        rows: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int32 [R, k], logprobs float32 [R, k], tail float32 [R]) of `rows` [S] rows per segment;
        each row best first (the stored argmax, then by level; equal levels by id)."""
        k = self.top_k
        rows = np.asarray(rows, dtype=np.int64)
        head = np.asarray(head)
        rice = (head & 15).astype(np.int32)
        # int32 (values < 2^25; bit offsets intp for take), arrays [2, R, k]: the id half then the level half,
        # each contiguous, so that most operations run over long rows

        if len(unary) >= 1 << 28 or len(payload) >= 1 << 28:  # bit offsets in int32
            raise ValueError("too many rows to decode at once")
        unary_zeros = _UnaryZeros.find(np.asarray(unary), rows, 2 * k)
        symbols = unary_zeros.symbols()
        prefix, quot = symbols[0], symbols[1]
        fields = self._fields(np.asarray(payload), rows, unary_zeros, prefix, rice)

        # each gap g: g - 1 = (q << beta) | low beta bits with q = 2^prefix - 1 + (field >> beta), which is
        # field + 2^(prefix + beta) - 2^beta; id_j = -1 + sum of the gaps up to j
        t = self._tables
        gaps = np.left_shift(t.beta_powers, prefix)
        gaps += fields[0]
        gaps += t.gap_offsets
        ids = np.cumsum(gaps, axis=1, dtype=np.int32)
        levels = np.left_shift(quot, rice[:, None])
        levels |= fields[1]
        np.minimum(levels, self.max_level, out=levels)

        tail32 = np.asarray(tail).astype(np.float32)
        shift = self._renormalisation(levels, tail32)
        best_ids, best_logprobs = self._best_first(ids, levels, (head >> 4).astype(np.intp), shift)
        return best_ids, best_logprobs, tail32

    def _fields(
        self, payload: np.ndarray, rows: np.ndarray, unary_zeros: _UnaryZeros, prefix: np.ndarray, rice: np.ndarray
    ) -> np.ndarray:
        """The payload's fields [2, R, k] (int32): each row's k id fields, then its k Rice remainders."""
        k, t = self.top_k, self._tables
        # The unary stream has summed the prefixes already: id field j starts after the row's first j
        # prefixes and beta bits (before[r, j] - base[r] zeros), the remainders (rice bits each) after them all.
        before, base = unary_zeros.before, unary_zeros.base
        row_prefix = before[:, k] - base
        row_start = _layout((row_prefix + t.beta_total + k * rice)[:, None], rows)[0][:, 0].astype(np.int32)
        offsets = np.empty((2, len(rice), k), dtype=np.intp)  # take() would convert int32 to a new intp array
        np.add(before[:, :k], t.beta_before, out=offsets[0])
        offsets[0] += (row_start - base)[:, None]
        offsets[0, :, 0] = row_start  # (a segment's first row has its padding in before[r, 0])
        np.multiply(rice[:, None], t.positions, out=offsets[1])
        offsets[1] += (row_start + row_prefix + t.beta_total)[:, None]

        bit_in_byte = (offsets & 7).astype(np.uint32)
        offsets >>= 3
        words = _words(payload).take(offsets)  # the 4 bytes each field starts in
        words <<= bit_in_byte  # drop the bits before the field
        words[0] >>= np.subtract(t.id_field_shift, prefix).view(np.uint32)  # and those after it: 32 - width
        words[1] >>= (32 - rice).view(np.uint32)[:, None]  # (a shift by 32 gives 0 in NumPy)
        return words.view(np.int32)  # < 2^25: the same value

    def _renormalisation(self, levels: np.ndarray, tail: np.ndarray) -> np.ndarray:
        """Per row [R], what to add to the levels' log-probs so that the top-k mass is 1 - tail.

        log Σ exp(x - top) over the row's log-probs x, with exp(x - top) read from a table over (level of the
        top, level): the same float32 subtraction and exp as computing it, without the exp per entry."""
        t = self._tables
        log_mass = np.log(np.maximum(-np.expm1(tail), 1e-30, dtype=np.float32))
        top_level = levels.max(axis=1)
        if t.exp_below_top is not None:
            scaled = t.exp_below_top.take(np.add(levels, (top_level * t.levels)[:, None], dtype=np.intp))
        else:  # k in the tens of thousands: no table
            scaled = np.exp(t.logprobs.take(levels) - t.logprobs[top_level][:, None])
        return log_mass - t.logprobs[top_level] - np.log(scaled.sum(axis=1))

    def _best_first(
        self, ids: np.ndarray, levels: np.ndarray, argmax: np.ndarray, shift: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows reordered best first: the argmax, then by level, equal levels by id (ids ascend in a row).

        One sort of keys (rank << id_bits | id), rank 0 for the argmax and max_level + 1 - level for the
        others: the sorted keys hold the ids, and the ranks give the log-probs."""
        t = self._tables
        rows = np.arange(len(ids))
        key = np.left_shift(levels, t.id_bits, dtype=t.key_type)
        np.subtract((self.max_level + 1) << t.id_bits, key, out=key)
        key |= ids
        key[rows, argmax] = ids[rows, argmax]
        key.sort(axis=1)
        best_ids = (key & ((1 << t.id_bits) - 1)).astype(np.int32, copy=False)
        logprobs = t.rank_logprobs.take(np.right_shift(key, t.id_bits, dtype=np.intp))
        logprobs[:, 0] = t.logprobs[levels[rows, argmax]]
        logprobs += shift[:, None]
        return best_ids, logprobs

    @cached_property
    def _tables(self) -> _DecodeTables:
        return _DecodeTables(self)

    @property
    def max_level(self) -> int:
        """The highest level (p = 1, plus one step of rounding up)."""
        return self.deep_levels + int(round(1.0 / self.lp_step))

    def row_bytes(self, packed: Packed) -> int:
        """Bytes `packed` takes on disk (head, tail and both streams)."""
        return int(packed.head.nbytes + packed.tail.nbytes + packed.unary.nbytes + packed.payload.nbytes)


def lp_step(k: int) -> float:
    """The step of √p for rows of k log-probs (see the module docstring)."""
    return 1.0 / (LP_STEP_SCALE * math.sqrt(k))


class _DecodeTables:
    """What decoding needs besides the rows, computed once per codec."""

    def __init__(self, codec: Codec):
        k, top = codec.top_k, codec.max_level
        beta = codec.id_params.astype(np.int32)
        self.beta_total = int(beta.sum())
        self.beta_before = (np.cumsum(beta) - beta).astype(np.int32)  # [k]: beta bits of the fields before
        self.id_field_shift = 32 - beta
        self.beta_powers = np.left_shift(1, beta, dtype=np.int32)
        self.gap_offsets = 1 - self.beta_powers  # gap = field + 2^(prefix + beta) + 1 - 2^beta
        self.gap_offsets[0] -= 1  # ids count from -1
        self.positions = np.arange(k, dtype=np.int32)
        self.levels = top + 1
        self.logprobs = codec.level_logprobs(np.arange(self.levels)).astype(np.float32)
        # [top level, level] -> exp(logprob - top logprob), flat; float32 throughout, as the rows compute it
        self.exp_below_top: np.ndarray | None = (
            np.exp(self.logprobs[None, :] - self.logprobs[:, None]).ravel() if self.levels <= EXP_TABLE_LEVELS else None
        )
        self.rank_logprobs = np.concatenate([[0.0], self.logprobs[::-1]]).astype(np.float32)  # rank = top + 1 - level
        self.id_bits = max(int(codec.vocab_size - 1).bit_length(), 1)
        self.key_type = np.int32 if (top + 2) << self.id_bits <= 1 << 31 else np.int64


@dataclass(frozen=True)
class _UnaryZeros:
    """The zero bits of a unary stream counted up to each one: their differences are the symbols, so a row's
    running sums of symbols need no cumulative sum."""

    zeros: np.ndarray  # int32 [R·width + 1]: zeros[n + 1] = zero bits before the stream's n-th one (zeros[0] = 0)
    base: np.ndarray  # int32 [R]: zeros before each row's first symbol that are not its own (padding included)
    first_rows: np.ndarray  # rows that start a segment, after the first
    width: int  # symbols per row

    @classmethod
    def find(cls, buf: np.ndarray, rows: np.ndarray, width: int) -> _UnaryZeros:
        ones = np.flatnonzero(np.unpackbits(buf).view(bool))
        n_rows = int(rows.sum())
        if len(ones) != n_rows * width:
            raise ValueError(f"unary stream holds {len(ones)} symbols, expected {n_rows * width}")
        zeros = np.empty(len(ones) + 1, dtype=np.int32)
        zeros[0] = 0
        np.subtract(ones, _counting(len(ones)), out=zeros[1:], casting="unsafe")
        base = zeros[:-1:width].copy()
        # A segment starts at the byte after the one that holds the previous segment's last one (padding zeros
        # fill the rest of that byte): those zeros are not its first symbol's.
        first = (np.cumsum(rows) - rows)[rows > 0]
        first = first[first > 0]
        last_one = zeros[first * width] + first * width - 1
        base[first] = 8 * ((last_one >> 3) + 1) - first * width
        return cls(zeros, base, first, width)

    @property
    def through(self) -> np.ndarray:
        """[R, width]: zero bits before each symbol's one."""
        return self.zeros[1:].reshape(-1, self.width)

    @property
    def before(self) -> np.ndarray:
        """[R, width]: zero bits before the previous symbol's one (for a row's first, those of the row before)."""
        return self.zeros[:-1].reshape(-1, self.width)

    def symbols(self) -> np.ndarray:
        """The symbols [2, R, width / 2] (int32): each row's first half, then its second."""
        half, through, before = self.width // 2, self.through, self.before
        out = np.empty((2, len(self.base), half), dtype=np.int32)
        np.subtract(through[:, :half], before[:, :half], out=out[0])
        np.subtract(through[:, half:], before[:, half:], out=out[1])
        first = self.first_rows
        out[0, first, 0] = through[first, 0] - self.base[first]
        return out


_COUNTING = np.arange(0)


def _counting(n: int) -> np.ndarray:
    """np.arange(n), from one kept array: a fresh megabyte costs a page fault per 4 KiB on every decode."""
    global _COUNTING
    counting = _COUNTING
    if len(counting) < n:
        counting = _COUNTING = np.arange(max(n, 2 * len(counting)))
        counting.flags.writeable = False
    return counting[:n]


def _words(buf: np.ndarray) -> np.ndarray:
    """The 4 bytes from each position of `buf` [n] as big-endian uint32 [n + 1] (zeros past the end)."""
    padded = np.zeros(len(buf) + 4, dtype=np.uint8)
    padded[: len(buf)] = buf
    return np.ndarray((len(buf) + 1,), dtype=">u4", buffer=padded, strides=(1,)).astype(np.uint32)


# --------------------------------------------------------------------------------------------------------
# integer codes


def _gaps(sorted_ids: np.ndarray) -> np.ndarray:
    """Differences of each row of ascending ids, the first from -1 (so every gap of a set is >= 1)."""
    return np.diff(sorted_ids, axis=1, prepend=-1)


def _bit_length(x: np.ndarray) -> np.ndarray:
    """int.bit_length of each non-negative integer (< 2^52), exact through frexp."""
    return np.frexp(np.asarray(x, dtype=np.float64))[1].astype(np.int64)


def _eg_bits(gaps: np.ndarray, param: int) -> np.ndarray:
    """Bits of each gap under Exp-Golomb with parameter `param` (of gap - 1)."""
    return 2 * (_bit_length(((gaps - 1) >> param) + 1) - 1) + 1 + param


def _best_rice(levels: np.ndarray) -> np.ndarray:
    """Per row, the Rice parameter that codes its levels in the fewest bits."""
    k = levels.shape[1]
    cost = np.stack([(levels >> r).sum(axis=1) + k * (r + 1) for r in range(RICE_MAX + 1)], axis=1)
    return cost.argmin(axis=1).astype(np.int64) if len(levels) else np.zeros(0, np.int64)


# --------------------------------------------------------------------------------------------------------
# bit streams: rows of fields [R, W], cut into byte-aligned segments of `rows` [S] rows each; bits in big-endian
# order within bytes (as np.packbits / np.unpackbits)


def _layout(widths: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bit offset of each field [R, W], bytes of each segment [S]) for fields of `widths` [R, W]."""
    offsets = np.cumsum(widths, axis=None, dtype=np.int64).reshape(widths.shape)  # over all rows, row after row
    row_ends = offsets[:, -1].copy() if widths.shape[1] else np.zeros(len(widths), np.int64)
    offsets -= widths  # where each field starts, as if the segments were not padded
    seg_ends = np.concatenate([[0], row_ends])[np.cumsum(rows)]
    seg_bits = np.diff(seg_ends, prepend=0)
    seg_bytes = (seg_bits + 7) // 8
    # each segment starts at its own byte: shift its fields by the padding of the segments before it
    shift = 8 * (np.cumsum(seg_bytes) - seg_bytes) - (seg_ends - seg_bits)
    offsets += np.repeat(shift, rows)[:, None]
    return offsets, seg_bytes


def _pack_unary(values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each value v [R, W] as v zero bits then a one."""
    offsets, seg_bytes = _layout(values + 1, rows)
    ones = (offsets + values).ravel()
    out = np.bincount(ones >> 3, weights=(128 >> (ones & 7)).astype(np.float64), minlength=int(seg_bytes.sum()))
    return out.astype(np.uint8), seg_bytes


def _pack_fields(values: np.ndarray, widths: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each value [R, W] in its width of bits (at most MAX_FIELD_BITS)."""
    if widths.size and widths.max() > MAX_FIELD_BITS:
        raise ValueError(f"a field of {widths.max()} bits (at most {MAX_FIELD_BITS})")
    offsets, seg_bytes = _layout(widths, rows)
    n = int(seg_bytes.sum())
    used = widths > 0
    o, w, v = offsets[used], widths[used], values[used].astype(np.uint64)
    word = v << (32 - (o & 7) - w).astype(np.uint64)  # the field within the 4 bytes it starts in
    acc = np.zeros(n + 4, dtype=np.float64)
    for i in range(4):  # fields never share a bit, so adding the bytes is or-ing them
        part = ((word >> np.uint64(24 - 8 * i)) & np.uint64(255)).astype(np.float64)
        acc += np.bincount((o >> 3) + i, weights=part, minlength=n + 4)
    return acc[:n].astype(np.uint8), seg_bytes
