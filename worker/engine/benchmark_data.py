"""The benchmark's data: each dataset slot loaded and checked, and tokenized into the examples of its phase.

`text` data (text, completions or chat) is tokenized as training tokenizes it (data.py's `tokenize`), so the
text phase scores the positions training uses as targets; each mcq choice becomes `MCQ_PROMPT` + " " + choice,
each preference pair two examples (prompt + chosen, prompt + rejected), scored over the continuation. Part of
the pre-flight: no weights are loaded. Used by benchmark.py.
"""

from __future__ import annotations

from dataclasses import replace

from distillery_contract.specs import BenchmarkSpec

from . import data as data_mod
from . import preflight
from .benchmark_inputs import BenchmarkInputs
from .benchmark_metrics import continuation_examples
from .errors import UserError

MCQ_PROMPT = "Question: {question}\nAnswer:"
"""Multiple-choice prompt; each choice is scored as the continuation " " + choice. Deliberately plain text even
when the tokenizer has a chat template: one fixed format for every model, base or instruction-tuned."""

TEXT_FORMATS = data_mod.TRAINABLE_FORMATS


def load_data(spec: BenchmarkSpec, inputs: BenchmarkInputs, tokenizer) -> dict[str, data_mod.Dataset]:
    """Each dataset slot, validated, in its expected format, cut to `max_examples` records."""
    expected = {
        "text": TEXT_FORMATS,
        "mcq": ("mcq",),
        "preference": ("preference",),
        "prompts": ("prompts", "completions", "chat"),
    }
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
            if slot in ("text", "prompts"):
                preflight.check_chat_template(ds.format, tokenizer, "the reference", path)
        except UserError as e:
            raise UserError(f"data.{slot}: {e}") from None
        if spec.max_examples is not None:
            ds = replace(ds, records=ds.records[: spec.max_examples], lines=ds.lines[: spec.max_examples])
        out[slot] = ds
    return out


def text_examples(datasets: dict, tokenizer, spec: BenchmarkSpec) -> list[data_mod.Example]:
    if "text" not in datasets:
        return []
    try:
        return data_mod.tokenize(datasets["text"], tokenizer, spec.max_seq_len)
    except UserError as e:
        raise UserError(f"data.text: {e}") from None


def mcq_examples(datasets: dict, tokenizer, spec: BenchmarkSpec) -> list[data_mod.Example]:
    if "mcq" not in datasets:
        return []
    pairs = [
        (MCQ_PROMPT.format(question=r["question"]), " " + choice)
        for r in datasets["mcq"].records
        for choice in r["choices"]
    ]
    return continuation_examples(tokenizer, pairs, spec.max_seq_len)


def pref_examples(datasets: dict, tokenizer, spec: BenchmarkSpec) -> list[data_mod.Example]:
    """Two examples per pair, chosen then rejected."""
    if "preference" not in datasets:
        return []
    pairs = [(r["prompt"], r[k]) for r in datasets["preference"].records for k in ("chosen", "rejected")]
    return continuation_examples(tokenizer, pairs, spec.max_seq_len)


def prompt_tokens(datasets: dict, tokenizer, spec: BenchmarkSpec) -> list:
    """The prompts the candidates complete (the samples phase): each record's tokens before its first reply,
    the first `samples.max_prompts` that have any."""
    if "prompts" not in datasets:
        return []
    from .on_policy import prompt_of

    try:
        examples = data_mod.tokenize(datasets["prompts"], tokenizer, spec.max_seq_len)
    except UserError as e:
        raise UserError(f"data.prompts: {e}") from None
    prompts = [p for p in (prompt_of(e) for e in examples) if len(p)][: spec.samples.max_prompts]
    if not prompts:
        raise UserError("data.prompts: no record has a prompt (text before the first reply) to complete")
    return prompts
