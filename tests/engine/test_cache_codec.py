"""Teacher cache format 2 (worker/engine/cache_codec.py): round trips, error bounds, sizes, edge cases; and
format 1 caches, written the old way, still open and read as before."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from worker.engine import cache as cache_mod
from worker.engine import data as data_mod
from worker.engine.cache_codec import Codec


def synthetic_logits(rng, n: int, vocab: int, temperature: float = 1.2) -> np.ndarray:
    """Rows like a real teacher's: Zipf-weighted ids (a BPE vocabulary puts frequent tokens at low ids) plus
    Gumbel noise; at T = 1.2 the top-64 mass (~0.8) and the entropy (~4 nats) are those of SmolLM2 on
    Shakespeare. (On that real data format 2 is a few bytes smaller than on these rows.)"""
    z = -np.log(np.arange(vocab) + 30.0) + rng.gumbel(size=(n, vocab))
    return (temperature * z).astype(np.float32)


def top_rows(logits: np.ndarray, k: int):
    ids, lps, tail = cache_mod.teacher_topk(mx.array(logits), k)
    return np.array(ids).astype(np.int64), np.array(lps), np.array(tail)


def round_trip(codec: Codec, ids, lps, tail, rows):
    packed = codec.encode(ids, lps, tail, rows)
    return packed, codec.decode(packed.head, packed.tail, packed.unary, packed.payload, rows)


def by_id(ids, values):
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(values, order, -1)


@pytest.mark.parametrize("vocab, k", [(49152, 64), (151936, 64), (5000, 16), (3000, 256)])
def test_round_trip(vocab, k):
    rng = np.random.default_rng(k)
    ids, lps, tail = top_rows(synthetic_logits(rng, 40, vocab), k)
    codec = Codec.fit(ids[:20], vocab)
    rows = np.array([7, 0, 13, 1, 19])  # segments of any size, an empty one too
    packed, (d_ids, d_lps, d_tail) = round_trip(codec, ids, lps, tail, rows)
    assert d_ids.dtype == np.int32 and d_lps.dtype == np.float32 and d_tail.dtype == np.float32
    # ids: the same set, the argmax first, the rest best first
    np.testing.assert_array_equal(np.sort(d_ids, -1), np.sort(ids, -1))
    np.testing.assert_array_equal(d_ids[:, 0], ids[:, 0])
    assert (np.diff(d_lps[:, 1:], axis=-1) <= 1e-6).all()
    # the tail as float16; the decoded top-k mass is 1 - tail
    np.testing.assert_array_equal(d_tail, tail.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(np.exp(d_lps).sum(-1), -np.expm1(d_tail), rtol=1e-4)
    # log-probs: √p within half a step of the codebook, up to the renormalisation (a small shift of all)
    _, true = by_id(ids, lps)
    _, got = by_id(d_ids.astype(np.int64), d_lps)
    s = codec.lp_step
    above = true > 2 * math.log(s / 2)
    assert np.abs(np.exp(got / 2) - np.exp(true / 2))[above].max() <= 0.75 * s
    assert packed.unary_bytes.tolist()[1] == 0 and packed.payload_bytes.tolist()[1] == 0


def test_levels_error_bound():
    codec = Codec(top_k=64, vocab_size=49152, lp_step=1 / 160, id_params=np.zeros(64, np.int64))
    s = codec.lp_step
    lp = np.log(np.linspace(1e-12, 1.0, 200001))
    got = codec.level_logprobs(codec.levels(lp))
    fine = np.exp(lp / 2) >= s / 2
    assert np.abs(np.exp(got / 2) - np.exp(lp / 2))[fine].max() <= s / 2 + 1e-12
    # below √p = s/2: DEEP_LEVELS levels DEEP_STEP nats apart, then everything (−inf too) at the last
    top = -2 * math.log(s / 2)
    deep = ~fine & (-lp < top + codec.deep_levels * codec.deep_step)
    assert np.abs(got - lp)[deep].max() <= codec.deep_step / 2 + 1e-9
    floor = codec.level_logprobs(np.array([0]))[0]
    assert codec.level_logprobs(codec.levels(np.array([-1e4, -np.inf, np.nan]))).tolist() == [floor] * 3
    assert (np.diff(codec.level_logprobs(np.arange(codec.max_level + 1))) > 0).all()  # levels ascend


@pytest.mark.parametrize("vocab", [49152, 151936])
def test_build_is_at_most_128_bytes_per_token_at_k64(vocab, tmp_path):
    rng = np.random.default_rng(vocab)
    examples = [
        data_mod.Example(tokens=rng.integers(0, vocab, 48), target_mask=np.ones(48, bool), source=i) for i in range(4)
    ]

    def model(tokens: mx.array) -> mx.array:
        b, n = tokens.shape
        return mx.array(synthetic_logits(rng, b * n, vocab).reshape(b, n, vocab))

    c = cache_mod.build(model, examples, tmp_path / "c", key="c", top_k=64, batch_size=2, pad_id=0, meta={})
    assert c.meta["format_version"] == 2 and c.meta["vocab_size"] == vocab
    assert c.meta["bytes_per_token"] <= 128, c.meta["bytes_per_token"]  # format 1: 260 (uint16 ids), 388 (int32)
    assert c.meta["reconstruction_kl"] > 0
    ids, lps, tail = c.rows(np.arange(4), 48)
    assert ids.shape == (4, 48, 64) and (ids < vocab).all() and np.isfinite(lps).all()


@pytest.mark.parametrize(
    "vocab, k",
    [
        (50, 49),  # k close to V
        (50, 50),  # k = V: every id, the tail empty
        (1000, 1),  # one id per row
        (200_000, 8),  # 18-bit ids
        (262_144, 4),  # the largest ids 18 bits allow
        (131_073, 3),  # 17 bits and one
    ],
)
def test_edge_cases(vocab, k):
    rng = np.random.default_rng(vocab + k)
    n = 12
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)])
    ids[0] = np.arange(vocab - k, vocab)  # the highest ids
    ids[1] = np.arange(k)  # the lowest
    ids[2] = np.concatenate([[vocab - 1, 0][:k], 1 + rng.choice(vocab - 2, size=max(k - 2, 0), replace=False)])
    raw = rng.normal(0, 3, (n, k))
    raw[3] = 0.0  # all tied
    raw[4, k // 2 :] = -np.inf  # masked logits
    raw[5, -1:] = -1e4  # very negative
    lps = raw - np.logaddexp.reduce(np.concatenate([raw, np.zeros((n, 1))], 1), axis=1, keepdims=True)
    lps = np.where(np.isfinite(raw), lps, -np.inf)
    order = np.argsort(-lps, axis=1, kind="stable")  # best first, as teacher_topk gives them
    ids, lps = np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1).astype(np.float32)
    tail = np.log(np.maximum(-np.expm1(np.logaddexp.reduce(lps, axis=1)), 1e-30)).astype(np.float32)
    codec = Codec.fit(ids, vocab)
    _, (d_ids, d_lps, d_tail) = round_trip(codec, ids, lps, tail, np.array([5, 7]))
    np.testing.assert_array_equal(np.sort(d_ids, -1), np.sort(ids, -1))
    assert np.isfinite(d_lps).all() and (d_lps <= 1e-6).all()
    # the argmax comes first; among exact ties any of them (here the lowest id)
    first = lps[np.arange(n), np.argmax(ids == d_ids[:, :1], axis=1)]
    np.testing.assert_array_equal(first, lps.max(axis=1))
    if k == 1:  # one entry: its log-prob is log(1 - tail), exactly what the tail says
        np.testing.assert_allclose(d_lps[:, 0], np.log(np.maximum(-np.expm1(d_tail), 1e-30)), atol=1e-5)
    assert (d_ids[3] == np.sort(ids[3])).all()  # all tied: by id
    masked = np.isin(d_ids[4], ids[4][~np.isfinite(lps[4])])
    assert (d_lps[4][masked] < -8).all()  # -inf decodes to the lowest level: tiny, finite


def test_codec_rejects_bad_rows():
    codec = Codec.fit(np.array([[1, 5]]), 10)
    tail = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match="repeated"):
        codec.encode(np.array([[3, 3]]), np.zeros((1, 2), np.float32), tail, np.array([1]))
    with pytest.raises(ValueError, match="outside"):
        codec.encode(np.array([[3, 10]]), np.zeros((1, 2), np.float32), tail, np.array([1]))
    with pytest.raises(ValueError, match="top-k"):
        Codec.fit(np.zeros((1, 11), np.int64), 10)


# ------------------------------------------------------------------------------ the decoder, bit for bit


def random_rows(rng, n: int, vocab: int, k: int):
    """Rows with uniformly random ids (the hardest for the id code), best first, with ties and -inf entries."""
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)])
    raw = rng.normal(0, 3, (n, k))
    raw[1] = 0.0  # all tied
    raw[2, k // 2 :] = -np.inf  # masked logits
    lps = raw - np.logaddexp.reduce(np.concatenate([raw, np.zeros((n, 1))], 1), axis=1, keepdims=True)
    lps = np.where(np.isfinite(raw), lps, -np.inf)
    order = np.argsort(-lps, axis=1, kind="stable")
    ids, lps = np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1).astype(np.float32)
    tail = np.log(np.maximum(-np.expm1(np.logaddexp.reduce(lps, axis=1)), 1e-30)).astype(np.float32)
    return ids, lps, tail


def assert_identical(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == w.tobytes()  # bit for bit: float32 values and their order


@pytest.mark.parametrize("vocab", [49152, 151936])
@pytest.mark.parametrize("k", [1, 16, 64, 256])
@pytest.mark.parametrize("ids_are", ["zipf", "random"])
def test_segments_decode_alone_as_in_the_whole(vocab, k, ids_are):
    """Every id back, best first, and a run of whole segments (a batch of examples) decodes alone to exactly
    the rows it holds in the whole decode."""
    rng = np.random.default_rng(vocab + k)
    n = 50
    if ids_are == "zipf":
        ids, lps, tail = top_rows(synthetic_logits(rng, n, vocab), k)
    else:
        ids, lps, tail = random_rows(rng, n, vocab, k)
    codec = Codec.fit(ids[:20], vocab)
    rows = np.array([7, 0, 13, 1, 0, 29])  # segments of any size, empty ones too
    packed = codec.encode(ids, lps, tail, rows)
    whole = codec.decode(packed.head, packed.tail, packed.unary, packed.payload, rows)
    np.testing.assert_array_equal(np.sort(whole[0], -1), np.sort(ids, -1))
    assert (np.diff(whole[1][:, 1:], axis=-1) <= 1e-6).all()
    u, p = np.cumsum(packed.unary_bytes), np.cumsum(packed.payload_bytes)  # segments 3..5: rows 20..49
    part = codec.decode(packed.head[20:], packed.tail[20:], packed.unary[u[2] :], packed.payload[p[2] :], rows[3:])
    assert_identical(part, tuple(x[20:] for x in whole))


def test_decode_without_the_exp_table_is_the_same(monkeypatch):
    from worker.engine import cache_codec

    rng = np.random.default_rng(5)
    ids, lps, tail = random_rows(rng, 30, 49152, 64)
    rows = np.array([10, 20])
    codec = Codec.fit(ids, 49152)
    packed = codec.encode(ids, lps, tail, rows)
    args = (packed.head, packed.tail, packed.unary, packed.payload, rows)
    with_table = codec.decode(*args)
    monkeypatch.setattr(cache_codec, "EXP_TABLE_LEVELS", 10)  # as for k in the tens of thousands
    codec = Codec.fit(ids, 49152)
    assert codec._tables.exp_below_top is None
    assert_identical(codec.decode(*args), with_table)


def test_decode_of_no_rows_and_of_a_corrupt_stream():
    codec = Codec.fit(np.array([[1, 5, 9]]), 100)
    ids, lps, tail = codec.decode(
        np.zeros(0, np.uint16), np.zeros(0, np.float16), np.zeros(0, np.uint8), np.zeros(0, np.uint8), np.array([0, 0])
    )
    assert ids.shape == lps.shape == (0, 3) and tail.shape == (0,)
    packed = codec.encode(np.array([[1, 5, 9]]), np.log([[0.5, 0.2, 0.1]]), np.log([0.2]), np.array([1]))
    with pytest.raises(ValueError, match="symbols"):
        codec.decode(packed.head, packed.tail, packed.unary[:-1], packed.payload, np.array([1]))


# ---------------------------------------------------------------------------- reading ahead (prefetch)


def build_cache(tmp_path, vocab: int, lengths: list[int], format_version: int = 2, k: int = 16):
    rng = np.random.default_rng(len(lengths))
    examples = [
        data_mod.Example(tokens=rng.integers(0, vocab, n), target_mask=np.ones(n, bool), source=i)
        for i, n in enumerate(lengths)
    ]

    def model(tokens: mx.array) -> mx.array:
        return mx.array(synthetic_logits(rng, tokens.size, vocab).reshape(*tokens.shape, vocab))

    out = tmp_path / f"f{format_version}"
    return cache_mod.build(
        model, examples, out, key=out.name, top_k=k, batch_size=2, pad_id=0, meta={}, format_version=format_version
    )


def test_prefetched_rows_are_the_rows(tmp_path):
    built = build_cache(tmp_path, 3000, [12, 30, 7, 25, 18, 9])
    fresh = cache_mod.TeacherCache.open(built.path)  # nothing prefetched: decodes in rows()
    batches = [np.array([1, 4, 0]), np.array([5, 2]), np.array([3, 1, 2, 0])]
    for length in (31, 8):
        built.prefetch(batches[0])
        for b, batch in enumerate(batches):
            if b + 1 < len(batches):
                built.prefetch(batches[b + 1])  # the next batch decodes while this one is used
            built.prefetch(batch)  # again: already under way, nothing more to do
            for got, want in zip(built.rows(batch, length), fresh.rows(batch, length)):
                np.testing.assert_array_equal(got, want)
    assert not built.reader._ahead  # every prefetched batch was read


def test_prefetch_keeps_a_few_batches_and_reads_the_others_directly(tmp_path):
    built = build_cache(tmp_path, 3000, [5, 6, 7, 8, 9, 10])
    batches = [np.array([e]) for e in range(6)]
    for batch in batches:
        built.prefetch(batch)
    assert len(built.reader._ahead) == cache_mod.PREFETCH_BATCHES  # the oldest were dropped
    for batch in reversed(batches):  # read in any order: those dropped decode in rows()
        ids, lps, tail = built.rows(batch, 12)
        n = 5 + int(batch[0])
        assert (tail[0, :n] < 0).all() and (tail[0, n:] == 0).all()
    assert not built.reader._ahead


def test_prefetch_of_a_format1_cache_does_nothing(tmp_path):
    built = build_cache(tmp_path, 3000, [5, 6], format_version=1)
    built.prefetch(np.array([1, 0]))
    ids, _, _ = built.rows(np.array([1, 0]), 6)
    assert ids.shape == (2, 6, 16)


def test_a_failed_prefetch_fails_the_rows_call(tmp_path):
    built = build_cache(tmp_path, 3000, [5, 6])
    built.reader.payload = built.reader.payload[:0]  # as if the file were cut short
    built.reader.unary = built.reader.unary[:1]
    built.prefetch(np.array([0, 1]))
    with pytest.raises(ValueError, match="symbols"):
        built.rows(np.array([0, 1]), 6)


# ------------------------------------------------------------------------------------ format 1 still reads


def write_format1(path, rng, vocab: int, k: int, lengths: list[int]):
    """A cache folder exactly as format 1's `build` wrote it (np.save of each array, meta.json)."""
    path.mkdir(parents=True)
    n = sum(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)])
    arrays = {
        "tokens": rng.integers(0, vocab, n).astype(np.int32),
        "target_mask": np.ones(n, bool),
        "offsets": offsets,
        "sources": np.arange(len(lengths)),
        "topk_ids": ids.astype(np.uint16 if vocab <= 65536 else np.int32),
        "topk_logprobs": np.sort(-rng.exponential(3, (n, k)), axis=1)[:, ::-1].astype(np.float16),
        "tail_logmass": np.log(rng.uniform(0.01, 0.5, n)).astype(np.float32),
    }
    for name, a in arrays.items():
        np.save(path / f"{name}.npy", a)
    meta = {"format_version": 1, "key": path.name, "top_k": k, "vocab_size": vocab, "examples": len(lengths)}
    meta |= {"tokens": n, "bytes_per_token": 6 * k + 4 if vocab > 65536 else 4 * k + 4}
    (path / "meta.json").write_text(json.dumps(meta))
    return arrays


@pytest.mark.parametrize("vocab", [1000, 100_000])
def test_format1_cache_opens_and_reads_as_before(vocab, tmp_path):
    rng = np.random.default_rng(0)
    lengths = [5, 9, 3]
    key = cache_mod.cache_key(teacher="t", tokenizer="t", dataset="d", top_k=8, max_seq_len=16, template=None)
    arrays = write_format1(tmp_path / key, rng, vocab, 8, lengths)
    c = cache_mod.CacheStore(tmp_path).get(key)  # found under the same key
    assert c is not None and c.format_version == 1 and len(c) == 3
    ids, lps, tail = c.rows(np.array([2, 0, 1]), 7)
    assert ids.dtype == np.int32 and lps.dtype == np.float32 and tail.dtype == np.float32
    for b, e in enumerate([2, 0, 1]):
        s, n = arrays["offsets"][e], min(lengths[e], 7)
        np.testing.assert_array_equal(ids[b, :n], arrays["topk_ids"][s : s + n])
        np.testing.assert_array_equal(lps[b, :n], arrays["topk_logprobs"][s : s + n].astype(np.float32))
        np.testing.assert_array_equal(tail[b, :n], arrays["tail_logmass"][s : s + n])
        assert (ids[b, n:] == 0).all() and (lps[b, n:] == 0).all() and (tail[b, n:] == 0).all()


def test_unknown_format_is_refused(tmp_path):
    write_format1(tmp_path / "c", np.random.default_rng(0), 100, 4, [3])
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta | {"format_version": 3}))
    with pytest.raises(RuntimeError, match="format 3"):
        cache_mod.TeacherCache.open(tmp_path / "c")


def test_both_formats_hold_the_same_rows(tmp_path):
    rng = np.random.default_rng(3)
    vocab = 3000
    examples = [
        data_mod.Example(tokens=rng.integers(0, vocab, n), target_mask=np.ones(n, bool), source=i)
        for i, n in enumerate([30, 12, 25, 7, 30])
    ]
    logits = {}

    def model(tokens: mx.array) -> mx.array:  # the same logits for the same tokens in both builds
        key = np.asarray(tokens).tobytes()
        if key not in logits:
            logits[key] = synthetic_logits(rng, tokens.size, vocab).reshape(*tokens.shape, vocab)
        return mx.array(logits[key])

    built = {
        v: cache_mod.build(
            model,
            examples,
            tmp_path / f"f{v}",
            key=f"f{v}",
            top_k=32,
            batch_size=2,
            pad_id=0,
            meta={},
            format_version=v,
        )
        for v in (1, 2)
    }
    assert built[1].meta["bytes_per_token"] == 32 * 2 + 32 * 2 + 4 and built[2].meta["bytes_per_token"] < 70
    assert built[2].meta["reconstruction_kl"] == pytest.approx(built[1].meta["reconstruction_kl"], rel=0.01)
    order = np.array([4, 0, 3])
    (i1, l1, t1), (i2, l2, t2) = (built[v].rows(order, 31) for v in (1, 2))
    np.testing.assert_array_equal(i1[..., 0], i2[..., 0])
    np.testing.assert_array_equal(np.sort(i1, -1), np.sort(i2, -1))
    np.testing.assert_allclose(t1, t2, atol=2e-2, rtol=1e-3)
    s1, s2 = by_id(i1.astype(np.int64), l1)[1], by_id(i2.astype(np.int64), l2)[1]
    valid = np.arange(31)[None, :, None] < np.array([30, 30, 7])[:, None, None]
    assert np.abs(np.exp(s1 / 2) - np.exp(s2 / 2))[np.broadcast_to(valid, s1.shape)].max() < 0.05


def test_a_build_stopped_midway_leaves_nothing(tmp_path):
    from worker.engine.errors import Cancelled

    rng = np.random.default_rng(4)
    vocab = 1000
    examples = [
        data_mod.Example(tokens=rng.integers(0, vocab, 9), target_mask=np.ones(9, bool), source=i) for i in range(6)
    ]
    calls = iter(range(100))

    def model(tokens: mx.array) -> mx.array:
        return mx.array(synthetic_logits(rng, tokens.size, vocab).reshape(*tokens.shape, vocab))

    with pytest.raises(Cancelled):  # stopped after two batches were written
        cache_mod.build(
            model,
            examples,
            tmp_path / "c",
            key="c",
            top_k=8,
            batch_size=2,
            pad_id=0,
            meta={},
            should_stop=lambda: next(calls) >= 2,
        )
    assert list(tmp_path.iterdir()) == []
