"""On-policy distillation (worker/engine/on_policy.py): the sampled-token estimator by hand, sampling, and runs
on tiny models: the reverse KL on the student's own samples is measured and falls, samples and costs are
reported, re-runs and resumed runs draw the same samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from distillery_contract.specs import DistillSpec, OnPolicySpec
from tests.engine.test_distill import make_spec, run, train_losses
from tests.helpers import tiny
from worker.engine import data as data_mod
from worker.engine import losses, models, on_policy
from worker.engine.errors import Cancelled, UserError
from worker.engine.train import Hooks


@pytest.fixture(scope="module")
def tiny_completions(tiny_root) -> dict[str, Path]:
    """Prompt / completion pairs cut from real prose."""

    def pairs(records):
        return [{"prompt": r["text"][:60], "completion": r["text"][60:140]} for r in records]

    return {
        "train": tiny.write_jsonl(tiny_root / "cp_train.jsonl", pairs(tiny.text_records(32, offset=0))),
        "valid": tiny.write_jsonl(tiny_root / "cp_valid.jsonl", pairs(tiny.text_records(8, offset=100))),
    }


def on_policy_spec(student, teacher, data, more_teachers=(), **over) -> DistillSpec:
    doc = {
        "teacher_mode": "on_policy",
        "loss": {"kind": "reverse_kl", "temperature": 1.0, "alpha": 1.0},
        "on_policy": {"max_new_tokens": 12, "eval_prompts": 6},
        "training": {"steps": 6, "learning_rate": 3e-3, "max_seq_len": 64, "eval_every": 3, "checkpoint_every": 3},
    }
    for key, value in over.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return make_spec(student, [teacher, *more_teachers], data, **doc)


def test_sampled_estimator_value_and_gradient_by_hand():
    """Value log q(x) − log p(x); gradient w.r.t. the student's logits r · (onehot(x) − q)."""
    student = np.array([[[1.0, 2.0, 0.5, -1.0]]], dtype=np.float32)
    teacher = np.array([[[0.0, 3.0, 1.0, 0.0]]], dtype=np.float32)
    x = 2
    q = np.exp(student[0, 0]) / np.exp(student[0, 0]).sum()
    p = np.exp(teacher[0, 0]) / np.exp(teacher[0, 0]).sum()
    r = math.log(q[x]) - math.log(p[x])
    st = losses.SampledTeacher.from_logits(mx.array(teacher), mx.array([[x]]))
    assert st.token_logprobs.item() == pytest.approx(math.log(p[x]), abs=1e-6)

    def value(logits):
        return st.divergence(logits, "reverse_kl", 1.0).sum()

    v, g = mx.value_and_grad(value)(mx.array(student))
    assert v.item() == pytest.approx(r, abs=1e-5)
    np.testing.assert_allclose(np.array(g)[0, 0], r * (np.eye(4)[x] - q), atol=1e-6)
    with pytest.raises(ValueError, match="reverse_kl only"):
        st.divergence(mx.array(student), "forward_kl", 1.0)


def test_sampled_estimator_needs_reverse_kl(tiny_student, tiny_teacher, tiny_completions):
    with pytest.raises(ValueError, match="estimator: sampled"):
        on_policy_spec(
            tiny_student, tiny_teacher, tiny_completions, loss={"kind": "jsd"}, on_policy={"estimator": "sampled"}
        )


def test_prompts_are_the_tokens_before_the_first_target():
    e = data_mod.Example(tokens=np.arange(6, dtype=np.int32), target_mask=np.array([0, 0, 0, 1, 1, 0], bool), source=0)
    assert on_policy.prompt_of(e).tolist() == [0, 1, 2]
    with pytest.raises(UserError, match="'text' data.*completions"):
        on_policy.check_prompts([e], "text", "train.jsonl")


def test_samples_are_bounded_masked_and_drawn_from_the_key(tiny_student, tiny_tokenizer):
    model, tok, _ = models.load_model(tiny_student)
    prompts = [np.array(tok.encode(t), dtype=np.int32) for t in ("The quick brown", "Once upon a time there", "x")]
    cfg = OnPolicySpec(max_new_tokens=10, temperature=1.0)

    def draw(seed, max_seq_len=64):
        mx.random.seed(seed)
        return on_policy.sample(model, tok, prompts, cfg, max_seq_len)

    a, b, c = draw(1), draw(1), draw(2)
    assert [e.tokens.tolist() for e in a.examples] == [e.tokens.tolist() for e in b.examples]
    assert [e.tokens.tolist() for e in a.examples] != [e.tokens.tolist() for e in c.examples]
    for p, e in zip(prompts, a.examples):
        n = len(e.tokens) - len(p)
        assert e.tokens[: len(p)].tolist() == p.tolist() and 1 <= n <= 10
        assert e.target_mask.tolist() == [False] * len(p) + [True] * n
    assert a.generated_tokens == sum(len(e.tokens) - len(p) for p, e in zip(prompts, a.examples))
    short = draw(1, max_seq_len=len(prompts[1]) + 3)
    assert max(len(e.tokens) for e in short.examples) <= len(prompts[1]) + 3

    greedy = on_policy.sample(model, tok, prompts[:1], OnPolicySpec(max_new_tokens=4, temperature=0.0), 64)
    ids = prompts[0].tolist()
    for _ in range(len(greedy.examples[0].tokens) - len(ids)):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    assert greedy.examples[0].tokens.tolist() == ids


def test_on_policy_run_lowers_the_reverse_kl_on_samples(tiny_student, tiny_teacher, tiny_completions, tmp_path):
    spec = on_policy_spec(tiny_student, tiny_teacher, tiny_completions, training={"steps": 12, "eval_every": 6})
    events = []
    summary = run(spec, tmp_path / "out", tmp_path / "store", Hooks(on_event=lambda k, m, d: events.append((k, d))))
    initial, final = summary["initial"], summary["final"]
    assert final["val_reverse_kl"] < 0.9 * initial["val_reverse_kl"], (initial, final)
    assert initial["val_sampled_tokens"] > 0 and "val_kl" in final  # the dataset's own KL stays reported
    assert summary["best"]["metric"] == "val_reverse_kl" and summary["best"]["step"] > 0
    t = summary["train"]
    assert 0 < t["generated_tokens"] <= 12 * 4 * 12 and t["teacher_tokens"] > t["generated_tokens"]
    assert t["generate_seconds"] > 0 and t["score_seconds"] > 0
    samples = [d for k, d in events if k == "samples"]
    assert [d["step"] for d in samples] == [0, 6, 12]
    first = samples[0]["samples"][0]
    assert first["prompt"] and first["tokens"] > 0 and first["max_gap"] >= first["mean_gap"] >= 0
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r["kind"] == "train")
    assert step["generated_tokens"] > 0 and step["update_seconds"] > 0


def test_gkd_mix_and_sampled_estimator_run(tiny_student, tiny_teacher, tiny_completions, tmp_path):
    spec = on_policy_spec(
        tiny_student,
        tiny_teacher,
        tiny_completions,
        on_policy={"fraction": 0.5, "estimator": "sampled", "temperature": 0.8, "top_p": 0.9},
        training={"steps": 6, "eval_every": 6},
    )
    summary = run(spec, tmp_path / "out", tmp_path / "store")
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    generated = [r["generated_tokens"] for r in records if r["kind"] == "train"]
    assert any(g == 0 for g in generated) and any(g > 0 for g in generated)  # off- and on-policy batches
    assert math.isfinite(summary["final"]["val_reverse_kl"])


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_on_policy_with_two_teachers_weighs_them_per_sample(
    estimator, tiny_student, tiny_teacher, tiny_completions, tiny_root, tmp_path
):
    """Adaptive weighting on the student's own samples: each teacher's likelihood of what the student wrote."""
    second = tiny.build_model(tiny_root / "teacher2", tiny_root / "tokenizer", hidden=48, layers=2, seed=9)
    spec = on_policy_spec(
        tiny_student,
        tiny_teacher,
        tiny_completions,
        more_teachers=[second],
        teacher_weighting="confidence",
        on_policy={"estimator": estimator},
        training={"steps": 3},
    )
    summary = run(spec, tmp_path / "out", tmp_path / "store")
    w = summary["final"]["teacher_weights"]
    assert len(w) == 2 and sum(w) == pytest.approx(1.0, abs=1e-5)
    assert math.isfinite(summary["final"]["val_reverse_kl"])


def test_rerun_and_resume_draw_the_same_samples(tiny_student, tiny_teacher, tiny_completions, tmp_path):
    spec = on_policy_spec(tiny_student, tiny_teacher, tiny_completions)
    run(spec, tmp_path / "straight", tmp_path / "store")
    run(spec, tmp_path / "again", tmp_path / "store")
    steps = []
    hooks = Hooks(
        on_metrics=lambda r: steps.append(r) if r["kind"] == "train" else None, should_stop=lambda: len(steps) >= 3
    )
    with pytest.raises(Cancelled):
        run(spec, tmp_path / "resumed", tmp_path / "store", hooks)
    run(spec, tmp_path / "resumed", tmp_path / "store")

    def generated(out):
        return [json.loads(x).get("generated_tokens") for x in (out / "metrics.jsonl").read_text().splitlines()]

    a = train_losses(tmp_path / "straight")
    assert train_losses(tmp_path / "again") == a
    np.testing.assert_allclose(train_losses(tmp_path / "resumed"), a, rtol=1e-5)
    assert generated(tmp_path / "resumed") == generated(tmp_path / "straight")


def test_on_policy_refuses_text_data(tiny_student, tiny_teacher, tiny_text, tmp_path):
    spec = on_policy_spec(tiny_student, tiny_teacher, tiny_text)
    with pytest.raises(UserError, match="on_policy samples completions for prompts"):
        run(spec, tmp_path / "out", tmp_path / "store")


@pytest.fixture(scope="module")
def tiny_prompts(tiny_root) -> dict[str, Path]:
    """Prompts alone (the `prompts` format): the student writes every completion."""

    def prompts(records):
        return [{"prompt": r["text"][:60]} for r in records]

    return {
        "train": tiny.write_jsonl(tiny_root / "pr_train.jsonl", prompts(tiny.text_records(16, offset=0))),
        "valid": tiny.write_jsonl(tiny_root / "pr_valid.jsonl", prompts(tiny.text_records(6, offset=100))),
    }


def test_prompts_alone_train_on_policy(tiny_student, tiny_teacher, tiny_prompts, tmp_path):
    ds = data_mod.load_jsonl(tiny_prompts["train"])
    assert ds.format == "prompts"
    tok = models.load_tokenizer(tiny_student)
    examples = data_mod.tokenize(ds, tok, 64)
    assert len(examples) == len(ds.records) and not any(e.target_mask.any() for e in examples)
    spec = on_policy_spec(tiny_student, tiny_teacher, tiny_prompts, training={"steps": 4, "eval_every": 2})
    events = []
    summary = run(spec, tmp_path / "out", tmp_path / "store", Hooks(on_event=lambda k, m, d: events.append((k, m))))
    initial, final = summary["initial"], summary["final"]
    # no data completions to take a val KL on: the score is the reverse KL on the student's samples alone
    assert "val_kl" not in initial and initial["val_reverse_kl"] > 0 and math.isfinite(final["val_reverse_kl"])
    assert summary["train"]["generated_tokens"] > 0
    done = next(m for k, m in events if k == "done")
    assert done.startswith("reverse KL on samples ") and "val KL" not in done


def test_prompts_alone_need_on_policy_with_fraction_one(tiny_student, tiny_teacher, tiny_prompts, tmp_path):
    offline = make_spec(tiny_student, [tiny_teacher], tiny_prompts, training={"steps": 2})
    with pytest.raises(UserError, match="trains only with teacher_mode: on_policy"):
        run(offline, tmp_path / "a", tmp_path / "store")
    mixed = on_policy_spec(tiny_student, tiny_teacher, tiny_prompts, on_policy={"fraction": 0.5})
    with pytest.raises(UserError, match=r"set on_policy.fraction: 1"):
        run(mixed, tmp_path / "b", tmp_path / "store")
