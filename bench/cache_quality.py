"""Teacher cache size vs fidelity for several k, on real text: bytes per token, reconstruction KL, top-k mass.

    .venv/bin/python bench/cache_quality.py [--model DIR] [--tokens 4096] [--seq 128] [--ks 16,64,256] [--quick]

For each k a real cache is built with `cache.build` over the same Shakespeare windows (realdata.shakespeare_splits,
engine tokenization). Then, batch by batch, the teacher's full distribution is compared with what the cache
holds (rows read back from disk: float16 log-probs, float32 tail): `cache.reconstruction_kl`, i.e.
KL(full teacher || top-k + uniform tail), over all target positions (row i predicts token i + 1, counted
where token i + 1 is a target), and the probability mass the top-k ids carry in the full distribution.

Columns: row bytes/token = the top-k arrays only (what meta.json's bytes_per_token reports: ids + float16
log-probs + float32 tail); disk bytes/token = every file of the cache folder / tokens (adds tokens, mask,
offsets, headers). KL in nats per position, token-weighted mean over all target positions; mass = Σ p over
the top-k ids (mean and 10th percentile over positions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (first: enables OpenBLAS before MLX is imported)
import mlx.core as mx  # noqa: E402
from _common import np  # noqa: E402

from worker.engine import cache as cache_mod  # noqa: E402
from worker.engine import data as data_mod  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(p)
    _common.add_against_args(p)
    p.add_argument("--tokens", type=int, default=None, help="tokens of text (default 4096; quick 512)")
    p.add_argument("--seq", type=int, default=None, help="tokens per example (default 128; quick 32)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--ks",
        default=None,
        help="comma-separated k values (default 16,64,256; quick 16,64,256 capped below the vocabulary)",
    )
    args = p.parse_args()
    if args.against:
        return _common.run_against(args.against, args.against_runs)
    args.tokens = args.tokens or (512 if args.quick else 4096)
    args.seq = args.seq or (32 if args.quick else 128)
    args.ks = [int(x) for x in (args.ks or "16,64,256").split(",")]
    _common.header("cache_quality: teacher cache bytes/token vs reconstruction KL", args)
    _common.run_in_tmp("bench-cache-quality-", run, args)


def run(args, tmp: Path) -> None:
    model_dir, model, tokenizer, pad_id = _common.load_model(args, tmp)
    examples = _common.shakespeare_examples(tokenizer, max(1, args.tokens // args.seq), args.seq, tmp)
    lengths = [len(e.tokens) for e in examples]
    n_tokens = sum(lengths)
    V = model.args.vocab_size
    ks = [k for k in args.ks if k < V]
    print(f"model: {model_dir} ({len(model.layers)} layers, vocab {V})")
    print(f"data: {len(examples)} Shakespeare windows x {args.seq} tokens = {n_tokens} tokens; k = {ks}")

    caches = {}
    for k in ks:
        c = cache_mod.build(
            model,
            examples,
            tmp / f"cache-k{k}",
            key=f"k{k}",
            top_k=k,
            batch_size=args.batch,
            pad_id=pad_id,
            meta={},
            sample_batches=0,
        )
        disk = sum(f.stat().st_size for f in c.path.iterdir() if f.suffix == ".npy")
        caches[k] = (c, disk)
        print(f"  built k={k}: {c.meta['build_tokens_per_second']:.0f} tok/s", flush=True)

    kl_sum = {k: 0.0 for k in ks}
    mass = {k: [] for k in ks}
    ent, counted = [], 0
    for idx in data_mod.eval_batches(lengths, args.batch):
        toks, tmask = data_mod.collate([examples[i] for i in idx], pad_id)
        logits = model(mx.array(toks)).astype(mx.float32)
        nxt = np.zeros_like(tmask)
        nxt[:, :-1] = tmask[:, 1:]
        m = mx.array(nxt)
        n = int(nxt.sum())
        counted += n
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(logp)
        sel = nxt.astype(bool)
        ent.append(np.array(-(mx.exp(logp) * logp).sum(-1))[sel])
        for k in ks:
            c = caches[k][0]
            ids, lps, tail = c.rows(np.asarray(idx), toks.shape[1])
            ids, lps, tail = mx.array(ids), mx.array(lps), mx.array(tail)
            kl_sum[k] += cache_mod.reconstruction_kl(logits, ids, lps, tail, m) * n
            topmass = mx.exp(mx.take_along_axis(logp, ids.astype(mx.int32), axis=-1)).sum(-1)
            mass[k].append(np.array(topmass)[sel])
    entropy = np.concatenate(ent)
    print(
        f"\nteacher entropy over the {counted} target positions: mean {entropy.mean():.3f} nats, "
        f"median {np.median(entropy):.3f}"
    )
    print(f"\n{'k':>5} {'row B/tok':>10} {'disk B/tok':>11} {'mean KL (nats)':>15} {'top-k mass':>11} {'mass p10':>9}")
    parts = []
    for k in ks:
        c, disk = caches[k]
        kl = kl_sum[k] / counted
        mk = np.concatenate(mass[k])
        print(
            f"{k:5d} {c.meta['bytes_per_token']:10d} {disk / n_tokens:11.1f} "
            f"{kl:15.4f} {mk.mean():11.4f} {np.percentile(mk, 10):9.4f}"
        )
        parts.append(f"k{k}_bytes={c.meta['bytes_per_token']} k{k}_kl={kl:.4f} k{k}_mass={mk.mean():.4f}")
    print()
    print(_common.load_note())
    print(f"RESULT name=cache_quality tokens={counted} " + " ".join(parts))


if __name__ == "__main__":
    main()
