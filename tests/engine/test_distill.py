"""End-to-end runs of the engine on tiny offline models: outputs, adapters, resume, stages, groups, modes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from distillery_contract.specs import DistillSpec
from tests.helpers import tiny
from worker.engine import distill
from worker.engine.cache import CacheStore
from worker.engine.errors import Cancelled, UserError
from worker.engine.train import Hooks

BASE = {
    "loss": {"kind": "forward_kl", "temperature": 1.0, "alpha": 1.0, "top_k": 16},
    "adapter": {"type": "lora", "rank": 4, "scale": 10.0},
    "training": {
        "steps": 6,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "max_seq_len": 48,
        "eval_every": 3,
        "checkpoint_every": 3,
        "lr_schedule": "cosine",
        "warmup_steps": 1,
        "seed": 3,
        "eval_batches": 2,
    },
}


def make_spec(student_model, teachers, text, **over) -> DistillSpec:
    doc = copy.deepcopy(BASE)
    doc.update(
        student={"model": str(student_model)},
        teachers=[{"model": str(t)} for t in teachers],
        data={"train": str(text["train"]), "valid": str(text["valid"])},
    )
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return DistillSpec.model_validate(doc)


def run(spec: DistillSpec, out: Path, store_root: Path, hooks: Hooks | None = None, adapter: Path | None = None):
    inputs = distill.Inputs(
        student=Path(spec.student.model),
        teachers=[Path(t.model) for t in spec.teachers],
        train=Path(spec.data.train),
        valid=Path(spec.data.valid),
        student_adapter=adapter,
        preference=Path(spec.data.preference) if spec.data.preference else None,
    )
    return distill.run_distill(spec, inputs, out, CacheStore(store_root), hooks)


def train_losses(out: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"
    ]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("caches")


def test_offline_lora_run_outputs(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    spec = make_spec(tiny_student, [tiny_teacher], tiny_text, training={"steps": 12, "eval_every": 6})
    events = []
    summary = run(spec, tmp_path, store, Hooks(on_event=lambda k, m, d: events.append(k)))
    assert summary["final"]["val_kl"] < 0.8 * summary["initial"]["val_kl"]
    assert summary["final"]["val_top1_agreement"] > summary["initial"]["val_top1_agreement"]
    for part in ("initial", "final"):
        for key in ("val_kl", "val_ppl", "val_top1_agreement"):
            assert np.isfinite(summary[part][key])
    assert set(summary["train"]) >= {"steps", "tokens", "tokens_per_second", "peak_memory_bytes", "wall_seconds"}
    assert summary["train"]["steps"] == 12 and summary["best"]["step"] in (6, 12)
    assert json.loads((tmp_path / "summary.json").read_text())["best"] == summary["best"]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 6, 12]
    assert {"preflight", "data", "teacher_cache", "student", "done"} <= set(events)
    assert not any("subset" in str(e) for e in events)  # 12 steps x 4 cover the whole (small) train set
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert [n for n in names if n.startswith("step-")] == ["step-0000009", "step-0000012"]  # keep_checkpoints = 2
    # best checkpoints are kept while the state or a kept step checkpoint refers to them (step 9's best is 6)
    referred = {summary["best"]["step"], 6}
    assert [n for n in names if n.startswith("best-")] == [f"best-{s:07d}" for s in sorted(referred)]

    # the adapter is mlx-lm's own format: load and generate with mlx_lm unchanged, in a fresh process
    code = (
        "import sys; from mlx_lm import load, generate; m, t = load(sys.argv[1], adapter_path=sys.argv[2]);"
        "print(repr(generate(m, t, prompt='The', max_tokens=5)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_student), str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"]["rank"] == 4


def test_resume_gives_the_same_trajectory(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    spec = make_spec(tiny_student, [tiny_teacher], tiny_text, adapter={"dropout": 0.2})
    run(spec, tmp_path / "straight", store)
    steps = []

    def stop_after_three() -> bool:
        return len(steps) >= 3

    hooks = Hooks(on_metrics=lambda r: steps.append(r) if r["kind"] == "train" else None, should_stop=stop_after_three)
    with pytest.raises(Cancelled):
        run(spec, tmp_path / "resumed", store, hooks)
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000003").is_dir()
    events = []
    run(spec, tmp_path / "resumed", store, Hooks(on_event=lambda k, m, d: events.append(k)))
    assert "resumed" in events
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-5)


def test_same_seed_same_run_other_seed_differs(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    spec = make_spec(tiny_student, [tiny_teacher], tiny_text, training={"steps": 3})
    messages = []
    run(spec, tmp_path / "a", store, Hooks(on_event=lambda k, m, d: messages.append(m)))
    # 3 steps x 4 sequences: a short run trains on (and caches) a fixed subset of 12 sequences
    assert any("covers 12 of" in m for m in messages)
    assert any("(12 of" in m for m in messages if m.startswith("building teacher cache"))
    run(spec, tmp_path / "b", store)
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    other = make_spec(tiny_student, [tiny_teacher], tiny_text, training={"steps": 3, "seed": 4})
    run(other, tmp_path / "c", store)
    assert train_losses(tmp_path / "c") != train_losses(tmp_path / "a")


def test_output_folder_refuses_another_spec(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    run(make_spec(tiny_student, [tiny_teacher], tiny_text, training={"steps": 2}), tmp_path, store)
    with pytest.raises(UserError, match="different spec"):
        run(make_spec(tiny_student, [tiny_teacher], tiny_text, training={"steps": 3}), tmp_path, store)


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_dora_and_full_adapters_load_in_mlx_lm(kind, tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    spec = make_spec(
        tiny_student,
        [tiny_teacher],
        tiny_text,
        adapter={"type": kind, "layers": 2},
        training={"steps": 2, "learning_rate": 1e-3},
    )
    run(spec, tmp_path, store)
    from mlx_lm import load

    model, _ = load(str(tiny_student), adapter_path=str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == kind and cfg["num_layers"] == 2
    names = set(mx.load(str(tmp_path / "adapters.safetensors")))
    if kind == "dora":
        assert any(n.endswith(".m") for n in names)
    else:  # full fine-tuning of the last 2 of 4 layers: their weights and nothing else
        assert names and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in names)


def test_keep_layers_writes_a_student_model(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    spec = make_spec(
        tiny_student,
        [tiny_teacher],
        tiny_text,
        student={"model": str(tiny_student), "keep_layers": [0, 3]},
        training={"steps": 2},
    )
    run(spec, tmp_path, store)
    from mlx_lm import load

    model, _ = load(str(tmp_path / "student"), adapter_path=str(tmp_path))
    assert len(model.layers) == 2
    assert json.loads((tmp_path / "student" / "config.json").read_text())["num_hidden_layers"] == 2
    # kept layer 1 of the pruned student is layer 3 of the original
    orig = mx.load(str(tiny_student / "model.safetensors"))
    pruned = mx.load(str(tmp_path / "student" / "model.safetensors"))
    assert mx.array_equal(pruned["model.layers.1.mlp.up_proj.weight"], orig["model.layers.3.mlp.up_proj.weight"])
    with pytest.raises(UserError, match="keep_layers"):
        run(
            make_spec(
                tiny_student, [tiny_teacher], tiny_text, student={"model": str(tiny_student), "keep_layers": [0, 9]}
            ),
            tmp_path / "bad",
            store,
        )


def test_online_mode_uses_full_kl(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    spec = make_spec(
        tiny_student,
        [tiny_teacher],
        tiny_text,
        teacher_mode="online",
        training={"steps": 3},
        loss={"kind": "jsd", "beta": 0.3, "temperature": 2.0},
    )
    summary = run(spec, tmp_path, store)
    assert summary["final"]["kl_method"] == "full"
    assert summary["final"]["val_kl"] < summary["initial"]["val_kl"]


def test_offline_bucketed_kl_is_below_full_kl(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    offline = run(make_spec(tiny_student, [tiny_teacher], tiny_text, training={"steps": 1}), tmp_path / "off", store)
    online = run(
        make_spec(tiny_student, [tiny_teacher], tiny_text, training={"steps": 1}, teacher_mode="online"),
        tmp_path / "on",
        store,
    )
    # same student at step 0: the top-k + tail KL is a lower bound of the full KL (data processing inequality)
    assert offline["initial"]["val_kl"] <= online["initial"]["val_kl"] + 1e-4
    assert offline["initial"]["val_ppl"] == pytest.approx(online["initial"]["val_ppl"], rel=1e-4)


def test_param_groups_freeze_and_scale(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    groups = [{"pattern": r"layers\.0\.", "lr_mult": 0.0}, {"pattern": r"mlp", "lr_mult": 0.5}]
    spec = make_spec(tiny_student, [tiny_teacher], tiny_text, training={"steps": 2, "param_groups": groups})
    run(spec, tmp_path, store)
    weights = mx.load(str(tmp_path / "adapters.safetensors"))
    frozen = [k for k in weights if k.startswith("model.layers.0.") and k.endswith("lora_b")]
    trained = [k for k in weights if k.startswith("model.layers.1.") and k.endswith("lora_b")]
    assert frozen and trained
    assert all(float(mx.abs(weights[k]).max()) == 0.0 for k in frozen)  # lora_b starts at zero: untouched
    assert all(float(mx.abs(weights[k]).max()) > 0.0 for k in trained)
    with pytest.raises(UserError, match="param_groups"):
        run(
            make_spec(
                tiny_student,
                [tiny_teacher],
                tiny_text,
                training={"steps": 1, "param_groups": [{"pattern": ".*", "lr_mult": 0.0}]},
            ),
            tmp_path / "all-frozen",
            store,
        )


def test_stages_switch_loss_and_learning_rate(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    stages = [
        {"name": "sft", "steps": 2, "loss": {"alpha": 0.0}, "learning_rate": 1e-3},
        {"name": "kd", "steps": 3, "loss": {"kind": "reverse_kl"}},
    ]
    spec = make_spec(
        tiny_student,
        [tiny_teacher],
        tiny_text,
        training={"stages": stages, "steps": 5, "warmup_steps": 0, "lr_schedule": "constant"},
    )
    assert spec.training.steps == 5
    events = []
    run(spec, tmp_path, store, Hooks(on_event=lambda k, m, d: events.append((k, d))))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["stage"] for r in train] == ["sft", "sft", "kd", "kd", "kd"]
    assert [r["lr"] for r in train] == [1e-3, 1e-3, 3e-3, 3e-3, 3e-3]
    assert ("stage", {"stage": "kd"}) in events


def test_starting_adapter_is_continued(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    first = run(make_spec(tiny_student, [tiny_teacher], tiny_text, training={"steps": 4}), tmp_path / "sft", store)
    spec = make_spec(
        tiny_student,
        [tiny_teacher],
        tiny_text,
        student={"model": str(tiny_student), "adapter": str(tmp_path / "sft")},
        training={"steps": 2},
    )
    second = run(spec, tmp_path / "continued", store, adapter=tmp_path / "sft")
    # it starts where the first adapter ended, not from the base model
    assert second["initial"]["val_kl"] == pytest.approx(first["final"]["val_kl"], rel=1e-4)
    with pytest.raises(UserError, match="adapter.rank"):
        bad = make_spec(
            tiny_student,
            [tiny_teacher],
            tiny_text,
            adapter={"rank": 8},
            student={"model": str(tiny_student), "adapter": str(tmp_path / "sft")},
        )
        run(bad, tmp_path / "bad", store, adapter=tmp_path / "sft")


def test_two_teachers(tiny_student, tiny_teacher, tiny_text, tiny_root, tmp_path, store):
    second = tiny.build_model(tiny_root / "teacher2", tiny_root / "tokenizer", hidden=48, layers=2, seed=9)
    spec = make_spec(tiny_student, [tiny_teacher, second], tiny_text, training={"steps": 3})
    spec.teachers[1].weight = 3.0
    summary = run(spec, tmp_path, store)
    assert np.isfinite(summary["final"]["val_kl"])
    assert summary["final"]["teacher_weights"] == [0.25, 0.75]  # fixed: the weights, the same on every instance
    assert summary["final"]["teacher_weights_std"] == [0.0, 0.0]
    kl = summary["final"]["val_kl_teachers"]  # the KL to each teacher; val_kl is their weighted mean
    assert summary["final"]["val_kl"] == pytest.approx(0.25 * kl[0] + 0.75 * kl[1], rel=1e-4)


@pytest.mark.parametrize(("kind", "mode"), [("confidence", "offline"), ("learned", "offline"), ("learned", "online")])
def test_adaptive_teacher_weighting_resumes_exactly(
    kind, mode, tiny_student, tiny_teacher, tiny_text, tiny_root, tmp_path, store
):
    """Per-instance weights, logged per evaluation; a run stopped and resumed (the learned gate's state in the
    checkpoint) takes the same steps as one that ran straight; from the caches or from the teachers' logits."""
    second = tiny.build_model(tiny_root / "teacher2", tiny_root / "tokenizer", hidden=48, layers=2, seed=9)
    spec = make_spec(tiny_student, [tiny_teacher, second], tiny_text, teacher_weighting=kind, teacher_mode=mode)
    straight = run(spec, tmp_path / "straight", store)
    w = straight["final"]["teacher_weights"]
    assert len(w) == 2 and sum(w) == pytest.approx(1.0, abs=1e-5)
    assert max(straight["final"]["teacher_weights_std"]) > 0  # instances get weights of their own
    records = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all("teacher_weight_0" in r and "val_kl_teacher_1" in r for r in records if r["kind"] == "eval")
    saved = (tmp_path / "straight" / "checkpoints" / "step-0000006" / "weighting.safetensors").is_file()
    assert saved == (kind == "learned")
    steps = []
    hooks = Hooks(
        on_metrics=lambda r: steps.append(r) if r["kind"] == "train" else None, should_stop=lambda: len(steps) >= 4
    )
    with pytest.raises(Cancelled):
        run(spec, tmp_path / "resumed", store, hooks)
    resumed = run(spec, tmp_path / "resumed", store)
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    assert resumed["final"]["teacher_weights"] == w


def test_plain_fine_tuning_ships_the_step_with_the_best_held_out_cross_entropy(
    tiny_student, tiny_teacher, tiny_text, tmp_path, store
):
    """`loss.alpha: 0` trains on the data alone: moving away from the teacher is the point, so the KL to it must
    not choose what ships (a fine-tuned specialist would always lose to its own start)."""
    spec = make_spec(
        tiny_student, [tiny_teacher], tiny_text, teacher_mode="online", loss={"alpha": 0.0}, training={"steps": 6}
    )
    summary = run(spec, tmp_path, store)
    assert summary["best"]["metric"] == "val_ce"
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    best = min(evals, key=lambda r: r["val_ce"])
    assert summary["best"]["step"] == best["step"] and summary["best"]["score"] == best["val_ce"]
    assert summary["final"]["val_ppl"] < summary["initial"]["val_ppl"]


def test_adaptive_weighting_needs_several_teachers(tiny_student, tiny_teacher, tiny_text):
    with pytest.raises(ValueError, match="teacher_weighting: confidence weighs several teachers"):
        make_spec(tiny_student, [tiny_teacher], tiny_text, teacher_weighting="confidence")


def test_early_stopping_keeps_the_best(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    # a learning rate this small cannot improve val KL by min_delta: the starting student (step 0) stays best
    spec = make_spec(
        tiny_student,
        [tiny_teacher],
        tiny_text,
        training={
            "steps": 12,
            "eval_every": 1,
            "learning_rate": 1e-9,
            "early_stopping_patience": 2,
            "early_stopping_min_delta": 1e-3,
            "warmup_steps": 0,
            "lr_schedule": "constant",
        },
    )
    events = []
    summary = run(spec, tmp_path, store, Hooks(on_event=lambda k, m, d: events.append(k)))
    assert "early_stopping" in events and summary["train"]["stopped_early"]
    assert summary["train"]["steps"] == 2 and summary["best"]["step"] == 0
    assert summary["final"] == summary["initial"] and summary["shipped"] == "start"
    assert [w["code"] for w in summary["warnings"]] == ["no_improvement"] and "warning" in events
    out = mx.load(str(tmp_path / "adapters.safetensors"))
    assert all(not mx.any(v).item() for k, v in out.items() if k.endswith("lora_b"))  # the identity adapter


def test_preflight_errors(tiny_student, tiny_teacher, tiny_text, tiny_root, tmp_path, store):
    other_tok = tiny_root / "other-tokenizer"
    tiny.build_tokenizer(other_tok, vocab_size=400)
    stranger = tiny.build_model(tiny_root / "stranger", other_tok, hidden=32, layers=1)
    with pytest.raises(UserError, match="not tokenizer-compatible.*vocabulary sizes differ"):
        run(make_spec(tiny_student, [stranger], tiny_text), tmp_path / "a", store)

    no_template_tok = tiny_root / "plain-tokenizer"
    tiny.build_tokenizer(no_template_tok, chat_template=None)
    plain = tiny.build_model(tiny_root / "plain", no_template_tok, hidden=32, layers=1)
    chat = tiny.write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}] * 8,
    )
    spec = make_spec(plain, [plain], {"train": chat, "valid": chat})
    with pytest.raises(UserError, match="chat data but .* no chat template"):
        run(spec, tmp_path / "b", store)

    # the same vocabulary, another family's turn markers: chat data rendered with the student's would mislead it
    marked_tok = tiny_root / "marked-tokenizer"
    tiny.build_tokenizer(
        marked_tok, chat_template="{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    )
    marked = tiny.build_model(tiny_root / "marked", marked_tok, hidden=32, layers=1)
    chat_spec = make_spec(tiny_student, [marked], {"train": chat, "valid": chat})
    with pytest.raises(UserError, match="teacher marked and student student have different chat templates"):
        run(chat_spec, tmp_path / "e", store)
    assert np.isfinite(
        run(make_spec(tiny_student, [marked], tiny_text, training={"steps": 1}), tmp_path / "f", store)["final"][
            "val_kl"
        ]
    )

    huge = make_spec(tiny_student, [tiny_teacher], tiny_text, training={"batch_size": 4096, "max_seq_len": 131072})
    with pytest.raises(UserError, match="not enough memory.*batch_size"):
        run(huge, tmp_path / "c", store)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        run(make_spec(tiny_student, [tiny_teacher], {"train": bad, "valid": tiny_text["valid"]}), tmp_path / "d", store)
    assert not (tmp_path / "d" / "checkpoints").exists()


def test_fuse_writes_a_plain_model(tiny_student, tiny_teacher, tiny_text, tmp_path, store):
    spec = make_spec(tiny_student, [tiny_teacher], tiny_text, training={"steps": 2}, output={"fuse": True})
    run(spec, tmp_path, store)
    from mlx_lm import load

    fused, _ = load(str(tmp_path / "fused"))
    adapted, _ = load(str(tiny_student), adapter_path=str(tmp_path))
    x = mx.array([[5, 6, 7, 8]])
    np.testing.assert_allclose(np.array(fused(x)), np.array(adapted(x)), atol=2e-3)
    assert not any("lora" in k for k, _ in tree_flatten(fused.parameters()))
