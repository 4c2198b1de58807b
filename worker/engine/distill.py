"""One distillation run, end to end: pre-flight → data → teacher caches → student → training → outputs.

This is the function both `distillery-server distill` and the worker call. Models and datasets arrive as
local paths (the caller resolves ids); the run writes into `out_dir`:

    adapters.safetensors, adapter_config.json   the adapter (the best one by val KL), as mlx-lm reads it
    student/                                    the pruned and/or quantized student (keep_layers, quantize)
    summary.json                                the run's outcome: initial / final / best val KL, warnings, timings
    metrics.jsonl                               a record per training step and per evaluation (train.py writes it)
    checkpoints/                                step-N/ (resumable) and best-N/ (the best so far)
    fused/                                      the student with the adapter merged, when output.fuse
"""

from __future__ import annotations

import functools
import gc
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from distillery_contract.specs import DistillSpec, TeacherCacheSpec

from . import cache as cache_mod
from . import data as data_mod
from . import evaluate as evaluate_mod
from . import hidden as hidden_mod
from . import models, on_policy, preflight
from . import preference as preference_mod
from . import student as student_mod
from . import weighting as weighting_mod
from .batches import CachedTeacher, OnlineTeacher, Split
from .errors import UserError
from .mlx_typed import flat_arrays
from .train import SCORE_LABELS, Hooks, train

CACHE_BATCH_SIZE = 8


@dataclass
class Inputs:
    """A distill spec with every reference resolved to a local path."""

    student: Path
    teachers: list[Path]
    train: Path
    valid: Path | float
    student_adapter: Path | None = None
    preference: Path | None = None


def ensure_cache(
    teacher_dir: Path,
    dataset: data_mod.Dataset,
    examples: list[data_mod.Example],
    tokenizer,
    *,
    top_k: int,
    max_seq_len: int,
    store: cache_mod.CacheStore,
    hooks: Hooks,
    subset: np.ndarray | None = None,
) -> cache_mod.TeacherCache:
    """The teacher cache for (teacher, dataset, k, length, template[, subset]): reused if it exists, else built.

    `examples` is the whole tokenized dataset; `subset` (sorted indices into it) limits the build to the
    sequences a run will use. A cache of the whole dataset serves any subset, so it is looked up first.
    """
    template = getattr(tokenizer, "chat_template", None) if data_mod.needs_chat_template(dataset.format) else None
    key_of = functools.partial(
        cache_mod.cache_key,
        teacher=models.model_fingerprint(teacher_dir),
        tokenizer=models.tokenizer_fingerprint(teacher_dir),
        dataset=f"{dataset.sha256}:{dataset.format}",
        top_k=top_k,
        max_seq_len=max_seq_len,
        template=template,
    )
    whole = key_of()
    if subset is not None and len(subset) == len(examples):
        subset = None
    key = whole if subset is None else key_of(subset=subset)
    for candidate in dict.fromkeys((whole, key)):
        found = store.get(candidate)
        if found is not None:
            hooks.event(
                "teacher_cache",
                f"teacher cache hit {candidate[:12]} for {dataset.path.name}",
                key=candidate,
                hit=True,
                **_cache_stats(found),
            )
            return found
    chosen = np.arange(len(examples)) if subset is None else subset
    todo = [examples[i] for i in chosen]
    hooks.event(
        "teacher_cache",
        f"building teacher cache {key[:12]} for {dataset.path.name} "
        f"({len(todo)} of {len(examples)} sequences, {sum(len(e.tokens) for e in todo)} tokens, k={top_k})",
        key=key,
        hit=False,
    )
    model = models.load_model(teacher_dir)[0]
    models.dequantized_compute(model)  # a quantized teacher at OpenBLAS speed on the CPU
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    built = cache_mod.build(
        model,
        todo,
        store.path(key),
        key=key,
        top_k=top_k,
        batch_size=CACHE_BATCH_SIZE,
        pad_id=pad_id,
        sources=chosen,
        meta={
            "teacher": str(teacher_dir),
            "dataset": str(dataset.path),
            "dataset_sha256": dataset.sha256,
            "format": dataset.format,
            "max_seq_len": max_seq_len,
            "dataset_sequences": len(examples),
        },
        on_progress=lambda done, total: hooks.event("cache_progress", f"{done}/{total} tokens", done=done, total=total),
        should_stop=hooks.should_stop,
    )
    hooks.event("teacher_cache", f"teacher cache {key[:12]} built", key=key, hit=False, **_cache_stats(built))
    return built


def _cache_stats(c: cache_mod.TeacherCache) -> dict:
    return {k: c.meta.get(k) for k in ("tokens", "bytes_per_token", "reconstruction_kl", "build_tokens_per_second")}


def build_teacher_cache(
    spec: TeacherCacheSpec,
    teacher_dir: Path,
    dataset_path: Path,
    store: cache_mod.CacheStore,
    hooks: Hooks | None = None,
) -> cache_mod.TeacherCache:
    """The `teacher_cache` job kind on its own."""
    hooks = hooks or Hooks()
    ds = data_mod.load_jsonl(dataset_path)
    tokenizer = models.load_tokenizer(teacher_dir)
    preflight.check_chat_template(ds.format, tokenizer, f"teacher {teacher_dir.name}", dataset_path)
    examples = data_mod.tokenize(ds, tokenizer, spec.max_seq_len)
    return ensure_cache(
        teacher_dir, ds, examples, tokenizer, top_k=spec.top_k, max_seq_len=spec.max_seq_len, store=store, hooks=hooks
    )


def run_distill(
    spec: DistillSpec,
    inputs: Inputs,
    out_dir: Path,
    store: cache_mod.CacheStore,
    hooks: Hooks | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    hooks = hooks or Hooks()
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_out_dir(spec, out_dir)
    tr = spec.training

    # -- pre-flight: no weights loaded yet
    tokenizer = preflight.check_models(inputs.student, inputs.teachers)
    preflight.check_student(spec, inputs.student, inputs.student_adapter)
    train_ds = data_mod.load_jsonl(inputs.train)
    valid_ds = data_mod.load_jsonl(inputs.valid) if isinstance(inputs.valid, Path) else None
    for ds in filter(None, (train_ds, valid_ds)):
        preflight.check_chat_template(ds.format, tokenizer, f"student {inputs.student.name}", ds.path)
        if preflight.uses_chat_template(ds):
            preflight.check_templates(inputs.student, inputs.teachers)
        if ds.format == "prompts" and spec.teacher_mode == "on_policy":
            if ds is train_ds and spec.on_policy.fraction < 1.0:
                raise UserError(
                    f"data: {ds.path.name} is prompts alone, with no completions for the off-policy share "
                    f"of on_policy.fraction {spec.on_policy.fraction:g}: set on_policy.fraction: 1, or give "
                    "completions or chat data"
                )
        elif ds.format == "prompts":
            raise UserError(
                f"data: {ds.path.name} is prompts alone (no completions to learn from); it trains only with "
                "teacher_mode: on_policy, where the student writes the completions"
            )
        elif ds.format not in data_mod.TRAINABLE_FORMATS:
            raise UserError(
                f"data: {ds.path.name} is '{ds.format}' data; distillation trains on "
                f"{', '.join(data_mod.TRAINABLE_FORMATS)}"
            )
    pairs = preference_mod.load_pairs(inputs.preference, tokenizer, tr.max_seq_len) if inputs.preference else None
    memory = preflight.check_memory(spec, inputs.student, inputs.teachers)
    hooks.event(
        "preflight",
        "pre-flight checks passed",
        memory_estimate_bytes=memory["total"],
        memory_available_bytes=memory["available"],
    )

    # -- data: index arrays into the tokenized datasets; a short run uses (and caches) only what it needs
    train_all = data_mod.tokenize(train_ds, tokenizer, tr.max_seq_len)
    valid_all = data_mod.tokenize(valid_ds, tokenizer, tr.max_seq_len) if valid_ds else train_all
    if valid_ds:
        train_idx, valid_idx = np.arange(len(train_all)), np.arange(len(valid_all))
    else:
        assert not isinstance(inputs.valid, Path)  # no validation file: the holdout fraction
        train_idx, valid_idx = _holdout(train_all, float(inputs.valid))
    budget = tr.steps * tr.batch_size * tr.grad_accum
    if budget < len(train_idx):
        # seed-independent, so runs that differ only in seed (or alpha, loss...) share one teacher cache
        train_idx = np.sort(np.random.default_rng(0).permutation(train_idx)[:budget])
        hooks.event(
            "data",
            f"the step budget covers {budget} of {len(train_all)} training sequences: "
            "training (and its teacher cache) uses a fixed random subset of that size",
        )
    train_ex = [train_all[i] for i in train_idx]
    valid_ex = [valid_all[i] for i in valid_idx]
    hooks.event(
        "data",
        f"{len(train_ex)} training and {len(valid_ex)} validation sequences",
        train_tokens=sum(len(e.tokens) for e in train_ex),
        valid_tokens=sum(len(e.tokens) for e in valid_ex),
    )

    # -- teachers: caches (offline) or models in the loop (online, on_policy)
    train_split, valid_split = Split(train_ex), Split(valid_ex)
    if spec.teacher_mode == "on_policy":
        on_policy.check_prompts(train_ex, train_ds.format, train_ds.path.name)
        on_policy.check_prompts(valid_ex, valid_ds.format if valid_ds else train_ds.format, "the validation data")
        train_split = on_policy.OnPolicySplit(
            train_ex,
            cfg=spec.on_policy,
            max_seq_len=tr.max_seq_len,
            estimator=spec.on_policy.estimator,
            tokenizer=tokenizer,
        )
    hint = spec.loss.hidden
    hint_teacher_model = None
    teacher_margins: list[tuple[np.ndarray, np.ndarray, float]] = []  # per teacher: (train, valid, weight)
    for index, teacher_dir in enumerate(inputs.teachers):
        if pairs is not None:  # the teachers' preference margins, once (offline: the teacher is loaded for it)
            model = models.load_model(teacher_dir)[0]
            models.dequantized_compute(model)
            teacher_margins.append(
                (
                    preference_mod.margins(model, pairs[0], tokenizer.pad_token_id or 0),
                    preference_mod.margins(model, pairs[1], tokenizer.pad_token_id or 0),
                    spec.teachers[index].weight,
                )
            )
            if spec.teacher_mode == "offline":  # its cache is built without it
                del model
                gc.collect()
                mx.clear_cache()
        if spec.teacher_mode in ("online", "on_policy"):
            if pairs is None:
                model = models.load_model(teacher_dir)[0]
                models.dequantized_compute(model)
            reads = hint is not None and index == hint.teacher
            if reads:
                assert hint is not None
                _check_hint_layers(hint.pairs, 1, len(model.layers), f"teacher {index} ({teacher_dir.name})")
                hint_teacher_model = model
            teacher = OnlineTeacher(model, sorted({t for _, t in hint.pairs}) if reads and hint else [])
            train_split.teachers.append(teacher)
            valid_split.teachers.append(teacher)
            continue
        cache_for = functools.partial(
            ensure_cache, top_k=spec.loss.top_k, max_seq_len=tr.max_seq_len, store=store, hooks=hooks
        )
        if valid_ds:
            train_cache = cache_for(teacher_dir, train_ds, train_all, tokenizer, subset=train_idx)
            valid_cache = cache_for(teacher_dir, valid_ds, valid_all, tokenizer)
        else:
            both = np.union1d(train_idx, valid_idx)
            train_cache = valid_cache = cache_for(teacher_dir, train_ds, train_all, tokenizer, subset=both)
        train_split.teachers.append(CachedTeacher(train_cache, train_cache.positions(train_idx)))
        valid_split.teachers.append(CachedTeacher(valid_cache, valid_cache.positions(valid_idx)))
        _check_tokens(train_cache, train_idx, train_all)
        gc.collect()
        mx.clear_cache()

    # -- student and training
    mx.random.seed(tr.seed)  # the adapter's initialisation
    student = student_mod.build_student(
        spec.student,
        spec.adapter,
        inputs.student,
        out_dir,
        adapter_path=inputs.student_adapter,
        adapter_fields_set=spec.adapter.model_fields_set,
    )
    q = spec.student.quantize
    hooks.event(
        "student",
        f"student ready: {len(student.model.layers)} layers"
        + (f", {q.bits}-bit quantized (group {q.group_size})" if q else "")
        + f", {student.adapter_config['fine_tune_type']} adapter",
        path=str(student.path),
    )
    trainable = sum(v.size for _, v in flat_arrays(student.model.trainable_parameters()))
    parameters = sum(v.size for _, v in flat_arrays(student.model.parameters()))
    disk = preflight.run_disk_estimate(spec, trainable, parameters, student.path)
    preflight.check_disk(out_dir, disk["total"], "the run's checkpoints and outputs")
    mx.reset_peak_memory()
    weights = [t.weight for t in spec.teachers]
    sampled_eval = None
    if isinstance(train_split, on_policy.OnPolicySplit):
        train_split.student = student.model
        sampled_eval = _sampled_eval(spec, student, valid_split, weights)
    preference_term = None
    if pairs is not None:
        total = sum(w for _, _, w in teacher_margins)
        preference_term = preference_mod.PreferenceTerm(
            pairs[0],
            pairs[1],
            sum(m * (w / total) for m, _, w in teacher_margins),  # type: ignore[arg-type]
            sum(m * (w / total) for _, m, w in teacher_margins),  # type: ignore[arg-type]
            kind=spec.loss.preference.kind if spec.loss.preference else "bradley_terry",
            weight=spec.loss.preference.weight if spec.loss.preference else 0.0,
            batch_pairs=spec.loss.preference.batch_pairs if spec.loss.preference else 1,
            temperature=spec.loss.preference.temperature if spec.loss.preference else 1.0,
            seed=tr.seed,
            pad_id=student.tokenizer.pad_token_id or 0,
        )
        hooks.event(
            "preference",
            f"{len(pairs[0])} preference pairs to train on, {len(pairs[1])} held out"
            if spec.loss.preference
            else f"{len(pairs[1])} held-out preference pairs evaluated (no loss.preference: none trained on)",
        )
    hints = None
    if hint is not None and hint_teacher_model is not None:
        _check_hint_layers(hint.pairs, 0, len(student.model.layers), "the student")
        width = hidden_mod.teacher_width(hint_teacher_model)
        hints = hidden_mod.Hints(student.model, hint.pairs, hint.kind, hint.weight, width)
    teacher_weighting = weighting_mod.make(
        spec.teacher_weighting, weights, student.model, spec.weighting, seed=spec.training.seed
    )
    state = train(
        student,
        train_split,
        valid_split,
        spec,
        teacher_weighting,
        out_dir,
        hooks,
        on_progress=on_progress,
        sampled_eval=sampled_eval,
        hints=hints,
        preference=preference_term,
    )

    # -- outputs: the best adapter by val KL (the starting student's own when no trained step beat it)
    best = out_dir / "checkpoints" / f"best-{state.best_step:07d}"
    for name in ("adapters.safetensors", "adapter_config.json"):
        shutil.copy(best / name, out_dir / name)
    warnings = run_warnings(state)
    for w in warnings:
        hooks.event("warning", w["message"], code=w["code"])
    final = state.best_eval or state.last_eval
    summary: dict[str, Any] = {
        "initial": state.initial,
        "final": final,
        "last": state.last_eval,
        "best": {
            "step": state.best_step,
            "val_kl": (state.best_eval or state.initial).get("val_kl"),
            "metric": state.score_name,  # what chose the best
            "score": state.best_val_kl,
        },
        "shipped": "start" if state.best_step == 0 else "trained",
        "warnings": warnings,
        "learning_rate": state.learning_rate,
        "lr_search": state.lr_search,
        "rollbacks": state.rollbacks,
        "train": {
            "steps": state.step,
            "tokens": state.tokens,
            "tokens_per_second": state.tokens / state.wall_seconds if state.wall_seconds else None,
            "peak_memory_bytes": mx.get_peak_memory(),
            "wall_seconds": time.perf_counter() - t_start,
            "stopped_early": state.stopped_early,
            "stop_reason": state.stop_reason,
            "skipped_steps": state.skipped_steps,
            "teacher_tokens": state.teacher_tokens,  # tokens the teachers scored while training (the run's cost)
            "generated_tokens": state.generated_tokens,  # tokens the student sampled (on_policy)
            "generate_seconds": state.generate_seconds,
            "score_seconds": state.score_seconds,
            # the steps' time less generating and scoring: the student's forward, backward and update
            "update_seconds": max(state.wall_seconds - state.generate_seconds - state.score_seconds, 0.0),
        },
        "teacher_mode": spec.teacher_mode,
        "preset": spec.preset,
        "student": str(student.path),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if spec.output.fuse:
        student.model.load_weights(str(out_dir / "adapters.safetensors"), strict=False)
        student_mod.fuse(student, out_dir / "fused")
    hooks.event("done", evaluate_mod.describe_change(summary["initial"], final), summary=summary)
    return summary


def _sampled_eval(spec: DistillSpec, student: student_mod.Student, valid_split: Split, weights: list[float]):
    """on_policy's evaluation: KL(student ‖ teachers) on the student's own samples for held-out prompts (the
    first `eval_prompts` of the validation split, or the given number of them for a short evaluation)."""
    cfg, tr = spec.on_policy, spec.training
    prompts = [on_policy.prompt_of(e) for e in valid_split.examples]
    prompts = [p for p in prompts if len(p)][: cfg.eval_prompts]
    teachers = [t for t in valid_split.teachers if isinstance(t, OnlineTeacher)]
    pad_id = student.tokenizer.pad_token_id if student.tokenizer.pad_token_id is not None else 0
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))

    def run(max_prompts: int | None, show: bool):
        chosen = prompts if max_prompts is None else prompts[:max_prompts]
        shown = cfg.samples_shown if show else 0
        return on_policy.reverse_kl_on_samples(
            student.model, student.tokenizer, teachers, w, chosen, cfg, tr.max_seq_len, tr.batch_size, pad_id, shown
        )

    return run


def _check_hint_layers(pairs: list[list[int]], side: int, depth: int, whose: str) -> None:
    """loss.hidden.pairs name layers the model has (side 0: the student's, 1: the teacher's)."""
    bad = [p for p in pairs if p[side] >= depth]
    if bad:
        role = ("student_layer", "teacher_layer")[side]
        raise UserError(
            f"loss.hidden.pairs: {role} {bad[0][side]} in {bad[0]} but {whose} has {depth} layers (0 to {depth - 1})"
        )


def run_warnings(state) -> list[dict]:
    """What the user must hear about the result: `{"code", "message"}` each, in `summary.warnings`."""
    out = []
    if state.best_step == 0:
        key, label = state.score_name, SCORE_LABELS[state.score_name]
        trained = state.last_eval.get(key) if state.last_eval.get("step", 0) > 0 else None
        seen = (
            f"; the last evaluation (step {state.last_eval['step']}) had {trained:.4f}" if trained is not None else ""
        )
        out.append(
            {
                "code": "no_improvement",
                "message": f"no trained step beat the starting student ({label} {state.initial[key]:.4f} at step 0"
                f"{seen}): the run ships the starting student unchanged. Try a lower learning rate "
                "(or `learning_rate: auto`), more data, or check that the teacher is better than the student.",
            }
        )
    if state.rollbacks:
        out.append(
            {
                "code": "diverged" if state.stop_reason == "diverged" else "rolled_back",
                "message": f"training diverged {len(state.rollbacks)} time(s) and was rolled back to its best checkpoint "
                f"(learning rate now x{state.lr_scale:g})"
                + ("; it stopped early, out of rollbacks" if state.stop_reason == "diverged" else "")
                + ": the learning rate is probably too high for this student.",
            }
        )
    elif state.stop_reason == "diverged":
        out.append(
            {
                "code": "diverged",
                "message": "training diverged and stopped (rollbacks are disabled); "
                f"the best checkpoint (step {state.best_step}) is shipped.",
            }
        )
    shipped = state.best_eval or state.last_eval
    for key, label in (
        ("val_pref_agreement", "agreement with the teachers' ranking"),
        ("val_harmless_accuracy", "harmlessness (preference accuracy on harmless pairs)"),
    ):
        before, after = state.initial.get(key), shipped.get(key)
        if before is not None and after is not None and after < before - PREFERENCE_DROP:
            out.append(
                {
                    "code": "preference_regressed",
                    "message": f"the shipped student's {label} fell from {before:.3f} to {after:.3f} on the held-out "
                    "preference pairs: it ranks answers less like its teachers than it did. Add or raise "
                    "loss.preference, or compare the checkpoints' evaluations.",
                }
            )
    return out


PREFERENCE_DROP = 0.05  # a fall in preference agreement or harmlessness the run warns about


def _holdout(examples: list[data_mod.Example], fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Validation held out of the training data, by record; fixed (seed 0) so runs of any seed compare."""
    train, valid = data_mod.holdout(examples, fraction, seed=0)
    where = {id(e): i for i, e in enumerate(examples)}
    return np.array([where[id(e)] for e in train]), np.array([where[id(e)] for e in valid])


def _check_tokens(c: cache_mod.TeacherCache, idx: np.ndarray, examples: list[data_mod.Example]) -> None:
    """The cache was made from the same data by the same tokenizer: spot-check that its tokens agree."""
    for i, pos in zip(idx[:4], c.positions(idx[:4])):
        start, end = c.offsets[pos], c.offsets[pos + 1]
        if not np.array_equal(np.asarray(c.tokens[start:end]), examples[i].tokens):
            raise RuntimeError(f"teacher cache {c.path.name} does not match the tokenized data")


def _check_out_dir(spec: DistillSpec, out_dir: Path) -> None:
    """An output folder belongs to one spec: resuming is allowed, reusing it for another spec is not."""
    marker = out_dir / "spec.json"
    current = spec.model_dump(mode="json")
    if marker.exists():
        if json.loads(marker.read_text()) != current:
            raise UserError(f"{out_dir} holds a run of a different spec; choose another output folder")
    else:
        marker.write_text(json.dumps(current, indent=2))
