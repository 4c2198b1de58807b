"""The benchmark engine: metric functions against hand-computed numbers, MCQ and preference sets whose right
answers are known to the model, an end-to-end run on tiny models, and the errors a user can fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tests.helpers import tiny
from worker.engine import benchmark as bm
from worker.engine import data as data_mod
from worker.engine import models
from worker.engine.errors import Cancelled, UserError
from worker.engine.spec import BenchmarkSpec
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
    words = np.array([t.startswith("Ġ") and t[1:].isalpha() for t, _ in vocab])  # byte-level BPE: Ġ is a space
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
    return [{"prompt": q, "chosen": greedy_continuation(model, tok, q), "rejected": random_text(tok, rng)}
            for q in questions(n)]


def make_adapter(base: Path, out: Path, seed: int = 0, num_layers: int = 2) -> Path:
    """A LoRA adapter in mlx-lm's format with non-zero B matrices (a fresh LoRA is the identity)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _, _ = models.load_model(base)
    model.freeze()
    params = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    linear_to_lora_layers(model, num_layers, params)
    mx.random.seed(seed)
    weights = {k: (0.05 * mx.random.normal(v.shape) if k.endswith("lora_b") else v)
               for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}))
    return out


def spec_of(reference: Path, candidates: list[dict], **kw) -> BenchmarkSpec:
    data = {k: str(kw.pop(k)) for k in ("text", "mcq", "preference") if kw.get(k) is not None}
    for k in ("text", "mcq", "preference"):
        kw.pop(k, None)
    doc = {"reference": str(reference), "candidates": [{k: str(v) for k, v in c.items() if k != "metrics"}
                                                       for c in candidates],
           "data": data, "max_seq_len": 64, "batch_size": 4, "speed": NO_SPEED, **kw}
    return BenchmarkSpec.model_validate(doc)


def bench(out: Path, reference: Path, candidates: list[dict], hooks: Hooks | None = None, on_progress=None,
          **kw) -> tuple[dict, dict]:
    """Run a benchmark of paths; returns (summary, report.json as dict)."""
    spec = spec_of(reference, candidates, **kw)
    inputs = bm.BenchmarkInputs(
        reference=reference,
        candidates=[bm.CandidateInput(c["label"], Path(c["model"]), Path(c["adapter"]) if c.get("adapter") else None,
                                      c.get("metrics")) for c in candidates],
        text=kw.get("text"), mcq=kw.get("mcq"), preference=kw.get("preference"))
    summary = bm.run_benchmark(spec, inputs, out, hooks, on_progress)
    return summary, json.loads((out / "report.json").read_text())


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
    ref = np.array([[[2.0, 1.0, 0.0, -1.0, 0.5, 0.0],
                     [0.0, 3.0, 1.0, 0.0, 0.0, 0.0],
                     [1.0, 1.0, 4.0, 0.0, 0.0, 0.0]]], dtype=np.float32)
    cand = np.array([[[1.0, 2.0, 0.0, 0.0, 0.0, 0.0],    # argmax 1 vs the reference's 0; 0 ranks 2nd: top-5
                      [0.0, 2.5, 1.5, 0.0, 0.0, 0.0],    # argmax 1 = the reference's: top-1
                      [3.0, 3.0, -5.0, 3.0, 3.0, 3.0]]],  # the reference's argmax 2 is the lowest: not top-5
                    dtype=np.float32)
    targets = np.array([[0, 2, 5]], dtype=np.int32)
    mask = np.array([[True, True, False]])  # the last position is not a target

    sums = bm.text_sums(bm.reference_view(mx.array(ref)), mx.array(cand), mx.array(targets), mx.array(mask))
    got = bm.text_metrics({k: float(v.item()) for k, v in sums.items()})

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
    sums = bm.text_sums(bm.reference_view(mx.array(ref)), mx.array(cand), mx.array(targets), mx.ones((1, 3)))
    got = bm.text_metrics({k: float(v.item()) for k, v in sums.items()})
    assert got["top1_agreement"] == pytest.approx(1 / 3) and got["top5_agreement"] == pytest.approx(2 / 3)


def test_reference_against_itself_is_exact():
    logits = mx.array(np.random.default_rng(0).normal(size=(2, 7, 50)).astype(np.float32) * 4)
    targets = mx.array(np.random.default_rng(1).integers(0, 50, (2, 7)), dtype=mx.int32)
    sums = bm.text_sums(bm.reference_view(logits), logits, targets, mx.ones((2, 7)))
    got = bm.text_metrics({k: float(v.item()) for k, v in sums.items()})
    assert got["kl"] == 0.0 and got["js"] == 0.0
    assert got["top1_agreement"] == 1.0 and got["top5_agreement"] == 1.0


def test_mcq_and_pref_metric_functions():
    got = bm.mcq_metrics(scores=[[-1.0, -5.0], [-6.0, -4.0, -9.0], [-3.0, -2.0]],
                         n_tokens=[[1, 10], [6, 2, 9], [1, 4]], answers=[0, 0, 1], subjects=["a", "a", "b"])
    # summed: argmax 0, 1, 1 -> right, wrong, right
    # per token: (-1, -0.5) -> 1 wrong; (-1, -2, -1) -> 0 right; (-3, -0.5) -> 1 right
    assert got["mcq_accuracy"] == pytest.approx(2 / 3) and got["mcq_accuracy_norm"] == pytest.approx(2 / 3)
    assert got["mcq_by_subject"] == {"a": {"accuracy": 0.5, "n": 2}, "b": {"accuracy": 1.0, "n": 1}}
    assert got["mcq_n"] == 3
    assert "mcq_by_subject" not in bm.mcq_metrics([[0.0, -1.0]], [[1, 1]], [0], [None])

    c, r = np.array([-1.0, -5.0, -2.0, -3.0]), np.array([-2.0, -4.0, -2.0, -9.0])
    rc, rr = np.array([-1.0, -1.0, -1.0, -1.0]), np.array([-3.0, -3.0, -3.0, -0.5])
    got = bm.pref_metrics(c, r, rc, rr)
    assert got == {"pref_accuracy": 0.5, "pref_agreement": 0.25, "pref_n": 4}  # a tie is not a win
    assert bm.pref_metrics(c, r, c, r)["pref_agreement"] == 1.0


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

    mixed = [{**(r if i % 2 == 0 else s), "subject": "right" if i % 2 == 0 else "shifted"}
             for i, (r, s) in enumerate(zip(records, shifted))]
    _, rep = bench(tmp_path / "mixed", tiny_teacher, cands, mcq=tiny.write_jsonl(tmp_path / "mixed.jsonl", mixed))
    m = row(rep, "teacher")
    assert m["mcq_accuracy"] == 0.5
    assert m["mcq_by_subject"] == {"right": {"accuracy": 1.0, "n": 3}, "shifted": {"accuracy": 0.0, "n": 3}}
    assert "Multiple choice by subject" in (tmp_path / "mixed" / "report.md").read_text()


def test_preference_known_order(tiny_teacher, tiny_student, pref_file, tmp_path):
    cands = [{"label": "student", "model": tiny_student}]
    _, rep = bench(tmp_path / "right", tiny_teacher, cands, preference=pref_file)
    ref = row(rep, "reference")
    assert ref["pref_accuracy"] == 1.0 and ref["pref_agreement"] == 1.0 and ref["pref_n"] == 5
    student = row(rep, "student")
    # agreement is the share of pairs ordered as the reference orders them, here: as chosen > rejected
    assert student["pref_agreement"] == student["pref_accuracy"]

    records = [json.loads(x) for x in pref_file.read_text().splitlines()]
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in records]
    _, rep = bench(tmp_path / "swapped", tiny_teacher, cands,
                   preference=tiny.write_jsonl(tmp_path / "swapped.jsonl", swapped))
    assert row(rep, "reference")["pref_accuracy"] == 0.0 and row(rep, "reference")["pref_agreement"] == 1.0
    assert row(rep, "student")["pref_accuracy"] == pytest.approx(1.0 - student["pref_accuracy"])


def test_measure_speed_decodes_every_token_and_reports_memory(tiny_student):
    model, tok, _ = models.load_model(tiny_student)
    from mlx_lm.utils import get_total_parameters

    got = bm.measure_speed(model, tok, prompt_tokens=12, decode_tokens=6, repeats=2)
    assert got["speed_prompt_tokens"] == 12 and got["speed_decode_tokens"] == 6  # end-of-sequence suppressed
    assert got["prefill_tokens_per_second"] > 0 and got["decode_tokens_per_second"] > 0
    assert got["peak_memory_bytes"] >= 4 * get_total_parameters(model)  # float32 weights are part of the peak


# --------------------------------------------------------------------------------------------- end to end


def test_run_benchmark_end_to_end(tiny_teacher, tiny_student, tiny_text, mcq_file, pref_file, adapter_dir, tmp_path):
    curve = tmp_path / "metrics.jsonl"
    curve.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "kind": "eval", "val_kl": 2.0}, {"step": 1, "kind": "train", "loss": 2.5},
        {"step": 2, "kind": "train", "loss": 2.1}, {"step": 2, "kind": "eval", "val_kl": 1.5}]))
    cands = [{"label": "student", "model": tiny_student},
             {"label": "distilled", "model": tiny_student, "adapter": adapter_dir, "metrics": curve}]
    events, progress = [], []
    hooks = Hooks(on_event=lambda k, msg, d: events.append(k))
    out = tmp_path / "out"
    summary, rep = bench(out, tiny_teacher, cands, hooks, progress.append, text=tiny_text["valid"], mcq=mcq_file,
                         preference=pref_file, max_examples=4,
                         speed={"prompt_tokens": 8, "decode_tokens": 4, "repeats": 1})

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
    for key in ("kl", "ppl", "top1_agreement", "prefill_tokens_per_second", "decode_tokens_per_second",
                "peak_memory_bytes", "mcq_accuracy", "pref_accuracy", "size_bytes", "compression_ratio_params"):
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

    assert (out / "report.md").read_text().count("| distilled |") == 1
    assert set(rep["charts"]) == {"quality.png", "tasks.png", "speed.png", "size.png", "training.png"}
    for name in rep["charts"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert [p["step"] for p in progress] == list(range(1, progress[-1]["total_steps"] + 1))
    assert {p["phase"] for p in progress} == {"text", "mcq", "preference", "speed"}
    assert sum(p["phase"] == "speed" for p in progress) == 3
    assert events[0] == "preflight" and events[-1] == "done" and "phase" in events


def test_cancellation(tiny_teacher, tiny_student, tiny_text, tmp_path):
    calls = []
    hooks = Hooks(should_stop=lambda: calls.append(1) or len(calls) > 1)
    with pytest.raises(Cancelled, match="text"):
        bench(tmp_path, tiny_teacher, [{"label": "s", "model": tiny_student}], hooks, text=tiny_text["valid"])
    assert not (tmp_path / "report.json").exists()


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
    with pytest.raises(UserError, match=r"^candidates\.1\.model: reference .* and candidate 'other' .* are not "
                                        r"tokenizer-compatible: vocabulary sizes differ"):
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
    spec = BenchmarkSpec.model_validate({"reference": "t", "candidates": [{"label": "a", "model": "s"}],
                                         "data": {"text": "d"}})
    assert (spec.max_seq_len, spec.batch_size, spec.max_examples) == (512, 4, None)
    assert spec.speed.model_dump() == {"enabled": True, "prompt_tokens": 128, "decode_tokens": 64, "repeats": 1}
    with pytest.raises(ValueError, match="duplicate candidate label 'a'"):
        BenchmarkSpec.model_validate({"reference": "t", "candidates": [{"label": "a", "model": "s"}] * 2,
                                      "data": {"text": "d"}})
    with pytest.raises(ValueError, match="extra"):
        BenchmarkSpec.model_validate({"reference": "t", "candidates": [{"label": "a", "model": "s"}],
                                      "data": {"text": "d"}, "speed": {"decode": 3}})
