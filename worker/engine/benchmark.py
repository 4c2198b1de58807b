"""Benchmarks (SPEC §4 `benchmark`): candidates measured against a reference model on held-out data.

Every model gets one row of `report.json`, the reference included (under its own label). Per phase:

  text        on text / completions / chat data, over the positions training uses as targets (the masks of
              `data.tokenize`): KL(reference ‖ candidate) over the full vocabulary at T = 1 (exact, not top-k),
              Jensen-Shannon, top-1 agreement (same argmax), top-5 agreement (the reference's argmax among
              the candidate's 5 highest logits), cross-entropy on the data's own next tokens and its exp (ppl).
  mcq         each choice scored by the summed log-likelihood of " " + choice after `MCQ_PROMPT` (plain text,
              never the chat template); the highest score is the model's answer. `mcq_accuracy_norm` divides
              each score by the choice's token count first.
  preference  log p(response | prompt) of `chosen` and of `rejected` (prompt and response concatenated as they
              are, like `completions`), scored two ways: summed over the response's tokens (`pref_accuracy`,
              `pref_agreement`), which favours short responses, and as the mean per response token
              (`pref_accuracy_norm`, `pref_agreement_norm`). Accuracy: chosen scores higher; agreement: the
              model orders the pair as the reference does. A tie (equal scores) is worth ½ (see
              `benchmark_metrics.pair_credit` / `pair_agreement`). Per subject when records have one.
  speed       mlx-lm's `stream_generate` (greedy, end-of-sequence suppressed so every run decodes the same
              number of tokens) on a fixed random prompt; prefill and decode tokens per second, and MLX's peak
              memory.
  size        parameters of the base model (adapter parameters apart), bytes on disk, compression ratios.

Models are loaded one at a time, the reference first: each model runs every phase, its speed test included,
and is freed before the next is loaded, so peak memory is the largest model plus one batch, never the sum.
The candidates' text phase compares with the reference's distributions kept in a scratch file under `out_dir`
(`benchmark_store`), removed when the run ends. The engine only sees local paths (`BenchmarkInputs`); the
caller resolves ids. Writes `report.json`, `report.md` and PNG charts into `out_dir`.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import numpy as np

from distillery_contract.jobs import REFERENCE_LABEL
from distillery_contract.specs import BenchmarkSpec

from . import data as data_mod
from . import models, preflight, report
from . import student as student_mod
from .benchmark_metrics import PairScores, continuation_examples, mcq_metrics, pref_metrics, text_metrics
from .benchmark_passes import ModelScores, Progress, Workload, score_model
from .benchmark_store import SCRATCH_DIR, ReferenceStore, ensure_free_space
from .errors import UserError
from .train import Hooks

MCQ_PROMPT = "Question: {question}\nAnswer:"
"""Multiple-choice prompt; each choice is scored as the continuation " " + choice. Deliberately plain text even
when the tokenizer has a chat template: one fixed format for every model, base or instruction-tuned."""

HEADLINE = (
    "ppl",
    "kl",
    "top1_agreement",
    "mcq_accuracy",
    "pref_accuracy",
    "pref_accuracy_norm",
    "prefill_tokens_per_second",
    "decode_tokens_per_second",
    "peak_memory_bytes",
    "compression_ratio_params",
)
TEXT_FORMATS = data_mod.TRAINABLE_FORMATS

_TIE = "a tie (equal scores) counts as half a pair"
DEFINITIONS = {
    "kl": "forward KL(reference || model) per target token, full vocabulary, T = 1 (nats); candidates are "
    "compared with the reference's log-probs stored as float16 and renormalised (off by ~1e-6 relative)",
    "js": "Jensen-Shannon divergence between reference and model per target token (nats)",
    "top1_agreement": "share of target tokens where the model's argmax equals the reference's",
    "top5_agreement": "share of target tokens where the reference's argmax is among the model's 5 highest logits",
    "ce": "mean cross-entropy of the data's own next tokens (nats); ppl = exp(ce)",
    "mcq_accuracy": "share of questions whose answer has the highest summed log-likelihood of ' ' + choice "
    "after 'Question: ...\\nAnswer:'",
    "mcq_accuracy_norm": "as mcq_accuracy, each choice's log-likelihood divided by its token count",
    "pref_accuracy": "share of pairs with log p(chosen | prompt) > log p(rejected | prompt), each summed over the "
    f"response's tokens (longer responses score lower); {_TIE}",
    "pref_accuracy_norm": "as pref_accuracy, each response scored by its mean log-prob per response token "
    f"(length-normalised); {_TIE}",
    "pref_agreement": "share of pairs the model orders (chosen vs rejected, summed scores) as the reference does; "
    "both tying counts as the same order, one tying as half",
    "pref_agreement_norm": "as pref_agreement, with the per-token mean scores",
    "pref_ties": "pairs whose summed scores are exactly equal (pref_ties_norm: whose per-token means are)",
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
    name: str  # the model as the spec names it
    adapter_name: str | None
    path: Path
    adapter: Path | None
    field: str  # where it is in the spec, for error messages: "reference" or "candidates.N"
    is_reference: bool = False
    metrics: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[Path, Path | None]:
        """Rows with the same key are the same model: loaded, evaluated and timed once."""
        return self.path.resolve(), self.adapter.resolve() if self.adapter else None


# ------------------------------------------------------------------------------------------- the run


def run_benchmark(
    spec: BenchmarkSpec,
    inputs: BenchmarkInputs,
    out_dir: Path,
    hooks: Hooks | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Run every phase the data allows, write report.json / report.md / charts; return a small summary."""
    hooks = hooks or Hooks()
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)

    # -- pre-flight: tokenizers, data and scratch space, no weights loaded
    rows = _rows(spec, inputs)
    tokenizer = _check_models(rows)
    datasets = _load_data(spec, inputs, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    work = Workload(
        _text_examples(datasets, tokenizer, spec),
        _mcq_examples(datasets, tokenizer, spec),
        _pref_examples(datasets, tokenizer, spec),
        spec.batch_size,
        pad_id,
    )
    scratch = out_dir / SCRATCH_DIR
    vocab = _config_vocab_size(rows[0].path)
    if work.text and vocab is not None:
        ensure_free_space(scratch, work.text_positions, vocab)
    distinct = _distinct_models(rows)
    progress = Progress(len(distinct) * (work.batches_per_model + int(spec.speed.enabled)), hooks, on_progress)
    hooks.event(
        "preflight",
        f"benchmark of {len(rows)} models on {', '.join(datasets)}",
        models=[r.label for r in rows],
        datasets={k: len(d.records) for k, d in datasets.items()},
    )
    progress.start()

    # -- every phase, one model at a time, the reference first
    with ReferenceStore(scratch, work.text_positions) as store:
        scores = _score_one_at_a_time(distinct, work, store, spec, progress, hooks)
    _apply_scores(rows, scores, datasets)
    _sizes(rows)

    rep = _report(spec, rows, datasets, work.text)
    curves = {c.label: c.metrics for c in inputs.candidates if c.metrics is not None and c.metrics.is_file()}
    rep["charts"] = report.write_charts(rep, out_dir, curves)
    rep["wall_seconds"] = time.perf_counter() - t_start
    (out_dir / "report.json").write_text(json.dumps(rep, indent=2))
    (out_dir / "report.md").write_text(report.write_markdown(rep))
    summary = {
        "reference": rows[0].label,
        "metrics": {r.label: {k: r.metrics[k] for k in HEADLINE if k in r.metrics} for r in rows},
    }
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
                raise UserError(
                    f"{r.field}.adapter: {r.adapter_name} is not an adapter folder (no {' or '.join(missing)})"
                )
    ref_tok = models.load_tokenizer(rows[0].path)
    for r in rows[1:]:
        try:
            models.check_tokenizers(
                ref_tok, models.load_tokenizer(r.path), f"reference {rows[0].name}", f"candidate {r.label!r} ({r.name})"
            )
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
    pairs = [
        (MCQ_PROMPT.format(question=r["question"]), " " + choice)
        for r in datasets["mcq"].records
        for choice in r["choices"]
    ]
    return continuation_examples(tokenizer, pairs, spec.max_seq_len)


def _pref_examples(datasets: dict, tokenizer, spec: BenchmarkSpec) -> list[data_mod.Example]:
    """Two examples per pair, chosen then rejected."""
    if "preference" not in datasets:
        return []
    pairs = [(r["prompt"], r[k]) for r in datasets["preference"].records for k in ("chosen", "rejected")]
    return continuation_examples(tokenizer, pairs, spec.max_seq_len)


# ------------------------------------------------------------------------------------ models and results


def _config_vocab_size(path: Path) -> int | None:
    """The vocabulary size config.json declares (top level or `text_config`), for the pre-flight disk check."""
    config = json.loads((path / "config.json").read_text())
    for where in (config, config.get("text_config") or {}):
        if isinstance(where.get("vocab_size"), int):
            return where["vocab_size"]
    return None


def _distinct_models(rows: list[Row]) -> list[Row]:
    """The first row of each model (rows with the same key are loaded, scored and timed once, and share the
    numbers), the reference first."""
    first: dict = {}
    for r in rows:
        first.setdefault(r.key, r)
    return list(first.values())


def _load(row: Row):
    """(model, tokenizer, base parameter count) in inference mode, the adapter applied; an adapter that does
    not fit is the user's to fix."""
    from mlx_lm.utils import get_total_parameters

    model, tokenizer, _ = models.load_model(row.path)
    n_params = get_total_parameters(model)  # before the adapter; quantized weights counted unpacked
    if row.adapter is not None:
        student_mod.load_adapter(
            model, row.adapter, f"{row.field}.adapter: {row.adapter_name} does not fit model {row.name}"
        )
    model.eval()  # LoRA dropout off
    models.dequantized_compute(model)  # quality passes at OpenBLAS speed; the speed test switches back
    mx.eval(model.parameters())
    return model, tokenizer, n_params


def _score_one_at_a_time(
    distinct: list[Row], work: Workload, store: ReferenceStore, spec: BenchmarkSpec, progress: Progress, hooks: Hooks
) -> dict[tuple, ModelScores]:
    """Each model loaded, run through every phase and freed before the next is loaded: peak memory is the
    largest model plus one batch. `distinct[0]`, the reference, fills `store` for the others."""
    scores = {}
    for i, row in enumerate(distinct):
        model, tok, n_params = _load(row)
        try:
            scores[row.key] = score_model(
                model,
                tok,
                n_params,
                row.label,
                work,
                store,
                is_reference=i == 0,
                speed=spec.speed,
                progress=progress,
                hooks=hooks,
            )
        finally:
            del model
            _release()
    return scores


def _release() -> None:
    """Give a freed model's memory back: Python's references first, then MLX's buffer cache."""
    gc.collect()
    mx.clear_cache()


def _apply_scores(rows: list[Row], scores: dict[tuple, ModelScores], datasets: dict) -> None:
    """Each row's metrics from its model's scores (and, for preference agreement, the reference's)."""
    ref = scores[rows[0].key]
    pref_subjects = [r.get("subject") for r in datasets["preference"].records] if "preference" in datasets else []
    for row in rows:
        s = scores[row.key]
        m = row.metrics
        m["parameters"] = int(s.parameters)
        if s.text is not None:
            m.update(text_metrics(s.text))
        if s.mcq is not None:
            m.update(_mcq_result(datasets["mcq"].records, *s.mcq))
        if s.preference is not None:
            m.update(
                pref_metrics(
                    PairScores.from_examples(*s.preference), PairScores.from_examples(*ref.preference), pref_subjects
                )
            )
        m.update(s.speed)


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
        "settings": {
            **spec.model_dump(mode="json", include={"max_seq_len", "batch_size", "max_examples", "speed"}),
            "mcq_prompt": MCQ_PROMPT + " {choice}",
            "device": "cpu" if cpu else "gpu",
            "compute_dtype": "float32" if cpu else "as stored",
            "reference_logprobs": "float16 on disk, renormalised (candidates' kl, js)",
            "preference_tie": "half a pair",
        },
        "data": data_info,
        "candidates": [
            {
                "label": r.label,
                "model": r.name,
                "adapter": r.adapter_name,
                "is_reference": r.is_reference,
                "metrics": r.metrics,
            }
            for r in rows
        ],
        "definitions": DEFINITIONS,
    }
