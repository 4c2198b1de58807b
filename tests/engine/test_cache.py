"""Teacher cache: top-k extraction, content-addressed reuse, memory-mapped rows, reconstruction error."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from worker.engine import cache as cache_mod
from worker.engine import data as data_mod
from worker.engine import distill, models
from worker.engine.train import Hooks


def test_teacher_topk_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(2, 5, 50)).astype(np.float32)
    ids, lps, tail = cache_mod.teacher_topk(mx.array(logits), 8)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref_ids = np.argsort(-logp, axis=-1)[..., :8]
    np.testing.assert_array_equal(np.array(ids), ref_ids)
    np.testing.assert_allclose(np.array(lps), np.take_along_axis(logp, ref_ids, -1), atol=1e-5)
    ref_tail = np.log(1 - np.exp(np.take_along_axis(logp, ref_ids, -1)).sum(-1))
    np.testing.assert_allclose(np.array(tail), ref_tail, rtol=1e-3)  # 1 - sum(p) in float32


def test_reconstruction_kl_is_zero_for_uniform_tail_and_positive_otherwise():
    vocab, k = 20, 4
    top = np.array([3.0, 2.0, 1.0, 0.5], dtype=np.float32)
    flat = np.concatenate([top, np.zeros(vocab - k, dtype=np.float32)])  # tail exactly uniform
    ids, lps, tail = cache_mod.teacher_topk(mx.array(flat[None, None]), k)
    mask = mx.ones((1, 1))
    assert cache_mod.reconstruction_kl(mx.array(flat[None, None]), ids, lps, tail, mask) == pytest.approx(0, abs=1e-3)
    skewed = flat.copy()
    skewed[k:] = np.linspace(-3, 0.4, vocab - k)
    ids, lps, tail = cache_mod.teacher_topk(mx.array(skewed[None, None]), k)
    assert cache_mod.reconstruction_kl(mx.array(skewed[None, None]), ids, lps, tail, mask) > 0.01


def test_cache_key_is_unchanged_by_format_2():
    # the key of format 1's code: a cache built before format 2 from the same inputs is still found and reused
    import hashlib
    import json

    parts = {
        "v": 1,
        "teacher": "t",
        "tokenizer": "tok",
        "dataset": "d",
        "top_k": 64,
        "max_seq_len": 512,
        "template": "",
    }
    old = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    assert (
        cache_mod.cache_key(teacher="t", tokenizer="tok", dataset="d", top_k=64, max_seq_len=512, template=None) == old
    )


def test_cache_key_changes_with_every_input():
    base = dict(teacher="t", tokenizer="tok", dataset="d", top_k=64, max_seq_len=512, template=None)
    key = cache_mod.cache_key(**base)
    assert cache_mod.cache_key(**base) == key
    for field, other in [
        ("teacher", "t2"),
        ("tokenizer", "x"),
        ("dataset", "d2"),
        ("top_k", 16),
        ("max_seq_len", 256),
        ("template", "{{ x }}"),
    ]:
        assert cache_mod.cache_key(**{**base, field: other}) != key, field


def test_build_store_and_reuse(tiny_teacher, tiny_text, tmp_path):
    tok = models.load_tokenizer(tiny_teacher)
    ds = data_mod.load_jsonl(tiny_text["valid"])
    examples = data_mod.tokenize(ds, tok, 64)
    store = cache_mod.CacheStore(tmp_path / "caches")
    events = []
    hooks = Hooks(on_event=lambda kind, msg, data: events.append((kind, data)))
    built = distill.ensure_cache(tiny_teacher, ds, examples, tok, top_k=16, max_seq_len=64, store=store, hooks=hooks)
    assert [d["hit"] for k, d in events if k == "teacher_cache"] == [False, False]
    # rows equal a direct teacher forward on one example: the same top-k set, best first, log-probs within the
    # codec's error, the tail as float16
    model = models.load_model(tiny_teacher)[0]
    e = examples[3]
    ids, lps, tail = cache_mod.teacher_topk(model(mx.array(e.tokens[None])), 16)
    n = len(e.tokens)
    r_ids, r_lps, r_tail = built.rows(np.array([3]), n)
    ids, lps = np.array(ids[0]), np.array(lps[0])
    np.testing.assert_array_equal(np.sort(r_ids[0], axis=-1), np.sort(ids, axis=-1))
    np.testing.assert_array_equal(r_ids[0, :, 0], ids[:, 0])
    by_id = np.take_along_axis(r_lps[0], np.argsort(r_ids[0], -1), -1)
    ref = np.take_along_axis(lps, np.argsort(ids, -1), -1)
    step = built.meta["codec"]["lp_step"]
    big = ref > 2 * math.log(2 * step)  # √p > 2 steps: within half a step, plus the renormalisation
    assert np.abs(np.exp(by_id / 2) - np.exp(ref / 2))[big].max() < step
    np.testing.assert_allclose(r_tail[0], np.array(tail[0]), atol=1e-2, rtol=1e-3)
    meta = built.meta
    assert meta["format_version"] == 2
    arrays = sum(np.load(built.path / f, mmap_mode="r").nbytes for f in ("head.npy", "tail.npy", "streams.npy"))
    streams = sum((built.path / f).stat().st_size for f in ("unary.bin", "payload.bin"))
    assert meta["bytes_per_token"] == pytest.approx((arrays + streams) / meta["tokens"], abs=0.01)
    assert isinstance(built.reader.head, np.memmap) and isinstance(built.reader.payload, np.memmap)
    assert meta["bytes_per_token"] < 16 * 2 + 16 * 2 + 4  # format 1's row
    assert meta["reconstruction_kl"] >= 0 and math.isfinite(meta["reconstruction_kl"])
    assert [list(x.tokens) for x in built.examples()] == [list(x.tokens) for x in examples]

    events.clear()
    again = distill.ensure_cache(tiny_teacher, ds, examples, tok, top_k=16, max_seq_len=64, store=store, hooks=hooks)
    assert again.path == built.path
    assert [d["hit"] for k, d in events if k == "teacher_cache"] == [True]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")], "no temporary folder left behind"


def test_rows_pad_to_length(tiny_teacher, tiny_text, tmp_path):
    tok = models.load_tokenizer(tiny_teacher)
    ds = data_mod.load_jsonl(tiny_text["valid"])
    examples = data_mod.tokenize(ds, tok, 32)
    store = cache_mod.CacheStore(tmp_path)
    c = distill.ensure_cache(tiny_teacher, ds, examples, tok, top_k=4, max_seq_len=32, store=store, hooks=Hooks())
    ids, lps, tail = c.rows(np.array([0, 1]), 40)
    assert ids.shape == (2, 40, 4) and lps.shape == (2, 40, 4) and tail.shape == (2, 40)
    n0 = len(examples[0].tokens)
    assert (ids[0, n0:] == 0).all() and (lps[0, :n0] <= 0).all()


def test_cancelled_build_leaves_nothing(tiny_teacher, tiny_text, tmp_path):
    from worker.engine.errors import Cancelled

    tok = models.load_tokenizer(tiny_teacher)
    ds = data_mod.load_jsonl(tiny_text["valid"])
    examples = data_mod.tokenize(ds, tok, 64)
    store = cache_mod.CacheStore(tmp_path / "c")
    with pytest.raises(Cancelled):
        distill.ensure_cache(
            tiny_teacher, ds, examples, tok, top_k=4, max_seq_len=64, store=store, hooks=Hooks(should_stop=lambda: True)
        )
    assert list(store.root.iterdir()) == []


def test_subset_cache_and_whole_cache_preferred(tiny_teacher, tiny_text, tmp_path):
    tok = models.load_tokenizer(tiny_teacher)
    ds = data_mod.load_jsonl(tiny_text["train"])
    examples = data_mod.tokenize(ds, tok, 64)
    store = cache_mod.CacheStore(tmp_path)
    subset = np.array([1, 4, 9])
    part = distill.ensure_cache(
        tiny_teacher, ds, examples, tok, top_k=4, max_seq_len=64, store=store, hooks=Hooks(), subset=subset
    )
    assert len(part) == 3 and list(part.sources) == [1, 4, 9]
    assert list(part.positions(np.array([4, 9]))) == [1, 2]
    with pytest.raises(RuntimeError, match="lacks"):
        part.positions(np.array([2]))
    s, e = part.offsets[1], part.offsets[2]
    assert list(part.tokens[s:e]) == list(examples[4].tokens)
    # once the whole dataset is cached, a subset request is served by it
    whole = distill.ensure_cache(tiny_teacher, ds, examples, tok, top_k=4, max_seq_len=64, store=store, hooks=Hooks())
    assert len(whole) == len(examples) and whole.path != part.path
    again = distill.ensure_cache(
        tiny_teacher, ds, examples, tok, top_k=4, max_seq_len=64, store=store, hooks=Hooks(), subset=np.array([2, 3])
    )
    assert again.path == whole.path
    for a, b in zip(whole.rows(np.array([4]), 64), part.rows(np.array([1]), 64)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("vocab, k", [(4096, 16), (5003, 64), (700, 64)])
def test_block_topk_is_exact_on_large_vocabularies(vocab, k):
    # 700/32 = 22 blocks <= k: the plain full-vocabulary partition; the others take the two-stage path
    rng = np.random.default_rng(vocab)
    logits = rng.normal(0, 4, size=(3, 7, vocab)).astype(np.float32)
    ids, lps, tail = cache_mod.teacher_topk(mx.array(logits), k)
    logp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    ref = np.argsort(-logp, axis=-1)[..., :k]
    np.testing.assert_array_equal(np.array(ids), ref)
    np.testing.assert_allclose(np.array(lps), np.take_along_axis(logp, ref, -1), atol=1e-4)
    ref_tail = np.log1p(-np.exp(np.take_along_axis(logp, ref, -1)).sum(-1))
    np.testing.assert_allclose(np.array(tail), ref_tail, rtol=1e-3, atol=1e-4)


def test_reconstruction_kl_matches_float64_reference():
    rng = np.random.default_rng(5)
    vocab, k = 300, 8
    logits = rng.normal(0, 3, size=(2, 5, vocab)).astype(np.float32)
    mask = np.ones((2, 5), dtype=bool)
    mask[1, 3:] = False
    ids, lps, tail = cache_mod.teacher_topk(mx.array(logits), k)
    logp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    recon = np.repeat(
        (np.log1p(-np.exp(np.take_along_axis(logp, np.array(ids), -1)).sum(-1)) - np.log(vocab - k))[..., None],
        vocab,
        axis=-1,
    )
    stored = np.array(lps).astype(np.float16)  # as format 1 gives them back
    np.put_along_axis(recon, np.array(ids), stored.astype(np.float64), axis=-1)
    ref = (np.exp(logp) * (logp - recon)).sum(-1)[mask].mean()
    assert cache_mod.reconstruction_kl(mx.array(logits), ids, stored, tail, mask) == pytest.approx(ref, rel=1e-3)
