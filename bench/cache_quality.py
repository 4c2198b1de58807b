"""Teacher cache size vs fidelity for several k and both formats, on real text: bytes per token, reconstruction KL.

    .venv/bin/python bench/cache_quality.py [--model DIR] [--tokens 4096] [--seq 128] [--ks 16,64,256]
                                            [--formats 1,2] [--quick]

For each k and each cache format a real cache is built with `cache.build` over the same Shakespeare windows
(realdata.shakespeare_splits, engine tokenization): format 1 (uint16/int32 ids, float16 log-probs, float32
tail) and format 2 (worker/engine/cache_codec.py: gap-coded ids, √p-quantised log-probs, float16 tail). Then,
batch by batch, the teacher's full distribution is compared with what each cache holds (rows read back from
disk with `TeacherCache.rows`): `cache.reconstruction_kl`, i.e. KL(full teacher || top-k + uniform tail), over
all target positions (row i predicts token i + 1, counted where token i + 1 is a target), and the probability
mass the top-k ids carry in the full distribution (the same ids in both formats).

Columns: row B/tok = what meta.json's bytes_per_token reports: the rows only (format 1: ids + log-probs +
tail; format 2: heads, tails, both bit streams and their per-example offsets, over the tokens); disk B/tok =
every array and stream file of the cache folder / tokens (adds tokens, mask, offsets, .npy headers). KL in
nats per position, token-weighted mean over all target positions; ΔKL = this format's KL - format 1's (the
quantisation's cost; the uniform tail dominates KL itself); mass = Σ p over the top-k ids (mean and 10th
percentile over positions). RESULT's k*_bytes / k*_kl are the format `build` writes by default (so that
`--against` compares the defaults of two revisions), f<v>_k* each format.
"""

from __future__ import annotations

import argparse
import inspect
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
    p.add_argument("--formats", default="1,2", help="comma-separated cache formats to build (default 1,2)")
    args = p.parse_args()
    if args.against:
        return _common.run_against(args.against, args.against_runs)
    args.tokens = args.tokens or (512 if args.quick else 4096)
    args.seq = args.seq or (32 if args.quick else 128)
    args.ks = [int(x) for x in (args.ks or "16,64,256").split(",")]
    args.formats = [int(x) for x in args.formats.split(",")]
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

    # an engine from before format 2 (--against an older revision) builds format 1 only, without the argument
    versioned = "format_version" in inspect.signature(cache_mod.build).parameters
    default = getattr(cache_mod, "FORMAT_VERSION", 1)
    formats = args.formats if versioned else [1]
    caches = {}
    for k in ks:
        for f in formats:
            c = cache_mod.build(
                model,
                examples,
                tmp / f"cache-k{k}-f{f}",
                key=f"k{k}-f{f}",
                top_k=k,
                batch_size=args.batch,
                pad_id=pad_id,
                meta={},
                sample_batches=0,
                **({"format_version": f} if versioned else {}),
            )
            disk = sum(x.stat().st_size for x in c.path.iterdir() if x.suffix in (".npy", ".bin"))
            caches[k, f] = (c, disk)
            print(f"  built k={k} format {f}: {c.meta['build_tokens_per_second']:.0f} tok/s", flush=True)

    kl_sum = dict.fromkeys(caches, 0.0)
    mass = {key: [] for key in caches}
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
        for key, (c, _) in caches.items():
            ids, lps, tail = c.rows(np.asarray(idx), toks.shape[1])
            ids, lps, tail = mx.array(ids), mx.array(lps), mx.array(tail)
            kl_sum[key] += cache_mod.reconstruction_kl(logits, ids, lps, tail, m) * n
            topmass = mx.exp(mx.take_along_axis(logp, ids.astype(mx.int32), axis=-1)).sum(-1)
            mass[key].append(np.array(topmass)[sel])
    entropy = np.concatenate(ent)
    print(
        f"\nteacher entropy over the {counted} target positions: mean {entropy.mean():.3f} nats, "
        f"median {np.median(entropy):.3f}"
    )
    print(
        f"\n{'k':>5} {'format':>6} {'row B/tok':>10} {'disk B/tok':>11} {'mean KL (nats)':>15} {'ΔKL vs f1':>18} "
        f"{'top-k mass':>11} {'mass p10':>9}"
    )
    parts = []
    for k, f in caches:
        c, disk = caches[k, f]
        kl = kl_sum[k, f] / counted
        base = kl_sum[k, 1] / counted if (k, 1) in caches else None
        delta = (
            f"{kl - base:+.6f}" + (f" {(kl - base) / base * 100:+.2f}%" if base else "") if base is not None else "-"
        )
        mk = np.concatenate(mass[k, f])
        print(
            f"{k:5d} {f:6d} {c.meta['bytes_per_token']:10.1f} {disk / n_tokens:11.1f} "
            f"{kl:15.6f} {delta:>18} {mk.mean():11.4f} {np.percentile(mk, 10):9.4f}"
        )
        parts.append(f"f{f}_k{k}_bytes={c.meta['bytes_per_token']} f{f}_k{k}_kl={kl:.6f}")
        if f == default or not versioned:
            parts.append(f"k{k}_bytes={c.meta['bytes_per_token']} k{k}_kl={kl:.4f} k{k}_mass={mk.mean():.4f}")
    print()
    print(_common.load_note())
    print(f"RESULT name=cache_quality tokens={counted} " + " ".join(parts))


if __name__ == "__main__":
    main()
