"""Benchmarks (SPEC §4 `benchmark`): candidates measured against a reference model on held-out data.

Every model gets one row of `report.json`, the reference included (under its own label). Per phase:

  text        on text / completions / chat data, over the positions training uses as targets (the masks of
              `data.tokenize`): KL(reference ‖ candidate) over the full vocabulary at T = 1 (exact, not top-k),
              Jensen-Shannon, top-1 agreement (same argmax), top-5 agreement (the reference's argmax among
              the candidate's 5 highest logits), cross-entropy on the data's own next tokens and its exp (ppl).
  mcq         each choice scored by the summed log-likelihood of " " + choice after `MCQ_PROMPT` (plain text,
              never the chat template); the highest score is the model's answer. `mcq_accuracy_norm` divides
              each score by the choice's token count first.
  preference  log p(chosen | prompt) vs log p(rejected | prompt), summed over the continuation's tokens (prompt
              and continuation concatenated as they are, like `completions`). `pref_accuracy`: chosen scores
              strictly higher; `pref_agreement`: the candidate orders the pair as the reference does.
  speed       each model loaded alone once the quality phases have released the others: mlx-lm's
              `stream_generate` (greedy, end-of-sequence suppressed so every run decodes the same number of
              tokens) on a fixed random prompt; prefill and decode tokens per second, and MLX's peak memory.
  size        parameters of the base model (adapter parameters apart), bytes on disk, compression ratios.

The engine only sees local paths (`BenchmarkInputs`); the caller resolves ids. Writes `report.json`,
`report.md` and PNG charts into `out_dir`.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import data as data_mod
from . import losses, models, preflight, report
from .errors import Cancelled, UserError
from .spec import BenchmarkSpec
from .train import Hooks

MCQ_PROMPT = "Question: {question}\nAnswer:"
"""Multiple-choice prompt; each choice is scored as the continuation " " + choice. Deliberately plain text even
when the tokenizer has a chat template: one fixed format for every model, base or instruction-tuned."""

REFERENCE_LABEL = "reference"
HEADLINE = ("ppl", "kl", "top1_agreement", "mcq_accuracy", "pref_accuracy", "prefill_tokens_per_second",
            "decode_tokens_per_second", "peak_memory_bytes", "compression_ratio_params")
TEXT_FORMATS = data_mod.TRAINABLE_FORMATS

DEFINITIONS = {
    "kl": "forward KL(reference || model) per target token, full vocabulary, T = 1 (nats)",
    "js": "Jensen-Shannon divergence between reference and model per target token (nats)",
    "top1_agreement": "share of target tokens where the model's argmax equals the reference's",
    "top5_agreement": "share of target tokens where the reference's argmax is among the model's 5 highest logits",
    "ce": "mean cross-entropy of the data's own next tokens (nats); ppl = exp(ce)",
    "mcq_accuracy": "share of questions whose answer has the highest summed log-likelihood of ' ' + choice "
                    "after 'Question: ...\\nAnswer:'",
    "mcq_accuracy_norm": "as mcq_accuracy, each choice's log-likelihood divided by its token count",
    "pref_accuracy": "share of pairs with log p(chosen | prompt) > log p(rejected | prompt), summed over tokens "
                     "(a tie counts as wrong)",
    "pref_agreement": "share of pairs the model orders (chosen vs rejected) as the reference does",
    "prefill_tokens_per_second": "prompt tokens / time to the first generated token (mlx-lm stream_generate)",
    "decode_tokens_per_second": "generated tokens / seconds since the first one appeared (mlx-lm's generation_tps)",
    "peak_memory_bytes": "peak of MLX-allocated memory while generating (weights, KV cache, activations; "
                         "not the Python process's other memory), the model loaded alone",
    "parameters": "parameters of the base model (quantized weights counted unpacked); adapter_parameters apart",
    "size_bytes": "bytes on disk: the model's *.safetensors plus the adapter's files",
    "compression_ratio_params": "reference parameters / model parameters (base + LoRA/DoRA adapter)",
    "compression_ratio_size": "reference size_bytes / model size_bytes",
}


@dataclass
class CandidateInput:
    label: str
    model: Path
    adapter: Path | None = None
    metrics: Path | None = None  # metrics.jsonl of the distill run that made the adapter: training curves


@dataclass
class BenchmarkInputs:
    """A benchmark spec with every reference resolved to a local path (candidates in the spec's order)."""

    reference: Path
    candidates: list[CandidateInput]
    text: Path | None = None
    mcq: Path | None = None
    preference: Path | None = None


@dataclass(eq=False)  # hashed by identity: rows key the per-phase results
class Row:
    """One model of the report: the reference or a candidate."""

    label: str
    name: str                 # the model as the spec names it
    adapter_name: str | None
    path: Path
    adapter: Path | None
    field: str                # where it is in the spec, for error messages: "reference" or "candidates.N"
    is_reference: bool = False
    metrics: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[Path, Path | None]:
        """Rows with the same key are the same model: loaded, evaluated and timed once."""
        return self.path.resolve(), self.adapter.resolve() if self.adapter else None


# --------------------------------------------------------------------------------------------- metrics


def reference_view(ref_logits: mx.array) -> tuple[mx.array, mx.array]:
    """(log p, argmax) of the reference's logits [..., V]: computed once per batch, shared by every candidate."""
    return losses.log_softmax_t(ref_logits), mx.argmax(ref_logits, axis=-1)


def js_divergence(log_p: mx.array, log_q: mx.array) -> mx.array:
    """JS(p, q) = ½ KL(p‖m) + ½ KL(q‖m), m = (p + q) / 2, over the last axis.

    Each term is taken as exactly 0 where log p == log q, so a model compared with itself scores exactly 0.
    """
    log_m = mx.logaddexp(log_p, log_q) - math.log(2.0)
    same = log_p == log_q
    p_term = mx.where(same, 0.0, mx.exp(log_p) * (log_p - log_m))
    q_term = mx.where(same, 0.0, mx.exp(log_q) * (log_q - log_m))
    return 0.5 * (p_term + q_term).sum(axis=-1)


def text_sums(ref: tuple[mx.array, mx.array], logits: mx.array, targets: mx.array, mask: mx.array) -> dict:
    """Sums over the masked positions of ce, kl, js, top1, top5, and their count `tokens`.

    ref: `reference_view` of the reference's logits; logits [B, L, V]; targets, mask [B, L].
    """
    log_p, ref_top = ref
    logits = logits.astype(mx.float32)
    log_q = losses.log_softmax_t(logits)
    m = mask.astype(mx.float32)
    at_ref_top = mx.take_along_axis(logits, ref_top[..., None], axis=-1)
    rank = (logits > at_ref_top).sum(axis=-1)  # logits strictly above the one at the reference's argmax
    per_position = {
        "kl": losses.divergence("forward_kl", log_p, log_q),
        "js": js_divergence(log_p, log_q),
        "top1": (mx.argmax(logits, axis=-1) == ref_top).astype(mx.float32),
        "top5": (rank < 5).astype(mx.float32),
    }
    sums = {k: (v * m).sum() for k, v in per_position.items()}
    sums["ce"] = losses.masked_cross_entropy_sum(logits, targets, mask != 0)
    sums["tokens"] = m.sum()
    return sums


def text_metrics(sums: dict[str, float]) -> dict:
    """Means per target token from accumulated `text_sums`; ppl = exp(ce)."""
    n = max(sums["tokens"], 1.0)
    ce = sums["ce"] / n
    return {"ppl": math.exp(min(ce, 50.0)), "ce": ce, "kl": sums["kl"] / n, "js": sums["js"] / n,
            "top1_agreement": sums["top1"] / n, "top5_agreement": sums["top5"] / n, "tokens": int(sums["tokens"])}


def sequence_logprobs(model, tokens: mx.array, target_mask: mx.array) -> tuple[mx.array, mx.array]:
    """(Σ log p(token) over each row's target positions, number of targets) for tokens [B, L].

    target_mask [B, L] is aligned with `tokens` like `data.Example.target_mask` (True: a scored token).
    """
    logits = model(tokens[:, :-1])
    log_q = losses.log_softmax_t(logits)
    picked = mx.take_along_axis(log_q, tokens[:, 1:, None].astype(mx.int32), axis=-1)[..., 0]
    m = target_mask[:, 1:]
    return mx.where(m, picked, 0.0).sum(axis=-1), m.astype(mx.int32).sum(axis=-1)


def mcq_metrics(scores: list[list[float]], n_tokens: list[list[int]], answers: list[int],
                subjects: list[str | None]) -> dict:
    """Accuracy (argmax of summed log-likelihood), length-normalised accuracy, and per-subject accuracy."""
    right = np.array([int(np.argmax(s)) == a for s, a in zip(scores, answers)])
    right_norm = np.array([int(np.argmax(np.asarray(s) / np.maximum(np.asarray(n), 1))) == a
                           for s, n, a in zip(scores, n_tokens, answers)])
    out = {"mcq_accuracy": float(right.mean()), "mcq_accuracy_norm": float(right_norm.mean()), "mcq_n": len(answers)}
    if any(s is not None for s in subjects):
        by = {}
        for subject in sorted({s for s in subjects if s is not None}):
            pick = np.array([s == subject for s in subjects])
            by[subject] = {"accuracy": float(right[pick].mean()), "n": int(pick.sum())}
        out["mcq_by_subject"] = by
    return out


def pref_metrics(chosen: np.ndarray, rejected: np.ndarray, ref_chosen: np.ndarray, ref_rejected: np.ndarray) -> dict:
    """pref_accuracy: chosen strictly above rejected; pref_agreement: same ordering (sign) as the reference."""
    mine, theirs = np.sign(chosen - rejected), np.sign(ref_chosen - ref_rejected)
    return {"pref_accuracy": float((mine > 0).mean()), "pref_agreement": float((mine == theirs).mean()),
            "pref_n": len(chosen)}


def continuation_examples(tokenizer, pairs: list[tuple[str, str]], max_seq_len: int) -> list[data_mod.Example]:
    """prompt + continuation with the continuation's tokens as targets, at most the last `max_seq_len` tokens.

    Encoded in two parts (the prompt with the tokenizer's special tokens, the continuation without), as
    `completions` data is, so the boundary is exact in tokens.
    """
    examples = []
    for i, (prompt, continuation) in enumerate(pairs):
        p = tokenizer.encode(prompt)
        c = tokenizer.encode(continuation, add_special_tokens=False)
        tokens = np.array(p + c, dtype=np.int32)[-max_seq_len:]
        mask = np.array([False] * len(p) + [True] * len(c))[-max_seq_len:]
        mask[0] = False
        examples.append(data_mod.Example(tokens, mask, i))
    return examples


def measure_speed(model, tokenizer, prompt_tokens: int, decode_tokens: int, repeats: int = 1) -> dict:
    """Prefill / decode tokens per second (medians over `repeats`, after a warm-up) and MLX's peak memory.

    The prompt is `prompt_tokens` fixed pseudo-random token ids; end-of-sequence tokens are suppressed so
    every run decodes exactly `decode_tokens` tokens.
    """
    from mlx_lm.generate import stream_generate

    vocab = len(tokenizer.get_vocab())
    prompt = mx.array(np.random.default_rng(0).integers(0, vocab, prompt_tokens), dtype=mx.int32)
    eos = mx.array(sorted(tokenizer.eos_token_ids or []), dtype=mx.int32)[None]

    def no_eos(_tokens, logits):
        return mx.put_along_axis(logits, eos, mx.array(-mx.inf, logits.dtype), axis=-1) if eos.size else logits

    def once(n: int):
        last = None
        for last in stream_generate(model, tokenizer, prompt, max_tokens=n, logits_processors=[no_eos]):
            pass
        return last

    once(min(decode_tokens, 2))  # warm-up: first-call allocations and kernel setup
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    runs = [once(decode_tokens) for _ in range(repeats)]
    return {"prefill_tokens_per_second": statistics.median(r.prompt_tps for r in runs),
            "decode_tokens_per_second": statistics.median(r.generation_tps for r in runs),
            "peak_memory_bytes": int(mx.get_peak_memory()),
            "speed_prompt_tokens": prompt_tokens, "speed_decode_tokens": runs[-1].generation_tokens}


# ------------------------------------------------------------------------------------------- the run


class _Steps:
    """Progress over work units (a batch of one phase, or one model's speed test), with cancellation."""

    def __init__(self, total: int, hooks: Hooks, on_progress: Callable[[dict], None] | None):
        self.total, self.hooks, self.on_progress, self.step = total, hooks, on_progress, 0

    def __call__(self, phase: str) -> None:
        if self.hooks.should_stop and self.hooks.should_stop():
            raise Cancelled(f"benchmark cancelled during the {phase} phase")
        self.step += 1
        if self.on_progress:
            self.on_progress({"step": self.step, "total_steps": self.total, "phase": phase})


def run_benchmark(spec: BenchmarkSpec, inputs: BenchmarkInputs, out_dir: Path, hooks: Hooks | None = None,
                  on_progress: Callable[[dict], None] | None = None) -> dict:
    """Run every phase the data allows, write report.json / report.md / charts; return a small summary."""
    hooks = hooks or Hooks()
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)

    # -- pre-flight: tokenizers and data only, no weights loaded
    rows = _rows(spec, inputs)
    tokenizer = _check_models(rows)
    datasets = _load_data(spec, inputs, tokenizer)
    text_ex = _text_examples(datasets, tokenizer, spec)
    mcq_ex, pref_ex = _mcq_examples(datasets, tokenizer, spec), _pref_examples(datasets, tokenizer, spec)
    n_batches = [len(data_mod.eval_batches([len(e.tokens) for e in ex], spec.batch_size)) if ex else 0
                 for ex in (text_ex, mcq_ex, pref_ex)]
    timed = list({r.key: r for r in rows}.values()) if spec.speed.enabled else []
    steps = _Steps(sum(n_batches) + len(timed), hooks, on_progress)
    hooks.event("preflight", f"benchmark of {len(rows)} models on {', '.join(datasets)}",
                models=[r.label for r in rows], datasets={k: len(d.records) for k, d in datasets.items()})

    # -- quality: every model loaded at once (fine at this product's sizes: a teacher and a few small students),
    #    so each batch runs the reference once and every candidate against those same logits
    loaded = _load_all(rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if text_ex:
        hooks.event("phase", f"text: {len(text_ex)} sequences", phase="text")
        for row, m in _text_phase(loaded, text_ex, spec.batch_size, pad_id, steps).items():
            row.metrics.update(m)
    if mcq_ex:
        hooks.event("phase", f"mcq: {len(datasets['mcq'].records)} questions", phase="mcq")
        scores = _loglik_phase(loaded, mcq_ex, spec.batch_size, pad_id, steps, "mcq")
        recs = datasets["mcq"].records
        for row, (ll, n) in scores.items():
            row.metrics.update(_mcq_result(recs, ll, n))
    if pref_ex:
        hooks.event("phase", f"preference: {len(datasets['preference'].records)} pairs", phase="preference")
        scores = _loglik_phase(loaded, pref_ex, spec.batch_size, pad_id, steps, "preference")
        ref_ll = scores[rows[0]][0]
        for row, (ll, _) in scores.items():
            row.metrics.update(pref_metrics(ll[0::2], ll[1::2], ref_ll[0::2], ref_ll[1::2]))
    del loaded
    _release()

    # -- speed and memory: each model alone
    for row in timed:
        steps("speed")
        hooks.event("phase", f"speed: {row.label}", phase="speed", label=row.label)
        model, tok, _ = _load(row)
        result = measure_speed(model, tok, spec.speed.prompt_tokens, spec.speed.decode_tokens, spec.speed.repeats)
        del model
        _release()
        for other in rows:
            if other.key == row.key:
                other.metrics.update(result)
    _sizes(rows)

    rep = _report(spec, rows, datasets, text_ex)
    curves = {c.label: c.metrics for c in inputs.candidates if c.metrics is not None and c.metrics.is_file()}
    rep["charts"] = report.write_charts(rep, out_dir, curves)
    rep["wall_seconds"] = time.perf_counter() - t_start
    (out_dir / "report.json").write_text(json.dumps(rep, indent=2))
    (out_dir / "report.md").write_text(report.write_markdown(rep))
    summary = {"reference": rows[0].label,
               "metrics": {r.label: {k: r.metrics[k] for k in HEADLINE if k in r.metrics} for r in rows}}
    hooks.event("done", f"benchmark of {len(rows)} models done", summary=summary)
    return summary


# ------------------------------------------------------------------------------------ pre-flight parts


def _rows(spec: BenchmarkSpec, inputs: BenchmarkInputs) -> list[Row]:
    """The reference first, then the candidates; a candidate that *is* the reference (same model, no adapter)
    becomes the reference's row under its own label."""
    if len(inputs.candidates) != len(spec.candidates):
        raise ValueError("inputs.candidates must resolve spec.candidates one to one")
    ref = Row(REFERENCE_LABEL, spec.reference, None, inputs.reference, None, "reference", is_reference=True)
    rows = []
    for i, (c, ci) in enumerate(zip(spec.candidates, inputs.candidates)):
        name = c.model or (f"student of {c.student_of}" if c.student_of else f"student of {c.adapter}")
        row = Row(c.label, name, c.adapter, ci.model, ci.adapter, f"candidates.{i}")
        if ref.label == REFERENCE_LABEL and row.key == ref.key:
            ref.label = row.label
            continue
        rows.append(row)
    for r in rows:
        if r.label == ref.label:
            raise UserError(f"{r.field}.label: {r.label!r} names the reference model's row; choose another label")
    return [ref, *rows]


def _check_models(rows: list[Row]):
    """Model and adapter folders exist; every candidate tokenizes like the reference. Returns its tokenizer."""
    for r in rows:
        where = f"{r.field}.model" if r.field != "reference" else "reference"
        if not (r.path / "config.json").is_file():
            raise UserError(f"{where}: {r.name} is not a model folder (no config.json)")
        if r.adapter is not None:
            missing = [f for f in ("adapter_config.json", "adapters.safetensors") if not (r.adapter / f).is_file()]
            if missing:
                raise UserError(f"{r.field}.adapter: {r.adapter_name} is not an adapter folder "
                                f"(no {' or '.join(missing)})")
    ref_tok = models.load_tokenizer(rows[0].path)
    for r in rows[1:]:
        try:
            models.check_tokenizers(ref_tok, models.load_tokenizer(r.path), f"reference {rows[0].name}",
                                    f"candidate {r.label!r} ({r.name})")
        except UserError as e:
            raise UserError(f"{r.field}.model: {e}") from None
    return ref_tok


def _load_data(spec: BenchmarkSpec, inputs: BenchmarkInputs, tokenizer) -> dict[str, data_mod.Dataset]:
    """Each dataset slot, validated, in its expected format, cut to `max_examples` records."""
    expected = {"text": TEXT_FORMATS, "mcq": ("mcq",), "preference": ("preference",)}
    out = {}
    for slot, formats in expected.items():
        path = getattr(inputs, slot)
        if path is None:
            continue
        try:
            ds = data_mod.load_jsonl(path)
            if ds.format not in formats:
                wanted = " or ".join(filter(None, (", ".join(formats[:-1]), formats[-1])))
                raise UserError(f"{path.name} is '{ds.format}' data, expected {wanted}")
            if slot == "text":
                preflight.check_chat_template(ds.format, tokenizer, "the reference", path)
        except UserError as e:
            raise UserError(f"data.{slot}: {e}") from None
        if spec.max_examples is not None:
            ds = replace(ds, records=ds.records[: spec.max_examples], lines=ds.lines[: spec.max_examples])
        out[slot] = ds
    return out


def _text_examples(datasets: dict, tokenizer, spec: BenchmarkSpec) -> list[data_mod.Example]:
    if "text" not in datasets:
        return []
    try:
        return data_mod.tokenize(datasets["text"], tokenizer, spec.max_seq_len)
    except UserError as e:
        raise UserError(f"data.text: {e}") from None


def _mcq_examples(datasets: dict, tokenizer, spec: BenchmarkSpec) -> list[data_mod.Example]:
    if "mcq" not in datasets:
        return []
    pairs = [(MCQ_PROMPT.format(question=r["question"]), " " + choice)
             for r in datasets["mcq"].records for choice in r["choices"]]
    return continuation_examples(tokenizer, pairs, spec.max_seq_len)


def _pref_examples(datasets: dict, tokenizer, spec: BenchmarkSpec) -> list[data_mod.Example]:
    """Two examples per pair, chosen then rejected."""
    if "preference" not in datasets:
        return []
    pairs = [(r["prompt"], r[k]) for r in datasets["preference"].records for k in ("chosen", "rejected")]
    return continuation_examples(tokenizer, pairs, spec.max_seq_len)


# ------------------------------------------------------------------------------------ models and phases


def _load(row: Row):
    """(model, tokenizer, base parameter count) in inference mode, the adapter applied; an adapter that does
    not fit is the user's to fix."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import get_total_parameters

    model, tokenizer, _ = models.load_model(row.path)
    n_params = get_total_parameters(model)  # before the adapter; quantized weights counted unpacked
    if row.adapter is not None:
        try:
            load_adapters(model, str(row.adapter))
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            head, *lines = str(e).splitlines() or [type(e).__name__]  # mlx-lm lists every mismatched tensor
            lines = [head, *sorted(lines)]
            if len(lines) > 6:
                lines = lines[:6] + [f"  ... and {len(lines) - 6} more"]
            raise UserError(f"{row.field}.adapter: {row.adapter_name} does not fit model {row.name}: "
                            + "\n".join(lines)) from None
    model.eval()  # LoRA dropout off
    mx.eval(model.parameters())
    return model, tokenizer, n_params


def _load_all(rows: list[Row]) -> list[tuple[Row, object]]:
    """Every row with its model (rows with the same key share one); records the base parameter counts."""
    by_key: dict = {}
    out = []
    for row in rows:
        if row.key not in by_key:
            model, _, n = _load(row)
            by_key[row.key] = (model, n)
        model, n = by_key[row.key]
        row.metrics["parameters"] = int(n)
        out.append((row, model))
    return out


def _release() -> None:
    gc.collect()
    mx.clear_cache()


def _batches(examples: list[data_mod.Example], batch_size: int, pad_id: int):
    for idx in data_mod.eval_batches([len(e.tokens) for e in examples], batch_size):
        tokens, mask = data_mod.collate([examples[i] for i in idx], pad_id)
        yield idx, mx.array(tokens), mx.array(mask)


def _text_phase(loaded, examples, batch_size: int, pad_id: int, steps: _Steps) -> dict[Row, dict]:
    ref_model = loaded[0][1]
    totals = {row: {} for row, _ in loaded}
    for _, tokens, mask in _batches(examples, batch_size, pad_id):
        steps("text")
        ref_logits = ref_model(tokens[:, :-1])
        ref = reference_view(ref_logits)
        mx.eval(ref_logits, ref)
        done: dict = {}
        for row, model in loaded:
            if id(model) not in done:  # rows sharing a model share its numbers
                logits = ref_logits if model is ref_model else model(tokens[:, :-1])
                sums = text_sums(ref, logits, tokens[:, 1:], mask[:, 1:])
                mx.eval(sums)
                done[id(model)] = {k: float(v.item()) for k, v in sums.items()}
            for k, v in done[id(model)].items():
                totals[row][k] = totals[row].get(k, 0.0) + v
    return {row: text_metrics(s) for row, s in totals.items()}


def _loglik_phase(loaded, examples, batch_size: int, pad_id: int, steps: _Steps, phase: str) -> dict:
    """Per row: (summed log-likelihood, target count) of every example, in example order."""
    n = len(examples)
    out = {row: (np.zeros(n), np.zeros(n, dtype=np.int64)) for row, _ in loaded}
    for idx, tokens, mask in _batches(examples, batch_size, pad_id):
        steps(phase)
        done: dict = {}
        for row, model in loaded:
            if id(model) not in done:
                ll, cnt = sequence_logprobs(model, tokens, mask)
                mx.eval(ll, cnt)
                done[id(model)] = (np.array(ll, dtype=np.float64), np.array(cnt))
            out[row][0][idx], out[row][1][idx] = done[id(model)]
    return out


def _mcq_result(records: list[dict], ll: np.ndarray, n: np.ndarray) -> dict:
    scores, counts, at = [], [], 0
    for r in records:
        k = len(r["choices"])
        scores.append(ll[at : at + k].tolist())
        counts.append(n[at : at + k].tolist())
        at += k
    return mcq_metrics(scores, counts, [r["answer"] for r in records], [r.get("subject") for r in records])


def _sizes(rows: list[Row]) -> None:
    """Adapter parameters, bytes on disk, and the compression ratios against the reference row."""
    for r in rows:
        m = r.metrics
        size = sum(f.stat().st_size for f in r.path.glob("*.safetensors"))
        m["adapter_parameters"], m["adapter_size_bytes"] = 0, 0
        if r.adapter is not None:
            files = [r.adapter / "adapters.safetensors", r.adapter / "adapter_config.json"]
            m["adapter_size_bytes"] = sum(f.stat().st_size for f in files)
            m["adapter_parameters"] = sum(v.size for v in mx.load(str(files[0])).values())
            m["adapter_type"] = json.loads(files[1].read_text()).get("fine_tune_type", "lora")
        m["size_bytes"] = size + m["adapter_size_bytes"]
    ref = rows[0].metrics
    for r in rows:
        m = r.metrics
        # a full fine-tune "adapter" replaces base weights; LoRA / DoRA weights run beside them
        total = m["parameters"] + (m["adapter_parameters"] if m.get("adapter_type", "lora") != "full" else 0)
        ref_total = ref["parameters"]
        m["compression_ratio_params"] = ref_total / total if total else None
        m["compression_ratio_size"] = ref["size_bytes"] / m["size_bytes"] if m["size_bytes"] else None


def _report(spec: BenchmarkSpec, rows: list[Row], datasets: dict, text_ex: list) -> dict:
    data_info = {}
    for slot, ds in datasets.items():
        data_info[slot] = {"file": ds.path.name, "format": ds.format, "sha256": ds.sha256, "records": len(ds.records)}
    if text_ex:
        data_info["text"]["sequences"] = len(text_ex)
    cpu = mx.default_device() == mx.cpu
    return {
        "reference": rows[0].label,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kl_method": "full",
        "settings": {**spec.model_dump(mode="json", include={"max_seq_len", "batch_size", "max_examples", "speed"}),
                     "mcq_prompt": MCQ_PROMPT + " {choice}", "device": "cpu" if cpu else "gpu",
                     "compute_dtype": "float32" if cpu else "as stored"},
        "data": data_info,
        "candidates": [{"label": r.label, "model": r.name, "adapter": r.adapter_name, "is_reference": r.is_reference,
                        "metrics": r.metrics} for r in rows],
        "definitions": DEFINITIONS,
    }
