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
  0 bits and a 1. Every row has exactly 2k ones, so np.flatnonzero over the unpacked bits finds every symbol.
- payload: for each row, k id fields (prefix + id_params[j] bits each), then k Rice remainders (the row's
  Rice parameter bits each). Their widths follow from the unary symbols and the head, so a cumulative sum
  gives every field's bit offset, and one gather of 4 bytes per field reads them.

The streams are cut into byte-aligned segments, one per example of the cache, that decode on their own. The
size varies with the data: on synthetic rows with Zipf-distributed ids (tests/engine/test_cache_codec.py)
116 B/row at V = 49152 and 125 B/row at V = 151936; with uniformly random ids at V = 151936, ~148 B/row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LP_STEP_SCALE = 20.0  # step of √p: s = 1 / (LP_STEP_SCALE·√k); the added KL is ≈ 1 / (6·LP_STEP_SCALE²) nats
DEEP_LEVELS = 2  # levels below √p = s/2, DEEP_STEP nats apart in log p
DEEP_STEP = 3.0
RICE_MAX = 15  # Rice parameters 0..15 (4 bits of the head)
MAX_FIELD_BITS = 25  # a payload field is read from the 4 bytes it starts in


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
        head = np.asarray(head).astype(np.int32)
        rice, argmax = head & 15, head >> 4
        # int32 throughout (values < 2^25): half the memory traffic and page faults of int64

        symbols = _unpack_unary(np.asarray(unary), rows, 2 * k)
        prefix, quot = symbols[:, :k], symbols[:, k:]
        beta = self.id_params.astype(np.int32)[None, :]
        widths = np.empty_like(symbols)
        np.add(prefix, beta, out=widths[:, :k])
        widths[:, k:] = rice[:, None]
        fields = _unpack_fields(np.asarray(payload), widths, rows)

        # each gap g: g - 1 = (q << beta) | low beta bits, with q = 2^prefix - 1 + (field >> beta)
        id_fields = fields[:, :k]
        q = (1 << prefix) - 1 + (id_fields >> beta)
        gaps_less_1 = (q << beta) | (id_fields & ((1 << beta) - 1))
        ids = np.cumsum(gaps_less_1, axis=1, dtype=np.int32)
        ids += np.arange(k, dtype=np.int32)  # id_j = -1 + Σ_{i<=j} g_i = Σ_{i<=j} (g_i - 1) + j
        levels = np.minimum((quot << rice[:, None]) | fields[:, k:], self.max_level)

        t = np.asarray(tail).astype(np.float32)
        log_mass = np.log(np.maximum(-np.expm1(t), 1e-30, dtype=np.float32))
        table = self.level_logprobs(np.arange(self.max_level + 1)).astype(np.float32)
        x = table[levels]
        top = x.max(axis=1, keepdims=True)
        shift = log_mass[:, None] - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True))
        lps = x + shift

        # best first: sort (rank << col_bits | column), rank 0 for the argmax, then by level, equal levels by id
        col_bits = max(int(k - 1).bit_length(), 1)
        key_type = np.int32 if (self.max_level + 2) << col_bits < 1 << 31 else np.int64
        key = (self.max_level + 1 - levels).astype(key_type) << col_bits
        key |= np.arange(k, dtype=key_type)
        np.put_along_axis(key, argmax[:, None], argmax[:, None].astype(key_type), axis=1)
        order = np.sort(key, axis=1) & ((1 << col_bits) - 1)
        return np.take_along_axis(ids, order, axis=1), np.take_along_axis(lps, order, axis=1), t

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


def _unpack_unary(buf: np.ndarray, rows: np.ndarray, width: int) -> np.ndarray:
    """The values [R, width] (int32) `_pack_unary` wrote in segments of `rows` [S] rows."""
    ones = np.flatnonzero(np.unpackbits(buf).view(bool))
    symbols = rows * width
    if len(ones) != symbols.sum():
        raise ValueError(f"unary stream holds {len(ones)} symbols, expected {int(symbols.sum())}")
    values = np.empty(len(ones), dtype=np.int32)
    if len(ones):
        values[0] = ones[0]
        np.subtract(ones[1:], ones[:-1], out=values[1:], casting="unsafe")
        values[1:] -= 1  # the zeros between two ones
        # A segment's first value counts from the segment's first bit, the byte after the one that holds the
        # previous segment's last one (padding zeros fill the rest of that byte).
        first = (np.cumsum(symbols) - symbols)[(symbols > 0) & (np.arange(len(symbols)) > 0)]
        first = first[first > 0]
        values[first] = ones[first] - 8 * ((ones[first - 1] >> 3) + 1)
    return values.reshape(-1, width)


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


def _unpack_fields(buf: np.ndarray, widths: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The values [R, W] (int32) `_pack_fields` wrote, given their widths."""
    offsets, _ = _layout(widths, rows)
    b = np.zeros(len(buf) + 4, dtype=np.uint32)
    b[: len(buf)] = buf
    words = (b[:-3] << 24) | (b[1:-2] << 16) | (b[2:-1] << 8) | b[3:]  # the 4 bytes from each position, big-endian
    word = words[offsets >> 3]
    word <<= (offsets & 7).astype(np.uint32)  # drop the bits before the field
    word >>= (32 - widths).astype(np.uint32)  # and those after it (a shift by 32 gives 0 in NumPy)
    return word.view(np.int32)  # < 2^25: the same value
