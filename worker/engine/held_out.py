"""A model's held-out scores on one text dataset against several teachers run online: the forward KL over the
full vocabulary to each teacher, and the model's own perplexity. What a comparison of teacher weightings
reads per domain (the `compare` job's `domains`, bench/multi_teacher.py).
"""

from __future__ import annotations

from pathlib import Path

from . import data as data_mod
from . import evaluate, models
from . import student as student_mod
from .batches import OnlineTeacher, Split
from .weighting import Weighting


def load_for_eval(model_dir: Path, adapter: Path | None = None):
    """(model, tokenizer) in inference mode, float32 on the CPU, the adapter applied."""
    model, tokenizer, _ = models.load_model(model_dir)
    if adapter is not None:
        student_mod.load_adapter(model, adapter, f"the adapter in {adapter}")
    model.eval()
    models.dequantized_compute(model)
    return model, tokenizer


def scores(model, tokenizer, teachers: list, data: Path, max_seq_len: int, batch_size: int = 4) -> dict:
    """{"kl": [to each teacher], "ppl", "tokens"} of `model` over `data` (text, completions or chat)."""
    examples = data_mod.tokenize(data_mod.load_jsonl(data), tokenizer, max_seq_len)
    split = Split(examples, [OnlineTeacher(t) for t in teachers])
    batches = data_mod.eval_batches(split.lengths, batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    m = evaluate.evaluate(model, split, Weighting([1.0] * max(len(teachers), 1)), pad, batches)
    kl = m.get("val_kl_teachers") or ([m["val_kl"]] if teachers else [])
    return {"kl": kl, "ppl": m["val_ppl"], "tokens": m["val_tokens"]}
