"""Benchmarks (the `benchmark` job, `distillery_contract.specs.BenchmarkSpec`): candidates measured against a
reference model on held-out data.

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
  samples     each candidate completes `data.prompts` (mlx-lm's batched sampling, `samples`: max_new_tokens,
              temperature, top_p; one fixed key for every candidate) and the reference scores every sampled token:
              `sample_reverse_kl`, KL(candidate ‖ reference) over the full vocabulary at each sampled token,
              averaged (what on-policy distillation optimises, computed as training's `val_reverse_kl`). This
              phase holds the reference and one candidate at a time, after the other phases.
  speed       mlx-lm's `stream_generate` (greedy, end-of-sequence suppressed so every run decodes the same
              number of tokens) on a fixed random prompt; prefill and decode tokens per second, and MLX's peak
              memory.
  size        parameters of the base model (adapter parameters apart), bytes on disk, compression ratios.

Models are loaded one at a time, the reference first: each model runs every phase, its speed test included,
and is freed before the next is loaded, so peak memory is the largest model plus one batch, never the sum.
The candidates' text phase compares with the reference's distributions kept in a scratch file under `out_dir`
(`benchmark_store`), removed when the run ends. The engine only sees local paths (`BenchmarkInputs`); the
caller resolves ids. Writes `report.json`, `report.md` and PNG charts into `out_dir`.

This module is the run itself; the other parts are beside it:

    benchmark_inputs.py    the resolved inputs, the report's rows (models) and their pre-flight checks
    benchmark_data.py      the datasets, loaded and tokenized into each phase's examples
    benchmark_passes.py    one model's pass over every phase, its speed test included
    benchmark_metrics.py   the numbers, from a pass's arrays
    benchmark_store.py     the reference's distributions on disk, for the candidates' text phase
    benchmark_results.py   sizes, compression ratios and report.json
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

from distillery_contract.specs import BenchmarkSpec

from . import models, report
from . import student as student_mod
from .benchmark_data import MCQ_PROMPT, load_data, mcq_examples, pref_examples, prompt_tokens, text_examples
from .benchmark_inputs import (
    BenchmarkInputs,
    CandidateInput,
    Row,
    check_models,
    config_vocab_size,
    distinct_models,
    report_rows,
)
from .benchmark_metrics import PairScores, mcq_metrics, pref_metrics, speed_runs, text_metrics
from .benchmark_passes import ModelScores, Progress, Workload, score_model
from .benchmark_results import HEADLINE, add_sizes, build_report
from .benchmark_store import SCRATCH_DIR, ReferenceStore, ensure_free_space
from .train import Hooks

__all__ = ["BenchmarkInputs", "CandidateInput", "MCQ_PROMPT", "run_benchmark"]

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
    rows = report_rows(spec, inputs)
    tokenizer = check_models(rows)
    datasets = load_data(spec, inputs, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    work = Workload(
        text_examples(datasets, tokenizer, spec),
        mcq_examples(datasets, tokenizer, spec),
        pref_examples(datasets, tokenizer, spec),
        spec.batch_size,
        pad_id,
    )
    scratch = out_dir / SCRATCH_DIR
    vocab = config_vocab_size(rows[0].path)
    if work.text and vocab is not None:
        ensure_free_space(scratch, work.text_positions, vocab)
    prompts = prompt_tokens(datasets, tokenizer, spec)
    distinct = distinct_models(rows)
    speed_units = speed_runs(spec.speed.repeats) if spec.speed.enabled else 0
    units = len(distinct) * (work.batches_per_model + speed_units) + (len(distinct) - 1) * bool(prompts)
    progress = Progress(units, hooks, on_progress)
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
    sampled = _samples_phase(distinct, prompts, spec, pad_id, progress) if prompts else {}
    _apply_scores(rows, scores, datasets)
    for row in rows:
        row.metrics.update(sampled.get(row.key, {}))
    add_sizes(rows)

    rep = build_report(spec, rows, datasets, work.text)
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


# ------------------------------------------------------------------------------------ models and results


def load_model_of(row: Row):
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
        model, tok, n_params = load_model_of(row)
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


def _samples_phase(
    distinct: list[Row], prompts: list[np.ndarray], spec: BenchmarkSpec, pad_id: int, progress: Progress
) -> dict[tuple, dict]:
    """`sample_reverse_kl` of each model (the reference's own is 0 by definition: not measured)."""
    from distillery_contract.specs import OnPolicySpec

    from .batches import OnlineTeacher
    from .on_policy import reverse_kl_on_samples

    s = spec.samples
    cfg = OnPolicySpec(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)
    reference, _, _ = load_model_of(distinct[0])
    teacher = OnlineTeacher(reference)
    out: dict[tuple, dict] = {distinct[0].key: {"sample_reverse_kl": 0.0}}
    try:
        for row in distinct[1:]:
            progress.check("samples")
            model, tok, _ = load_model_of(row)
            try:
                got, _ = reverse_kl_on_samples(
                    model, tok, [teacher], np.ones(1), prompts, cfg, spec.max_seq_len, spec.batch_size, pad_id
                )
            finally:
                del model
                _release()
            out[row.key] = {"sample_reverse_kl": got["val_reverse_kl"], "sample_tokens": got["val_sampled_tokens"]}
            progress.advance("samples", row.label)
    finally:
        del teacher, reference
        _release()
    return out


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
            m.update(mcq_result(datasets["mcq"].records, *s.mcq))
        if s.preference is not None and ref.preference is not None:  # every model scores the same phases
            m.update(
                pref_metrics(
                    PairScores.from_examples(*s.preference), PairScores.from_examples(*ref.preference), pref_subjects
                )
            )
        m.update(s.speed)


def mcq_result(records: list[dict], ll: np.ndarray, n: np.ndarray) -> dict:
    scores, counts, at = [], [], 0
    for r in records:
        k = len(r["choices"])
        scores.append(ll[at : at + k].tolist())
        counts.append(n[at : at + k].tolist())
        at += k
    return mcq_metrics(scores, counts, [r["answer"] for r in records], [r.get("subject") for r in records])
