"""worker.engine.data: validation messages, target masks, windows, splits and batching, on a real tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import tiny
from worker.engine import data
from worker.engine.data import Example
from worker.engine.errors import UserError

EOT = "<|im_end|>"  # the tiny tokenizer's eos and ChatML end-of-turn


# ------------------------------------------------------------------------------------------- helpers


def write(tmp_path: Path, lines: list, name: str = "train.jsonl") -> Path:
    """Write records (dicts are JSON-encoded, strings written verbatim) one per line."""
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def load_error(path: Path, fmt: str | None = None, **kw) -> str:
    with pytest.raises(UserError) as e:
        data.load_jsonl(path, fmt, **kw)
    return str(e.value)


def targets(tok, ex: Example) -> str:
    return tok.decode([int(t) for t, m in zip(ex.tokens, ex.target_mask) if m])


def non_targets(tok, ex: Example) -> str:
    return tok.decode([int(t) for t, m in zip(ex.tokens, ex.target_mask) if not m])


@pytest.fixture(scope="session", params=["mlx_wrapper", "transformers"])
def tok(request, tiny_tokenizer):
    """The tiny ChatML tokenizer, both as mlx-lm's TokenizerWrapper and as a plain transformers tokenizer."""
    if request.param == "mlx_wrapper":
        from mlx_lm.tokenizer_utils import load

        return load(Path(tiny_tokenizer))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


@pytest.fixture(scope="session")
def no_template_tok(tmp_path_factory):
    from mlx_lm.tokenizer_utils import load

    out = tmp_path_factory.mktemp("plain") / "tokenizer"
    tiny.build_tokenizer(out, chat_template=None)
    return load(out)


def ds_of(tmp_path: Path, records: list[dict], fmt: str | None = None) -> data.Dataset:
    return data.load_jsonl(write(tmp_path, records), fmt)


# ------------------------------------------------------------------------------------------- formats

RECORDS = {
    "text": {"text": "Hello world."},
    "completions": {"prompt": "Q: 2+2?", "completion": " 4"},
    "chat": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    "preference": {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away.", "subject": "greetings"},
    "mcq": {"question": "2+2?", "choices": ["3", "4"], "answer": 1, "subject": "math"},
    "prompts": {"prompt": "Write a line about the sea."},
}


@pytest.mark.parametrize("fmt", data.FORMATS)
def test_detect_and_load_each_format(tmp_path, fmt):
    record = RECORDS[fmt]
    assert data.detect_format(record) == fmt
    path = write(tmp_path, [record, record])
    ds = data.load_jsonl(path)
    assert ds.format == fmt
    assert ds.records == [record, record]
    assert ds.lines == [1, 2]
    assert ds.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert data.load_jsonl(path, fmt).format == fmt  # stated agrees with detected


def test_detect_format_unknown():
    assert data.detect_format({"foo": 1}) is None
    assert data.detect_format({}) is None


def test_needs_chat_template():
    assert [f for f in data.FORMATS if data.needs_chat_template(f)] == ["chat"]


def test_module_does_not_import_mlx():
    """The API process validates uploads with this module and must never import MLX."""
    import subprocess
    import sys

    code = "import sys, worker.engine.data; assert not any(m.startswith('mlx') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_loads_fixture_dataset(tiny_text):
    ds = data.load_jsonl(tiny_text["train"])
    assert ds.format == "text" and len(ds.records) == 48


# -------------------------------------------------------------------------------------------- errors

C = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}

ERROR_CASES = [
    # (lines, stated format, line of the error, expected text)
    ([{"text": "a"}, '{"text": "b" "c"}'], None, 2, "invalid JSON (Expecting ',' delimiter at column 14)"),
    ([RECORDS["completions"], {"prompt": "p", "completion": 3}], None, 2, "field 'completion' must be a string"),
    (
        [{"prompt": "p"}],
        "completions",
        1,
        "record has fields {'prompt'} but format 'completions' needs {'prompt', 'completion'}",
    ),
    (  # a completion left out of a completions file is missing, not a prompts record
        [RECORDS["completions"], {"prompt": "p"}],
        None,
        2,
        "record has fields {'prompt'} but format 'completions' needs {'prompt', 'completion'}",
    ),
    ([{"prompt": "p"}, {"prompt": "  "}], None, 2, "field 'prompt' is empty"),
    ([{"prompt": []}], "prompts", 1, "field 'prompt' must be a non-empty string or a non-empty list of messages"),
    ([{"prompt": [{"role": "user"}]}], None, 1, "prompt[0]: missing {'content'}"),
    ([{"prompt": "p"}, RECORDS["completions"]], None, 2, "looks like 'completions' but the file is 'prompts'"),
    ([{"text": "a", "meta": 1, "id": 2}], None, 1, "unknown fields {'id', 'meta'} for format 'text'"),
    (
        [{"text": "a"}, {"text": "b"}, RECORDS["chat"]],
        None,
        3,
        "looks like 'chat' but the file is 'text' (from line 1)",
    ),
    ([RECORDS["chat"]], "text", 1, "looks like 'chat' but the file is 'text' (as stated)"),
    ([{"text": "a"}, {"text": ""}], None, 2, "field 'text' is empty"),
    ([{"text": "   \n"}], None, 1, "field 'text' is empty"),
    (
        [{"messages": [{"role": "bot", "content": "x"}, A]}],
        None,
        1,
        "messages[0]: role 'bot' is not one of system, user, assistant, tool",
    ),
    ([{"messages": [C, {"role": "user", "content": "again"}]}], None, 1, "no assistant message"),
    ([{"messages": [C, {"role": "assistant"}]}], None, 1, "messages[1]: missing {'content'}"),
    ([{"messages": []}], None, 1, "field 'messages' must be a non-empty list"),
    (
        [RECORDS["mcq"], {"question": "q", "choices": ["a", "b", "c"], "answer": 3}],
        None,
        2,
        "field 'answer' is 3, out of range for 3 choices",
    ),
    ([{"question": "q", "choices": ["a", "b"], "answer": -1}], None, 1, "out of range"),
    ([{"question": "q", "choices": ["only"], "answer": 0}], None, 1, "at least 2 choices, got 1"),
    ([{"question": "q", "choices": ["a", "b"], "answer": True}], None, 1, "must be an integer index"),
    ([{"prompt": "p", "chosen": "same", "rejected": "same"}], None, 1, "'chosen' and 'rejected' are identical"),
    (
        [{"prompt": "p", "chosen": "a", "rejected": "b", "subject": 3}],
        None,
        1,
        "field 'subject' must be a string, got a number",
    ),
    (
        [{"question": "q", "choices": ["a", "b"], "answer": 0, "subject": ["x"]}],
        None,
        1,
        "field 'subject' must be a string, got a list",
    ),
    (
        [{"prompt": "p", "chosen": "a", "rejected": "b", "topic": "x"}],
        None,
        1,
        "unknown field {'topic'} for format 'preference' (allowed: {'prompt', 'chosen', 'rejected', 'subject'})",
    ),
    ([{"foo": 1}], None, 1, "record has fields {'foo'}, which match no format"),
    (["[1, 2]"], None, 1, "expected a JSON object, got a list"),
]


@pytest.mark.parametrize("lines, fmt, line, expected", ERROR_CASES)
def test_validation_errors_name_file_and_line(tmp_path, lines, fmt, line, expected):
    message = load_error(write(tmp_path, lines), fmt)
    assert message.startswith(f"train.jsonl:{line}: ")
    assert expected in message


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    message = load_error(path)
    assert message.startswith("bad.jsonl:2: not valid UTF-8 (byte 0xe9")


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    assert load_error(tmp_path / "e.jsonl") == "e.jsonl: file is empty (no records)"
    assert "file is empty" in load_error(tmp_path / "blank.jsonl")


def test_file_larger_than_max_bytes(tmp_path):
    path = write(tmp_path, [{"text": "x" * 100}])
    assert "larger than the limit of 50 bytes" in load_error(path, max_bytes=50)
    assert data.load_jsonl(path, max_bytes=1000).records  # under the limit


def test_unknown_stated_format(tmp_path):
    assert "unknown dataset format 'tabular'" in load_error(write(tmp_path, [{"text": "a"}]), "tabular")


def test_many_errors_reported_together_with_summary(tmp_path):
    lines = [{"text": "ok"}] + [{"text": i} for i in range(15)]
    message = load_error(write(tmp_path, lines))
    first, *rest = message.splitlines()
    assert first == "train.jsonl: 15 invalid lines, showing the first 10:"
    assert len(rest) == 10
    assert rest[0].startswith("train.jsonl:2: field 'text' must be a string")
    assert rest[-1].startswith("train.jsonl:11: ")


def test_a_few_errors_all_shown(tmp_path):
    message = load_error(write(tmp_path, [{"text": ""}, "{oops", {"text": "fine"}, {"text": 1}]))
    assert message.splitlines() == [
        "train.jsonl: 3 invalid lines:",
        "train.jsonl:1: field 'text' is empty",
        "train.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        "train.jsonl:4: field 'text' must be a string, got a number",
    ]


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    path = write(tmp_path, ["", {"text": "a"}, "   ", "", {"text": "b"}, "\t"])
    ds = data.load_jsonl(path)
    assert [r["text"] for r in ds.records] == ["a", "b"]
    assert ds.lines == [2, 5]
    bad = write(tmp_path, [{"text": "a"}, "", "", {"text": 7}], name="bad.jsonl")
    assert load_error(bad).startswith("bad.jsonl:4: ")


def test_crlf_and_byte_order_mark(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    ds = data.load_jsonl(path)
    assert [r["text"] for r in ds.records] == ["a", "b"] and ds.lines == [1, 3]


# ---------------------------------------------------------------------------------------- tokenizing


def test_completions_mask_is_the_completion_and_eos(tmp_path, tok):
    records = [
        {"prompt": "Question: what is a list?\nAnswer:", "completion": " A mutable sequence of items."},
        {"prompt": "def f(x):", "completion": "\n    return x + 1"},
    ]
    examples = data.tokenize(ds_of(tmp_path, records), tok, max_seq_len=256)
    assert [e.source for e in examples] == [0, 1]
    for ex, r in zip(examples, records):
        assert ex.tokens.dtype == np.int32 and ex.target_mask.dtype == bool
        assert not ex.target_mask[0]
        assert targets(tok, ex) == r["completion"] + EOT
        assert non_targets(tok, ex) == r["prompt"]
        n_prompt = len(tok.encode(r["prompt"]))
        assert not ex.target_mask[:n_prompt].any() and ex.target_mask[n_prompt:].all()
        assert int(ex.tokens[-1]) == tok.eos_token_id


def test_completions_truncated_and_long_prompt_rejected(tmp_path, tok):
    long_completion = " ".join(["word"] * 200)
    ds = ds_of(tmp_path, [{"prompt": "Tell me:", "completion": long_completion}])
    stats: dict = {}
    (ex,) = data.tokenize(ds, tok, max_seq_len=32, stats=stats)
    assert len(ex.tokens) == 32 and ex.target_mask[1:].any()
    assert stats["truncated"] == 1
    prompt_len = len(tok.encode("Tell me:"))
    with pytest.raises(UserError, match=r"train\.jsonl:3: the prompt is \d+ tokens"):
        data.tokenize(
            ds_of(tmp_path, [{"prompt": "a", "completion": "b"}, "", {"prompt": "Tell me:", "completion": "x"}]),
            tok,
            max_seq_len=prompt_len,
        )


def test_chat_mask_two_assistant_turns(tmp_path, tok):
    messages = [
        {"role": "system", "content": "You answer about Python."},
        {"role": "user", "content": "What is a tuple?"},
        {"role": "assistant", "content": "An immutable sequence."},
        {"role": "user", "content": "And a list?"},
        {"role": "assistant", "content": "A mutable one."},
    ]
    (ex,) = data.tokenize(ds_of(tmp_path, [{"messages": messages}]), tok, max_seq_len=512)
    full_text = tok.decode(ex.tokens.tolist())
    assert full_text == tok.apply_chat_template(messages, tokenize=False)
    assert targets(tok, ex) == f"An immutable sequence.{EOT}\nA mutable one.{EOT}\n"
    context = non_targets(tok, ex)
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in context
            assert m["content"] not in targets(tok, ex)
    # the generation prompt that precedes each assistant turn is context, not target
    assert context.count("<|im_start|>assistant\n") == 2


def test_chat_with_tools_field_and_tool_role(tmp_path, tok):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "w"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "1"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    record = {"messages": messages, "tools": [{"type": "function", "function": {"name": "w"}}]}
    (ex,) = data.tokenize(ds_of(tmp_path, [record]), tok, max_seq_len=512)
    assert targets(tok, ex).endswith(f"It is sunny.{EOT}\n")
    assert "sunny" in non_targets(tok, ex)  # the tool result is context


def test_chat_falls_back_to_final_turn_when_template_not_prefix_stable(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    # Earlier assistant turns render differently once they are not the last message (like templates that
    # strip reasoning from history), so the prefix property fails.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}[earlier]{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [C, {"role": "assistant", "content": "First answer."}, C, {"role": "assistant", "content": "Last."}]
    (ex,) = data.tokenize(ds_of(tmp_path, [{"messages": messages}]), tok, max_seq_len=512)
    assert targets(tok, ex) == f"Last.{EOT}\n"


def test_chat_starting_with_assistant(tmp_path, tok):
    (ex,) = data.tokenize(ds_of(tmp_path, [{"messages": [A, C, A]}]), tok, max_seq_len=128)
    assert targets(tok, ex) == f"Hello{EOT}\nHello{EOT}\n"  # the opening "<|im_start|>assistant\n" is not


def test_chat_needs_a_chat_template(tmp_path, no_template_tok):
    ds = ds_of(tmp_path, [RECORDS["chat"]])
    with pytest.raises(UserError, match="lacks a chat template, and chat data needs one"):
        data.tokenize(ds, no_template_tok, max_seq_len=64)
    # text and completions do not need one
    assert data.tokenize(ds_of(tmp_path, [RECORDS["completions"]]), no_template_tok, 64)


def test_chat_truncation_skips_examples_without_targets(tmp_path, tok):
    long_user = {"role": "user", "content": " ".join(["token"] * 100)}
    short = {"messages": [C, A]}
    records = [{"messages": [long_user, A]}, short]
    stats: dict = {}
    examples = data.tokenize(ds_of(tmp_path, records), tok, max_seq_len=40, stats=stats)
    assert [e.source for e in examples] == [1]
    assert stats == {"records": 2, "examples": 1, "skipped": 1, "truncated": 1}
    assert all(len(e.tokens) <= 40 for e in examples)
    with pytest.raises(UserError, match="no example has a target token within max_seq_len=40"):
        data.tokenize(ds_of(tmp_path, [{"messages": [long_user, A]}]), tok, max_seq_len=40)


def test_chat_template_error_names_the_line(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tok.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}x"
    )
    ds = ds_of(tmp_path, [RECORDS["chat"], {"messages": [{"role": "system", "content": "s"}, A]}])
    with pytest.raises(UserError, match=r"train\.jsonl:2: the chat template rejected .*must start with user"):
        data.tokenize(ds, tok, max_seq_len=64)


@pytest.mark.parametrize("max_seq_len", [16, 33, 64])
def test_text_windows_cover_the_document(tmp_path, tok, max_seq_len):
    text = "\n".join(tiny.corpus())[:3000]
    full = tok.encode(text) + [tok.eos_token_id]
    short = {"text": "A short line."}
    examples = data.tokenize(ds_of(tmp_path, [{"text": text}, short]), tok, max_seq_len=max_seq_len)
    windows = [e for e in examples if e.source == 0]
    assert len(windows) > 1 and all(len(w.tokens) <= max_seq_len for w in windows)
    assert all(len(w.tokens) == max_seq_len for w in windows[:-1])
    # consecutive windows share one boundary token: joined, they are the document's encoding
    joined = windows[0].tokens.tolist() + [t for w in windows[1:] for t in w.tokens.tolist()[1:]]
    remainder = len(full) - len(joined)
    assert joined == full[: len(joined)]
    assert remainder == 0 or remainder + 1 < data.MIN_WINDOW_TOKENS  # only a tiny tail may be dropped
    for w in windows:
        assert not w.target_mask[0] and w.target_mask[1:].all()
    assert sum(int(w.target_mask.sum()) for w in windows) == len(joined) - 1  # each token a target once
    (last,) = [e for e in examples if e.source == 1]
    assert last.tokens.tolist() == tok.encode(short["text"]) + [tok.eos_token_id]


def test_text_remainder_shorter_than_minimum_is_dropped(tmp_path, tok):
    text = "\n".join(tiny.corpus())[:3000]
    n = len(tok.encode(text)) + 1
    # choose a window length leaving a final window of exactly 3 tokens: n = 1 + k*(L-1) + 2
    L = next(L for L in range(20, 200) if (n - 3) % (L - 1) == 0)
    windows = data.tokenize(ds_of(tmp_path, [{"text": text}]), tok, max_seq_len=L)
    assert len(windows) == (n - 3) // (L - 1)
    assert sum(len(w.tokens) for w in windows) - (len(windows) - 1) == n - 2


def test_prompts_have_no_targets_and_messages_get_the_generation_prompt(tmp_path, tok, no_template_tok):
    messages = [{"role": "user", "content": "Name a prime."}]
    records = [{"prompt": "Once upon a time"}, {"prompt": messages}]
    plain, chat = data.tokenize(ds_of(tmp_path, records), tok, max_seq_len=256)
    assert plain.tokens.tolist() == tok.encode("Once upon a time") and not plain.target_mask.any()
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "input_ids") else expected  # transformers 5's shape
    assert chat.tokens.tolist() == list(expected)
    assert not chat.target_mask.any() and chat.source == 1
    with pytest.raises(UserError, match=r"train\.jsonl:2: the prompt is a list of messages.*no chat template"):
        data.tokenize(ds_of(tmp_path, records), no_template_tok, max_seq_len=256)
    with pytest.raises(UserError, match=r"train\.jsonl:1: the prompt is \d+ tokens, which leaves no room"):
        data.tokenize(ds_of(tmp_path, records[:1]), tok, max_seq_len=len(plain.tokens))


@pytest.mark.parametrize("fmt", ["preference", "mcq"])
def test_benchmark_formats_are_not_trainable(tmp_path, tok, fmt):
    with pytest.raises(UserError, match=f"format '{fmt}' is for benchmarks; training needs text, completions or chat"):
        data.tokenize(ds_of(tmp_path, [RECORDS[fmt]]), tok, max_seq_len=64)


# ------------------------------------------------------------------------------------ splits, batches


def make_examples(lengths_by_source: list[list[int]]) -> list[Example]:
    out = []
    for source, lengths in enumerate(lengths_by_source):
        for n in lengths:
            mask = np.ones(n, dtype=bool)
            mask[0] = False
            out.append(Example(np.arange(n, dtype=np.int32), mask, source))
    return out


def test_holdout_keeps_documents_together_and_is_deterministic():
    examples = make_examples([[10, 10, 5] if s % 3 == 0 else [8] for s in range(40)])
    train, valid = data.holdout(examples, 0.1, seed=7)
    assert len(train) + len(valid) == len(examples)
    train_src, valid_src = {e.source for e in train}, {e.source for e in valid}
    assert not train_src & valid_src
    assert len(valid_src) == 4
    again = data.holdout(examples, 0.1, seed=7)
    assert [e.source for e in again[1]] == [e.source for e in valid]
    others = {tuple(sorted({e.source for e in data.holdout(examples, 0.1, seed=s)[1]})) for s in range(5)}
    assert len(others) > 1  # the seed matters
    for s in valid_src:  # every window of a held-out document is held out
        assert sum(e.source == s for e in valid) == sum(e.source == s for e in examples)


def test_holdout_at_least_one_each_side():
    examples = make_examples([[8], [8], [8]])
    train, valid = data.holdout(examples, 0.01, seed=0)
    assert len(valid) == 1 and len(train) == 2
    with pytest.raises(UserError, match="cannot hold out"):
        data.holdout(make_examples([[8, 8]]), 0.1, seed=0)


def test_length_batches_permutation_per_epoch_deterministic_and_varied():
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 300, size=103).tolist()
    b0 = data.length_batches(lengths, 8, seed=1, epoch=0)
    assert sorted(np.concatenate(b0).tolist()) == list(range(103))
    assert [len(b) for b in sorted(b0, key=len)][0] == 103 % 8 and len(b0) == 13
    same = data.length_batches(lengths, 8, seed=1, epoch=0)
    assert all((a == b).all() for a, b in zip(b0, same))
    b1 = data.length_batches(lengths, 8, seed=1, epoch=1)
    assert sorted(np.concatenate(b1).tolist()) == list(range(103))
    assert np.concatenate(b0).tolist() != np.concatenate(b1).tolist()
    other_seed = data.length_batches(lengths, 8, seed=2, epoch=0)
    assert np.concatenate(b0).tolist() != np.concatenate(other_seed).tolist()
    for b in b0:  # each batch is a contiguous run of the length order: its spread is small
        assert max(lengths[i] for i in b) - min(lengths[i] for i in b) < 60


def test_length_batches_ties_are_shuffled_across_epochs():
    lengths = [16] * 40
    orders = {tuple(np.concatenate(data.length_batches(lengths, 4, seed=0, epoch=e)).tolist()) for e in range(3)}
    assert len(orders) == 3
    firsts = {tuple(sorted(data.length_batches(lengths, 4, seed=0, epoch=e)[0].tolist())) for e in range(3)}
    assert len(firsts) > 1  # batch membership changes too, not only batch order


def test_length_batches_small_dataset_single_batch():
    (only,) = data.length_batches([5, 3, 9], 8, seed=0, epoch=0)
    assert sorted(only.tolist()) == [0, 1, 2]
    assert data.length_batches([], 8, seed=0, epoch=0) == []


def test_bucketing_reduces_padding():
    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(8, 40, 200), rng.integers(200, 512, 56)]).tolist()
    bucketed = data.length_batches(lengths, 8, seed=0, epoch=0)
    perm = rng.permutation(len(lengths))
    random_batches = [perm[i : i + 8] for i in range(0, len(perm), 8)]
    fb, fr = data.padding_fraction(bucketed, lengths), data.padding_fraction(random_batches, lengths)
    assert fb < 0.1 < 0.5 < fr


def test_padding_fraction_exact():
    assert data.padding_fraction([np.array([0, 1])], [8, 4]) == pytest.approx(4 / 16)
    assert data.padding_fraction([np.array([0, 1])], [5, 4], pad_to=1) == pytest.approx(1 / 10)
    assert data.padding_fraction([np.array([0, 1])], [5, 4]) == pytest.approx(7 / 16)  # rounded to 8


def test_eval_batches_sorted_and_fixed():
    lengths = [30, 5, 20, 5, 9]
    batches = data.eval_batches(lengths, 2)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 2], [0]]
    assert [b.tolist() for b in data.eval_batches(lengths, 2)] == [b.tolist() for b in batches]


def test_collate_pads_to_multiple():
    examples = make_examples([[3], [10], [1]])
    tokens, mask = data.collate(examples, pad_id=99)
    assert tokens.shape == mask.shape == (3, 16)
    assert tokens.dtype == np.int32 and mask.dtype == bool
    assert tokens[0, :3].tolist() == [0, 1, 2] and (tokens[0, 3:] == 99).all()
    assert mask[0].tolist() == [False, True, True] + [False] * 13
    assert mask[1, 1:10].all() and not mask[1, 10:].any()
    assert not mask[2].any() and tokens[2, 0] == 0
    assert data.collate(examples, pad_id=0, pad_to=1)[0].shape == (3, 10)
    assert data.collate(make_examples([[16]]), pad_id=0)[0].shape == (1, 16)
