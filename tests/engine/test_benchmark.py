"""The benchmark engine: metric functions against hand-computed numbers, MCQ and preference sets whose right
answers are known to the model, an end-to-end run on tiny models, and the errors a user can fix."""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from distillery_contract.specs import BenchmarkSpec
from tests.helpers import tiny
from worker.engine import benchmark as bm
from worker.engine import benchmark_metrics as metrics
from worker.engine import benchmark_store, models
from worker.engine import data as data_mod
from worker.engine.benchmark_metrics import PairScores
from worker.engine.benchmark_store import SCRATCH_DIR, ReferenceStore
from worker.engine.errors import Cancelled, UserError
from worker.engine.train import Hooks

NO_SPEED = {"enabled": False}


# --------------------------------------------------------------------------------------------- helpers


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def greedy_continuation(model, tok, prompt: str, max_new: int = 6) -> str:
    """The model's greedy continuation of `prompt`, its first token restricted to a word (" " + letters) so the
    text is never blank; cut so that it re-encodes to the very tokens the model chose."""
    prompt_ids = tok.encode(prompt)
    vocab = sorted(tok.get_vocab().items(), key=lambda x: x[1])
    # byte-level BPE: Ġ is a space (and itself a letter to isalpha, hence isascii)
    words = np.array([t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha() for t, _ in vocab])
    ids: list[int] = []
    for _ in range(max_new):
        logits = np.array(model(mx.array([prompt_ids + ids]))[0, -1])
        ids.append(int(np.argmax(np.where(words, logits, -np.inf) if not ids else logits)))
    while len(ids) > 1 and tok.encode(tok.decode(ids), add_special_tokens=False) != ids:
        ids.pop()
    return tok.decode(ids)


def random_text(tok, rng: np.random.Generator, n: int = 6) -> str:
    """Random ordinary tokens (ids past the special ones) as text, with a leading space: what no model expects."""
    vocab = len(tok.get_vocab())
    while True:
        text = tok.decode([int(i) for i in rng.integers(len(tiny.SPECIAL_TOKENS), vocab, n)])
        if text.strip():
            return " " + text.strip()


def questions(n: int) -> list[str]:
    corpus = tiny.corpus()
    return [corpus[i * 5][:70].replace("\n", " ").strip() for i in range(n)]


def mcq_records(model_dir: Path, n: int = 6, n_choices: int = 4, seed: int = 0) -> list[dict]:
    """Questions whose choice at index `answer` is the model's own greedy continuation, the others random."""
    from mlx_lm import load

    model, tok = load(str(model_dir))
    rng = np.random.default_rng(seed)
    records = []
    for i, q in enumerate(questions(n)):
        right = greedy_continuation(model, tok, bm.MCQ_PROMPT.format(question=q))[1:]  # the template adds " "
        choices = [random_text(tok, rng)[1:] for _ in range(n_choices - 1)]
        answer = i % n_choices
        choices.insert(answer, right)
        records.append({"question": q, "choices": choices, "answer": answer})
    return records


def pref_records(model_dir: Path, n: int = 5, seed: int = 1) -> list[dict]:
    """chosen: the model's greedy continuation of the prompt; rejected: random tokens."""
    from mlx_lm import load

    model, tok = load(str(model_dir))
    rng = np.random.default_rng(seed)
    return [
        {"prompt": q, "chosen": greedy_continuation(model, tok, q), "rejected": random_text(tok, rng)}
        for q in questions(n)
    ]


def make_adapter(base: Path, out: Path, seed: int = 0, num_layers: int = 2) -> Path:
    """A LoRA adapter in mlx-lm's format with non-zero B matrices (a fresh LoRA is the identity)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _, _ = models.load_model(base)
    model.freeze()
    params = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    mx.random.seed(seed)  # before the layers: lora_a is drawn from MLX's global generator, whatever ran before
    linear_to_lora_layers(model, num_layers, params)
    weights = {
        k: (0.05 * mx.random.normal(v.shape) if k.endswith("lora_b") else v)
        for k, v in tree_flatten(model.parameters())
        if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params})
    )
    return out


def spec_of(reference: Path, candidates: list[dict], **kw) -> BenchmarkSpec:
    data = {k: str(kw.pop(k)) for k in ("text", "mcq", "preference", "prompts") if kw.get(k) is not None}
    for k in ("text", "mcq", "preference", "prompts"):
        kw.pop(k, None)
    doc = {
        "reference": str(reference),
        "candidates": [{k: str(v) for k, v in c.items() if k != "metrics"} for c in candidates],
        "data": data,
        "max_seq_len": 64,
        "batch_size": 4,
        "speed": NO_SPEED,
        **kw,
    }
    return BenchmarkSpec.model_validate(doc)


def inputs_of(reference: Path, candidates: list[dict], **kw) -> bm.BenchmarkInputs:
    return bm.BenchmarkInputs(
        reference=reference,
        candidates=[
            bm.CandidateInput(
                c["label"], Path(c["model"]), Path(c["adapter"]) if c.get("adapter") else None, c.get("metrics")
            )
            for c in candidates
        ],
        text=kw.get("text"),
        mcq=kw.get("mcq"),
        preference=kw.get("preference"),
        prompts=kw.get("prompts"),
    )


def bench(
    out: Path, reference: Path, candidates: list[dict], hooks: Hooks | None = None, on_progress=None, **kw
) -> tuple[dict, dict]:
    """Run a benchmark of paths; returns (summary, report.json as dict)."""
    spec = spec_of(reference, candidates, **kw)
    summary = bm.run_benchmark(spec, inputs_of(reference, candidates, **kw), out, hooks, on_progress)
    return summary, json.loads((out / "report.json").read_text())


def continuation_loglik(model, tok, prompt: str, response: str) -> tuple[float, int]:
    """(Σ log p(response token | everything before it), response tokens), in float64 numpy from the logits."""
    p, c = tok.encode(prompt), tok.encode(response, add_special_tokens=False)
    ids = p + c
    lp = np_log_softmax(np.array(model(mx.array([ids[:-1]]))[0]))
    picked = lp[np.arange(len(ids) - 1), ids[1:]]  # position i predicts ids[i + 1]
    return float(picked[len(p) - 1 :].sum()), len(c)


def all_at_once(reference: Path, candidates: list[dict], **kw) -> dict[str, dict]:
    """The benchmark's previous computation, as an oracle: every model loaded together, each text batch's
    reference logits kept in memory in float32 and every model compared with them, every model run on each
    mcq / preference batch in turn. Returns each label's text, mcq and preference metrics."""
    from worker.engine.benchmark_passes import batches

    spec, inputs = spec_of(reference, candidates, **kw), inputs_of(reference, candidates, **kw)
    rows = bm.report_rows(spec, inputs)
    tok = bm.check_models(rows)
    datasets = bm.load_data(spec, inputs, tok)
    loaded = [(r, bm.load_model_of(r)[0]) for r in rows]
    pad = tok.pad_token_id
    text_totals = {r.label: {} for r in rows}
    for b in batches(bm.text_examples(datasets, tok, spec), spec.batch_size, pad):
        ref_logits = loaded[0][1](b.tokens[:, :-1])
        ref = metrics.reference_view(ref_logits)
        for r, model in loaded:
            sums = metrics.text_sums(ref, model(b.tokens[:, :-1]), b.tokens[:, 1:], b.target_mask[:, 1:])
            for k, v in sums.items():
                text_totals[r.label][k] = text_totals[r.label].get(k, 0.0) + float(v.item())

    def logliks(examples):
        out = {r.label: (np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)) for r in rows}
        for b in batches(examples, spec.batch_size, pad):
            for r, model in loaded:
                ll, n = metrics.sequence_logprobs(model, b.tokens, b.target_mask)
                out[r.label][0][b.example_ids], out[r.label][1][b.example_ids] = np.array(ll), np.array(n)
        return out

    mcq = logliks(bm.mcq_examples(datasets, tok, spec))
    pref = logliks(bm.pref_examples(datasets, tok, spec))
    subjects = [r.get("subject") for r in datasets["preference"].records]
    ref_pairs = PairScores.from_examples(*pref[rows[0].label])
    return {
        r.label: {
            **metrics.text_metrics(text_totals[r.label]),
            **bm.mcq_result(datasets["mcq"].records, *mcq[r.label]),
            **metrics.pref_metrics(PairScores.from_examples(*pref[r.label]), ref_pairs, subjects),
        }
        for r in rows
    }


def row(rep: dict, label: str) -> dict:
    return next(c for c in rep["candidates"] if c["label"] == label)["metrics"]


@pytest.fixture(scope="module")
def mcq_file(tiny_teacher, tmp_path_factory) -> Path:
    return tiny.write_jsonl(tmp_path_factory.mktemp("mcq") / "mcq.jsonl", mcq_records(tiny_teacher))


@pytest.fixture(scope="module")
def pref_file(tiny_teacher, tmp_path_factory) -> Path:
    return tiny.write_jsonl(tmp_path_factory.mktemp("pref") / "pref.jsonl", pref_records(tiny_teacher))


@pytest.fixture(scope="module")
def adapter_dir(tiny_student, tmp_path_factory) -> Path:
    return make_adapter(tiny_student, tmp_path_factory.mktemp("adapter"))


# ------------------------------------------------------------------------------- metric functions by hand


def test_text_metrics_match_hand_computation():
    ref = np.array(
        [[[2.0, 1.0, 0.0, -1.0, 0.5, 0.0], [0.0, 3.0, 1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 4.0, 0.0, 0.0, 0.0]]],
        dtype=np.float32,
    )
    cand = np.array(
        [
            [
                [1.0, 2.0, 0.0, 0.0, 0.0, 0.0],  # argmax 1 vs the reference's 0; 0 ranks 2nd: top-5
                [0.0, 2.5, 1.5, 0.0, 0.0, 0.0],  # argmax 1 = the reference's: top-1
                [3.0, 3.0, -5.0, 3.0, 3.0, 3.0],
            ]
        ],  # the reference's argmax 2 is the lowest: not top-5
        dtype=np.float32,
    )
    targets = np.array([[0, 2, 5]], dtype=np.int32)
    mask = np.array([[True, True, False]])  # the last position is not a target

    sums = metrics.text_sums(metrics.reference_view(mx.array(ref)), mx.array(cand), mx.array(targets), mx.array(mask))
    got = metrics.text_metrics({k: float(v.item()) for k, v in sums.items()})

    lp, lq = np_log_softmax(ref[0, :2]), np_log_softmax(cand[0, :2])
    p, q = np.exp(lp), np.exp(lq)
    m = (p + q) / 2
    kl = (p * (lp - lq)).sum(-1).mean()
    js = (0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)).mean()
    ce = -(lq[0, 0] + lq[1, 2]) / 2
    assert got["tokens"] == 2
    assert got["kl"] == pytest.approx(kl, rel=1e-5)
    assert got["js"] == pytest.approx(js, rel=1e-5)
    assert got["ce"] == pytest.approx(ce, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert got["top1_agreement"] == 0.5 and got["top5_agreement"] == 1.0

    # all three positions: the third has top-1 and top-5 both wrong
    sums = metrics.text_sums(metrics.reference_view(mx.array(ref)), mx.array(cand), mx.array(targets), mx.ones((1, 3)))
    got = metrics.text_metrics({k: float(v.item()) for k, v in sums.items()})
    assert got["top1_agreement"] == pytest.approx(1 / 3) and got["top5_agreement"] == pytest.approx(2 / 3)


def test_reference_against_itself_is_exact():
    logits = mx.array(np.random.default_rng(0).normal(size=(2, 7, 50)).astype(np.float32) * 4)
    targets = mx.array(np.random.default_rng(1).integers(0, 50, (2, 7)), dtype=mx.int32)
    sums = metrics.text_sums(metrics.reference_view(logits), logits, targets, mx.ones((2, 7)))
    got = metrics.text_metrics({k: float(v.item()) for k, v in sums.items()})
    assert got["kl"] == 0.0 and got["js"] == 0.0
    assert got["top1_agreement"] == 1.0 and got["top5_agreement"] == 1.0


def test_mcq_metric_function():
    got = metrics.mcq_metrics(
        scores=[[-1.0, -5.0], [-6.0, -4.0, -9.0], [-3.0, -2.0]],
        n_tokens=[[1, 10], [6, 2, 9], [1, 4]],
        answers=[0, 0, 1],
        subjects=["a", "a", "b"],
    )
    # summed: argmax 0, 1, 1 -> right, wrong, right
    # per token: (-1, -0.5) -> 1 wrong; (-1, -2, -1) -> 0 right; (-3, -0.5) -> 1 right
    assert got["mcq_accuracy"] == pytest.approx(2 / 3) and got["mcq_accuracy_norm"] == pytest.approx(2 / 3)
    assert got["mcq_by_subject"] == {
        "a": {"accuracy": 0.5, "accuracy_norm": 0.5, "n": 2},
        "b": {"accuracy": 1.0, "accuracy_norm": 1.0, "n": 1},
    }
    assert got["mcq_n"] == 3
    assert "mcq_by_subject" not in metrics.mcq_metrics([[0.0, -1.0]], [[1, 1]], [0], [None])


def test_pref_metrics_summed_vs_per_token_ties_and_subjects():
    # chosen means per token: -1 each; rejected: -2, -2, -2, -3
    model = PairScores(
        chosen=np.array([-1.0, -10.0, -2.0, -3.0]),
        rejected=np.array([-2.0, -4.0, -2.0, -9.0]),
        chosen_tokens=np.array([1, 10, 2, 3]),
        rejected_tokens=np.array([1, 2, 1, 3]),
    )
    # the reference prefers chosen, chosen, chosen, rejected (both scorings: one token each)
    ref = PairScores(np.array([-1.0, -1.0, -1.0, -1.0]), np.array([-3.0, -3.0, -3.0, -0.5]), np.ones(4), np.ones(4))
    got = metrics.pref_metrics(model, ref, ["x", "x", "y", None])
    # summed margins 1, -6, 0 (a tie: half), 6 -> 1 + 0 + 0.5 + 1; per token 1, 1, 1, 2 -> all won
    assert got["pref_accuracy"] == 2.5 / 4 and got["pref_accuracy_norm"] == 1.0
    assert got["pref_ties"] == 1 and got["pref_ties_norm"] == 0 and got["pref_n"] == 4
    # orders vs the reference's (+ + + -): summed (+ - = +) -> 1, 0, 0.5, 0; per token (+ + + +) -> 1, 1, 1, 0
    assert got["pref_agreement"] == 1.5 / 4 and got["pref_agreement_norm"] == 3 / 4
    assert got["pref_by_subject"] == {  # the pair without a subject counts only overall
        "x": {"accuracy": 0.5, "accuracy_norm": 1.0, "agreement": 0.5, "agreement_norm": 1.0, "n": 2},
        "y": {"accuracy": 0.5, "accuracy_norm": 1.0, "agreement": 0.5, "agreement_norm": 1.0, "n": 1},
    }
    itself = metrics.pref_metrics(model, model)
    assert itself["pref_agreement"] == 1.0 and itself["pref_agreement_norm"] == 1.0  # a tie agrees with a tie
    assert "pref_by_subject" not in itself
    assert "pref_harmless_accuracy" not in got  # no `harmless` subject
    # harmlessness: the preference accuracy on the `harmless` subject's pairs (pairs 1 and 2 here)
    harmless = metrics.pref_metrics(model, ref, ["harmless", "harmless", "y", None])
    assert harmless["pref_harmless_accuracy"] == 0.5 and harmless["pref_harmless_accuracy_norm"] == 1.0


# ------------------------------------------------------------------------------------ phases on tiny models


def test_perplexity_is_exp_of_hand_cross_entropy(tiny_student, tmp_path):
    text = tiny.write_jsonl(tmp_path / "one.jsonl", tiny.text_records(1, chars=150, offset=200))
    _, rep = bench(tmp_path / "out", tiny_student, [{"label": "student", "model": tiny_student}], text=text)
    assert rep["reference"] == "student" and len(rep["candidates"]) == 1  # the candidate is the reference itself

    model, tok, _ = models.load_model(tiny_student)
    (ex,) = data_mod.tokenize(data_mod.load_jsonl(text), tok, 64)
    logits = np.array(model(mx.array(ex.tokens[None, :-1]))[0], dtype=np.float64)
    lp = np_log_softmax(logits)
    targets, mask = ex.tokens[1:], ex.target_mask[1:]
    ce = -lp[np.arange(len(targets)), targets][mask].mean()
    m = row(rep, "student")
    assert m["tokens"] == mask.sum()
    assert m["ce"] == pytest.approx(ce, rel=1e-4)
    assert m["ppl"] == pytest.approx(math.exp(ce), rel=1e-4)
    assert m["kl"] == 0.0 and m["top1_agreement"] == 1.0


def test_mcq_known_answers_shuffled_key_and_subjects(tiny_teacher, mcq_file, tmp_path):
    cands = [{"label": "teacher", "model": tiny_teacher}]
    _, rep = bench(tmp_path / "right", tiny_teacher, cands, mcq=mcq_file)
    m = row(rep, "teacher")
    assert m["mcq_accuracy"] == 1.0 and m["mcq_accuracy_norm"] == 1.0 and m["mcq_n"] == 6

    records = [json.loads(x) for x in mcq_file.read_text().splitlines()]
    shifted = [{**r, "answer": (r["answer"] + 1) % len(r["choices"])} for r in records]
    _, rep = bench(tmp_path / "wrong", tiny_teacher, cands, mcq=tiny.write_jsonl(tmp_path / "wrong.jsonl", shifted))
    assert row(rep, "teacher")["mcq_accuracy"] == 0.0

    mixed = [
        {**(r if i % 2 == 0 else s), "subject": "right" if i % 2 == 0 else "shifted"}
        for i, (r, s) in enumerate(zip(records, shifted))
    ]
    _, rep = bench(tmp_path / "mixed", tiny_teacher, cands, mcq=tiny.write_jsonl(tmp_path / "mixed.jsonl", mixed))
    m = row(rep, "teacher")
    assert m["mcq_accuracy"] == 0.5
    assert m["mcq_by_subject"] == {
        "right": {"accuracy": 1.0, "accuracy_norm": 1.0, "n": 3},
        "shifted": {"accuracy": 0.0, "accuracy_norm": 0.0, "n": 3},
    }
    assert "Multiple choice by subject" in (tmp_path / "mixed" / "report.md").read_text()


def test_preference_known_order(tiny_teacher, tiny_student, pref_file, tmp_path):
    cands = [{"label": "student", "model": tiny_student}]
    _, rep = bench(tmp_path / "right", tiny_teacher, cands, preference=pref_file)
    ref = row(rep, "reference")
    assert ref["pref_accuracy"] == 1.0 and ref["pref_agreement"] == 1.0 and ref["pref_n"] == 5
    assert ref["pref_accuracy_norm"] == 1.0 and ref["pref_agreement_norm"] == 1.0
    student = row(rep, "student")
    # agreement is the share of pairs ordered as the reference orders them, here: as chosen > rejected
    assert student["pref_agreement"] == student["pref_accuracy"]
    assert student["pref_agreement_norm"] == student["pref_accuracy_norm"]

    records = [json.loads(x) for x in pref_file.read_text().splitlines()]
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in records]
    _, rep = bench(
        tmp_path / "swapped", tiny_teacher, cands, preference=tiny.write_jsonl(tmp_path / "swapped.jsonl", swapped)
    )
    assert row(rep, "reference")["pref_accuracy"] == 0.0 and row(rep, "reference")["pref_agreement"] == 1.0
    assert row(rep, "student")["pref_accuracy"] == pytest.approx(1.0 - student["pref_accuracy"])


def test_length_normalised_preference_and_subjects_by_hand(tiny_teacher, tmp_path):
    """chosen: the model's own 12-token greedy continuation; rejected: one random token. Summed, the short
    rejected response tends to win (fewer log-probs added up); per token, the model's own words do."""
    model, tok, _ = models.load_model(tiny_teacher)
    rng = np.random.default_rng(3)
    records = [
        {
            "prompt": q,
            "chosen": greedy_continuation(model, tok, q, max_new=12),
            "rejected": random_text(tok, rng, n=1),
            "subject": "even" if i % 2 == 0 else "odd",
        }
        for i, q in enumerate(questions(6))
    ]

    # the expected numbers, from the model's logits by numpy
    chosen = np.array([continuation_loglik(model, tok, r["prompt"], r["chosen"]) for r in records])
    rejected = np.array([continuation_loglik(model, tok, r["prompt"], r["rejected"]) for r in records])
    summed_win = chosen[:, 0] > rejected[:, 0]
    per_token_win = chosen[:, 0] / chosen[:, 1] > rejected[:, 0] / rejected[:, 1]
    assert (summed_win != per_token_win).any()  # the case the two scorings exist for
    even = np.arange(6) % 2 == 0

    _, rep = bench(
        tmp_path / "out",
        tiny_teacher,
        [{"label": "teacher", "model": tiny_teacher}],
        preference=tiny.write_jsonl(tmp_path / "pref.jsonl", records),
    )
    m = row(rep, "teacher")
    assert m["pref_accuracy"] == pytest.approx(summed_win.mean())
    assert m["pref_accuracy_norm"] == pytest.approx(per_token_win.mean())
    assert m["pref_ties"] == 0 and m["pref_ties_norm"] == 0 and m["pref_n"] == 6
    for subject, pick in (("even", even), ("odd", ~even)):
        got = m["pref_by_subject"][subject]
        assert got["n"] == 3
        assert got["accuracy"] == pytest.approx(summed_win[pick].mean())
        assert got["accuracy_norm"] == pytest.approx(per_token_win[pick].mean())
        assert got["agreement"] == 1.0 and got["agreement_norm"] == 1.0  # the reference agrees with itself
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Preference by subject" in md
    acc = m["pref_by_subject"]["even"]
    assert f"| even | {100 * acc['accuracy']:.1f}% / {100 * acc['accuracy_norm']:.1f}% (n=3) |" in md


def test_models_are_loaded_one_at_a_time_and_score_as_all_at_once(
    tiny_teacher, tiny_student, tiny_text, mcq_file, pref_file, adapter_dir, tmp_path, monkeypatch
):
    import gc

    refs, alive_at_load, loaded = [], [], []  # weak references: models are dicts, not hashable
    real_load = models.load_model

    def load_and_track(path, **kw):
        gc.collect()
        alive_at_load.append(sum(r() is not None for r in refs))  # models still alive when the next one loads
        model, tok, config = real_load(path, **kw)
        refs.append(weakref.ref(model))
        loaded.append(Path(path).name)
        return model, tok, config

    monkeypatch.setattr(models, "load_model", load_and_track)
    cands = [
        {"label": "student", "model": tiny_student},
        {"label": "distilled", "model": tiny_student, "adapter": adapter_dir},
        {"label": "student again", "model": tiny_student},
    ]  # the same model as "student": loaded once
    data = {"text": tiny_text["valid"], "mcq": mcq_file, "preference": pref_file, "max_examples": 4}
    _, rep = bench(tmp_path / "out", tiny_teacher, cands, **data)
    assert loaded == ["teacher", "student", "student"] and alive_at_load == [0, 0, 0]
    assert not (tmp_path / "out" / SCRATCH_DIR).exists()
    monkeypatch.undo()

    oracle = all_at_once(tiny_teacher, cands, **data)
    assert set(oracle) == {"reference", "student", "distilled", "student again"}
    for label, expected in oracle.items():
        got = row(rep, label)
        for key in ("top1_agreement", "top5_agreement", "tokens"):  # the reference's argmax is stored exactly
            assert got[key] == expected[key], (label, key)
        for key in ("kl", "js"):  # from the float16 store: within its precision
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (label, key)
        for key in ("ce", "ppl"):  # the model's own logits, summed over the target positions in another order
            assert got[key] == pytest.approx(expected[key], rel=1e-6), (label, key)
        mcq_pref = {k: v for k, v in expected.items() if k.startswith(("mcq_", "pref_"))}
        assert {k: got[k] for k in mcq_pref} == mcq_pref, label
    assert row(rep, "reference")["kl"] == 0.0 and row(rep, "student again") == row(rep, "student")


def test_stored_float16_reference_matches_float32(tiny_teacher, tiny_student, tiny_text, tmp_path):
    from worker.engine.benchmark_passes import batches

    teacher, tok, _ = models.load_model(tiny_teacher)
    student, _, _ = models.load_model(tiny_student)
    examples = data_mod.tokenize(data_mod.load_jsonl(tiny_text["valid"]), tok, 64)
    batch = next(batches(examples, 8, tok.pad_token_id))

    def at_targets(model):
        logits = model(batch.tokens[:, :-1])
        return logits.reshape(-1, logits.shape[-1])[batch.positions]

    def compared(ref, logits):
        sums = metrics.text_sums(ref, logits, batch.targets, mx.ones(batch.targets.shape))
        return metrics.text_metrics({k: float(v.item()) for k, v in sums.items()})

    ref_logits, student_logits = at_targets(teacher), at_targets(student)
    in_memory = metrics.reference_view(ref_logits)
    n = int(batch.positions.size)
    with ReferenceStore(tmp_path / "scratch", n) as store:
        store.append(*in_memory)
        store.seal()
        assert store.path.stat().st_size == n * 512 * 2  # float16, target positions only (no padding, no prompt)
        stored = store.read(0)
    assert not (tmp_path / "scratch").exists()

    exact, from_disk = compared(in_memory, student_logits), compared(stored, student_logits)
    assert exact["kl"] > 0.5
    # float16 storage does change the figure (log p to 11 bits: ~1e-5 relative here), within:
    assert from_disk["kl"] != exact["kl"]
    assert from_disk["kl"] == pytest.approx(exact["kl"], rel=1e-4)
    assert from_disk["js"] == pytest.approx(exact["js"], rel=1e-4)
    for key in ("top1_agreement", "top5_agreement", "ce", "tokens"):
        assert from_disk[key] == exact[key], key
    itself = compared(stored, ref_logits)  # the teacher against its own stored distribution
    assert abs(itself["kl"]) < 2e-6 and abs(itself["js"]) < 2e-6 and itself["top1_agreement"] == 1.0


def test_refuses_when_the_reference_store_would_not_fit(tiny_teacher, tiny_student, tiny_text, tmp_path, monkeypatch):
    tok = models.load_tokenizer(tiny_teacher)
    n = sum(int(e.target_mask[1:].sum()) for e in data_mod.tokenize(data_mod.load_jsonl(tiny_text["valid"]), tok, 64))
    needed = n * 512 * 2  # target tokens × vocabulary × float16
    loads = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(benchmark_store, "free_bytes", lambda folder: needed + benchmark_store.HEADROOM_BYTES - 1)
    message = (
        rf"^data\.text: .*: {n} target tokens × 512 vocabulary entries × 2 bytes \(float16\) = .* but only "
        r".* is free there; lower max_examples or max_seq_len"
    )
    with pytest.raises(UserError, match=message):
        bench(tmp_path / "out", tiny_teacher, [{"label": "s", "model": tiny_student}], text=tiny_text["valid"])
    assert loads == []  # refused in pre-flight, before any weights are read
    assert not (tmp_path / "out" / SCRATCH_DIR).exists() and not (tmp_path / "out" / "report.json").exists()

    # and again when the store opens, with the width of the reference's real logits
    monkeypatch.setattr(benchmark_store, "free_bytes", lambda folder: 0)
    with ReferenceStore(tmp_path / "scratch", 3) as store, pytest.raises(UserError, match="3 target tokens × 7"):
        store.append(mx.zeros((3, 7)), mx.zeros((3,), dtype=mx.int32))


def test_measure_speed_decodes_every_token_and_reports_memory(tiny_student):
    model, tok, _ = models.load_model(tiny_student)
    from mlx_lm.utils import get_total_parameters

    got = metrics.measure_speed(model, tok, prompt_tokens=12, decode_tokens=6, repeats=2)
    assert got["speed_prompt_tokens"] == 12 and got["speed_decode_tokens"] == 6  # end-of-sequence suppressed
    assert got["prefill_tokens_per_second"] > 0 and got["decode_tokens_per_second"] > 0
    assert got["peak_memory_bytes"] >= 4 * get_total_parameters(model)  # float32 weights are part of the peak


# --------------------------------------------------------------------------------------------- end to end


def test_run_benchmark_end_to_end(tiny_teacher, tiny_student, tiny_text, mcq_file, pref_file, adapter_dir, tmp_path):
    curve = tmp_path / "metrics.jsonl"
    curve.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"step": 0, "kind": "eval", "val_kl": 2.0},
                {"step": 1, "kind": "train", "loss": 2.5},
                {"step": 2, "kind": "train", "loss": 2.1},
                {"step": 2, "kind": "eval", "val_kl": 1.5},
            ]
        )
    )
    cands = [
        {"label": "student", "model": tiny_student},
        {"label": "distilled", "model": tiny_student, "adapter": adapter_dir, "metrics": curve},
    ]
    events, progress = [], []
    hooks = Hooks(on_event=lambda k, msg, d: events.append(k))
    out = tmp_path / "out"
    summary, rep = bench(
        out,
        tiny_teacher,
        cands,
        hooks,
        progress.append,
        text=tiny_text["valid"],
        mcq=mcq_file,
        preference=pref_file,
        max_examples=4,
        speed={"prompt_tokens": 8, "decode_tokens": 4, "repeats": 1},
    )

    assert rep["reference"] == "reference" and rep["kl_method"] == "full"
    assert [c["label"] for c in rep["candidates"]] == ["reference", "student", "distilled"]
    assert [c["is_reference"] for c in rep["candidates"]] == [True, False, False]
    assert rep["candidates"][2]["adapter"] == str(adapter_dir)
    assert rep["settings"]["max_examples"] == 4 and rep["settings"]["speed"]["decode_tokens"] == 4
    assert rep["data"]["text"]["records"] == 4 and rep["data"]["mcq"]["format"] == "mcq"
    ref, student, distilled = (row(rep, k) for k in ("reference", "student", "distilled"))
    assert ref["kl"] == 0.0 and ref["js"] == 0.0 and ref["top1_agreement"] == 1.0 and ref["top5_agreement"] == 1.0
    assert ref["mcq_accuracy"] == 1.0 and ref["pref_accuracy"] == 1.0 and ref["pref_agreement"] == 1.0
    assert student["kl"] > 0.1 and student["ppl"] > ref["ppl"] and student["top1_agreement"] < 1.0
    assert student["tokens"] == ref["tokens"] > 0
    for key in (
        "kl",
        "ppl",
        "top1_agreement",
        "prefill_tokens_per_second",
        "decode_tokens_per_second",
        "peak_memory_bytes",
        "mcq_accuracy",
        "pref_accuracy",
        "size_bytes",
        "compression_ratio_params",
    ):
        assert key in student and key in distilled and key in ref, key

    # the adapter is applied: same base, different numbers
    assert distilled["kl"] != pytest.approx(student["kl"], rel=1e-3)
    assert distilled["ce"] != pytest.approx(student["ce"], rel=1e-3)
    assert distilled["parameters"] == student["parameters"] and distilled["adapter_parameters"] > 0
    adapter_weights = mx.load(str(adapter_dir / "adapters.safetensors"))
    assert distilled["adapter_parameters"] == sum(v.size for v in adapter_weights.values())
    assert distilled["size_bytes"] == student["size_bytes"] + distilled["adapter_size_bytes"]
    assert student["adapter_parameters"] == 0 and ref["compression_ratio_params"] == 1.0
    assert student["compression_ratio_params"] == pytest.approx(ref["parameters"] / student["parameters"])
    assert distilled["compression_ratio_params"] < student["compression_ratio_params"]
    assert student["compression_ratio_size"] == pytest.approx(ref["size_bytes"] / student["size_bytes"])
    assert student["speed_decode_tokens"] == 4 and student["peak_memory_bytes"] > 0

    assert set(summary) == {"reference", "metrics"} and set(summary["metrics"]) == {"reference", "student", "distilled"}
    assert summary["metrics"]["student"]["kl"] == student["kl"]

    md = (out / "report.md").read_text()
    assert md.count("| distilled |") == 2  # the comparison table and the preference table
    assert "## Preference" in md and "pref acc (summed)" in md and "pref acc (per token)" in md
    assert set(rep["charts"]) == {"quality.png", "tasks.png", "speed.png", "size.png", "training.png"}
    for name in rep["charts"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # progress counts every model's batches and speed runs, reported after each: 0, 1, ..., total
    text_batches = math.ceil(rep["data"]["text"]["sequences"] / 4)
    # 4 x 4 choices, 4 x 2 responses; the speed test's warm-up and its one repeat
    per_model = {"text": text_batches, "mcq": 4, "preference": 2, "speed": 2}
    total = 3 * sum(per_model.values())
    assert [p["step"] for p in progress] == list(range(total + 1))
    assert {p["total_steps"] for p in progress} == {total} and progress[0]["phase"] == "preflight"
    for phase, n in per_model.items():
        assert sum(p["phase"] == phase for p in progress) == 3 * n, phase
    labels = [p["label"] for p in progress[1:]]  # one model after the other, the reference first
    assert labels == ["reference"] * (total // 3) + ["student"] * (total // 3) + ["distilled"] * (total // 3)
    assert events[0] == "preflight" and events[-1] == "done" and "phase" in events
    assert not (out / SCRATCH_DIR).exists()


def test_cancellation(tiny_teacher, tiny_student, tiny_text, tmp_path):
    calls = []
    hooks = Hooks(should_stop=lambda: calls.append(1) or len(calls) > 1)
    with pytest.raises(Cancelled, match="text"):
        bench(tmp_path, tiny_teacher, [{"label": "s", "model": tiny_student}], hooks, text=tiny_text["valid"])
    assert not (tmp_path / "report.json").exists()
    assert not (tmp_path / SCRATCH_DIR).exists()  # the reference's first batch was stored, then removed


# ------------------------------------------------------------------------------------------------- errors


def test_dataset_in_the_wrong_slot(tiny_teacher, tiny_student, tiny_text, mcq_file, tmp_path):
    cands = [{"label": "s", "model": tiny_student}]
    with pytest.raises(UserError, match=r"^data\.mcq: valid\.jsonl is 'text' data, expected mcq$"):
        bench(tmp_path, tiny_teacher, cands, mcq=tiny_text["valid"])
    with pytest.raises(UserError, match=r"^data\.text: mcq\.jsonl is 'mcq' data, expected text, completions or chat"):
        bench(tmp_path, tiny_teacher, cands, text=mcq_file)
    with pytest.raises(UserError, match=r"^data\.preference: mcq\.jsonl is 'mcq' data, expected preference"):
        bench(tmp_path, tiny_teacher, cands, preference=mcq_file)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(UserError, match=r"^data\.mcq: bad\.jsonl:1: field 'choices' needs at least 2"):
        bench(tmp_path, tiny_teacher, cands, mcq=bad)


def test_tokenizer_mismatch_names_the_candidate(tiny_teacher, tiny_student, tiny_text, tmp_path):
    tiny.build_tokenizer(tmp_path / "tok", vocab_size=300)
    other = tiny.build_model(tmp_path / "other", tmp_path / "tok", hidden=32, layers=1)
    cands = [{"label": "s", "model": tiny_student}, {"label": "other", "model": other}]
    with pytest.raises(
        UserError,
        match=r"^candidates\.1\.model: reference .* and candidate 'other' .* are not "
        r"tokenizer-compatible: vocabulary sizes differ",
    ):
        bench(tmp_path / "out", tiny_teacher, cands, text=tiny_text["valid"])


def test_adapter_that_does_not_fit(tiny_teacher, tiny_student, tiny_text, adapter_dir, tmp_path):
    cands = [{"label": "s", "model": tiny_student}, {"label": "wrong", "model": tiny_teacher, "adapter": adapter_dir}]
    with pytest.raises(UserError, match=r"(?s)^candidates\.1\.adapter: .* does not fit model .*shape.*and \d+ more$"):
        bench(tmp_path, tiny_teacher, cands, text=tiny_text["valid"])
    cands = [{"label": "s", "model": tiny_student, "adapter": tmp_path}]
    with pytest.raises(UserError, match=r"^candidates\.0\.adapter: .* is not an adapter folder"):
        bench(tmp_path, tiny_teacher, cands, text=tiny_text["valid"])


def test_reference_label_is_reserved(tiny_teacher, tiny_student, tiny_text, tmp_path):
    with pytest.raises(UserError, match=r"^candidates\.0\.label: 'reference' names the reference model's row"):
        bench(tmp_path, tiny_teacher, [{"label": "reference", "model": tiny_student}], text=tiny_text["valid"])


def test_spec_settings():
    spec = BenchmarkSpec.model_validate(
        {"reference": "t", "candidates": [{"label": "a", "model": "s"}], "data": {"text": "d"}}
    )
    assert (spec.max_seq_len, spec.batch_size, spec.max_examples) == (512, 4, None)
    assert spec.speed.model_dump() == {"enabled": True, "prompt_tokens": 128, "decode_tokens": 64, "repeats": 1}
    with pytest.raises(ValueError, match="duplicate candidate label 'a'"):
        BenchmarkSpec.model_validate(
            {"reference": "t", "candidates": [{"label": "a", "model": "s"}] * 2, "data": {"text": "d"}}
        )
    with pytest.raises(ValueError, match="extra"):
        BenchmarkSpec.model_validate(
            {
                "reference": "t",
                "candidates": [{"label": "a", "model": "s"}],
                "data": {"text": "d"},
                "speed": {"decode": 3},
            }
        )


def test_reverse_kl_on_each_candidates_own_samples(tiny_teacher, tiny_student, tmp_path):
    """The samples phase: the reference's own is 0 by definition, a slightly perturbed teacher scores a little,
    an untrained student far more; each value is training's val_reverse_kl (the same function, same key)."""
    from distillery_contract.specs import OnPolicySpec
    from worker.engine.batches import OnlineTeacher
    from worker.engine.on_policy import reverse_kl_on_samples

    prompts = tiny.write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": " ".join(r["text"].split()[:6])} for r in tiny.text_records(6)]
    )
    nudged = make_adapter(tiny_teacher, tmp_path / "nudged", seed=3)
    candidates = [
        {"label": "itself", "model": tiny_teacher},
        {"label": "nudged", "model": tiny_teacher, "adapter": nudged},
        {"label": "student", "model": tiny_student},
    ]
    progress = []
    summary, rep = bench(
        tmp_path / "out",
        tiny_teacher,
        candidates,
        on_progress=progress.append,
        prompts=prompts,
        samples={"max_new_tokens": 8, "temperature": 1.0},
    )
    got = {r["label"]: r["metrics"] for r in rep["candidates"]}
    assert got["itself"]["sample_reverse_kl"] == 0.0
    assert 0 < got["nudged"]["sample_reverse_kl"] < got["student"]["sample_reverse_kl"]
    assert got["student"]["sample_tokens"] > 0
    assert summary["metrics"]["student"]["sample_reverse_kl"] == got["student"]["sample_reverse_kl"]
    assert [p["phase"] for p in progress].count("samples") == 2 and progress[-1]["step"] == progress[-1]["total_steps"]
    assert "reverse KL on samples" in (tmp_path / "out" / "report.md").read_text()
    # the oracle: training's own evaluation of the student on those prompts
    teacher, tok, _ = models.load_model(tiny_teacher)
    student, _, _ = models.load_model(tiny_student)
    from worker.engine import data as data_mod
    from worker.engine.on_policy import prompt_of

    examples = data_mod.tokenize(data_mod.load_jsonl(prompts), tok, 64)
    want, _ = reverse_kl_on_samples(
        student,
        tok,
        [OnlineTeacher(teacher)],
        np.ones(1),
        [prompt_of(e) for e in examples],
        OnPolicySpec(max_new_tokens=8, temperature=1.0),
        64,
        4,
        tok.pad_token_id or 0,
    )
    assert got["student"]["sample_reverse_kl"] == pytest.approx(want["val_reverse_kl"], rel=1e-5)
