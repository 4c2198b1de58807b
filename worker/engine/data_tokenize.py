"""Tokenizing a trainable dataset: token ids and target masks per example, for text, completions, chat and
prompts (on-policy distillation's prompts alone: no target at all, the student writes the completion).

`Example.target_mask[i]` says whether `tokens[i]` is a token the student is trained to predict (from
`tokens[:i]`), so the loss for inputs `tokens[:-1]` uses labels `tokens[1:]` weighted by `target_mask[1:]`.
Text is split into overlapping windows of at most `max_seq_len` tokens; a completion's targets are the
completion and eos; a chat's are its assistant turns, found by rendering the model's chat template. Numpy, no
MLX. A tokenizer is anything with the transformers interface: a `transformers` tokenizer or mlx-lm's
`TokenizerWrapper` (which forwards `encode` and friends to one). The datasets come from data.py's `load_jsonl`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from distillery_contract.records import TRAINABLE_FORMATS
from worker.engine.errors import UserError

if TYPE_CHECKING:  # data.py imports this module for its re-exports
    from worker.engine.data import Dataset

log = logging.getLogger(__name__)

MIN_WINDOW_TOKENS = 8  # a split document's last window shorter than this is dropped


def needs_chat_template(fmt: str) -> bool:
    """Chat data is rendered with the model's template; completions are plain concatenation (see below)."""
    return fmt == "chat"


@dataclass
class Example:
    tokens: np.ndarray  # int32 [n]
    target_mask: np.ndarray  # bool [n]; True where tokens[i] is a training target (tokens[0] never is)
    source: int  # index of the record it came from


def tokenize(ds: Dataset, tokenizer, max_seq_len: int, *, stats: dict | None = None) -> list[Example]:
    """Token ids and target masks for a trainable dataset, each at most `max_seq_len` tokens.

    Examples left with no target token (all of a chat's assistant turns past `max_seq_len`) are skipped and
    counted; `stats`, if given, is filled with {"records", "examples", "skipped", "truncated"}.
    """
    if ds.format not in TRAINABLE_FORMATS + ("prompts",):
        raise UserError(f"format {ds.format!r} is for benchmarks; training needs text, completions or chat")
    if max_seq_len < 2:
        raise UserError(f"max_seq_len must be at least 2, got {max_seq_len}")
    if needs_chat_template(ds.format) and not _has_chat_template(tokenizer):
        raise UserError(
            f"{ds.path.name}: the model's tokenizer lacks a chat template, and chat data needs one "
            "(use text or completions data, or a model with a chat template)"
        )
    counts = {"records": len(ds.records), "examples": 0, "skipped": 0, "truncated": 0}
    examples: list[Example] = []
    for i, record in enumerate(ds.records):
        where = f"{ds.path.name}:{ds.lines[i]}"
        if ds.format == "text":
            pieces = _text_windows(tokenizer, record["text"], max_seq_len)
        elif ds.format == "completions":
            pieces = [_completion(tokenizer, record, max_seq_len, where)]
        elif ds.format == "prompts":
            pieces = [_prompt(tokenizer, record, max_seq_len, where)]
        else:
            pieces = [_chat(tokenizer, record, where)]
        for tokens, mask in pieces:
            if len(tokens) > max_seq_len:
                tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
                counts["truncated"] += 1
            target = np.array(mask, dtype=bool)
            target[0] = False  # nothing predicts the first token
            if not target.any() and ds.format != "prompts":
                counts["skipped"] += 1
                continue
            examples.append(Example(np.array(tokens, dtype=np.int32), target, i))
    counts["examples"] = len(examples)
    if stats is not None:
        stats.update(counts)
    if counts["skipped"]:
        log.warning(
            "%s: skipped %d examples with no target token within max_seq_len=%d",
            ds.path.name,
            counts["skipped"],
            max_seq_len,
        )
    if not examples:
        raise UserError(
            f"{ds.path.name}: no example has a target token within max_seq_len={max_seq_len} "
            "(raise max_seq_len or shorten the prompts)"
        )
    return examples


def _text_windows(tokenizer, text: str, max_seq_len: int) -> list[tuple[list[int], list[bool]]]:
    """text + eos, split into windows of at most `max_seq_len` that overlap by one token.

    Consecutive windows share their boundary token (the last token of one is the first, context-only token
    of the next), so every token after the document's first is a target exactly once and nothing is lost
    to the split — except a final window shorter than `MIN_WINDOW_TOKENS`, which is not worth a padded row.
    """
    ids = _with_eos(tokenizer, tokenizer.encode(text))
    stride = max_seq_len - 1
    windows = []
    for start in range(0, max(len(ids) - 1, 1), stride):
        window = ids[start : start + max_seq_len]
        if start > 0 and len(window) < MIN_WINDOW_TOKENS:
            break
        windows.append((window, [False] + [True] * (len(window) - 1)))
    return windows


def _completion(tokenizer, record: dict, max_seq_len: int, where: str) -> tuple[list[int], list[bool]]:
    """prompt + completion + eos with only completion (+ eos) as targets.

    Plain concatenation even when the tokenizer has a chat template: a `completions` file is raw text the
    user controls exactly; data that should look like a conversation belongs in the `chat` format. The two
    parts are encoded separately so the prompt/completion boundary is exact in tokens.
    """
    prompt = tokenizer.encode(record["prompt"])
    completion = _with_eos(tokenizer, tokenizer.encode(record["completion"], add_special_tokens=False))
    if len(prompt) >= max_seq_len:
        raise UserError(
            f"{where}: the prompt is {len(prompt)} tokens, which leaves no room for the completion "
            f"within max_seq_len={max_seq_len}"
        )
    return prompt + completion, [False] * len(prompt) + [True] * len(completion)


def _prompt(tokenizer, record: dict, max_seq_len: int, where: str) -> tuple[list[int], list[bool]]:
    """A prompt for the student to complete, no target: a string as it is (as a completion's prompt), a list of
    messages rendered by the chat template with the generation prompt (as a chat's turn before a reply)."""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif not _has_chat_template(tokenizer):
        raise UserError(f"{where}: the prompt is a list of messages, and the model's tokenizer has no chat template")
    else:
        ids = _apply_template(tokenizer, prompt, None, True, where)
    if len(ids) >= max_seq_len:
        raise UserError(
            f"{where}: the prompt is {len(ids)} tokens, which leaves no room for a completion "
            f"within max_seq_len={max_seq_len}"
        )
    return ids, [False] * len(ids)


def _chat(tokenizer, record: dict, where: str) -> tuple[list[int], list[bool]]:
    """The templated conversation, with the tokens of assistant turns as targets.

    A turn's span is found by templating prefixes: messages[:i] with the generation prompt ends where
    assistant turn i begins, messages[:i+1] ends where it (including its end-of-turn tokens) ends. That is only
    valid if each prefix renders as a token prefix of the whole conversation; some templates break this
    (e.g. ones that drop earlier turns' reasoning). Then only the final assistant turn is masked in, from
    where the rendering of the conversation before it stops agreeing with the full one.
    """
    messages, tools = record["messages"], record.get("tools")
    full = _apply_template(tokenizer, messages, tools, False, where)
    mask = [False] * len(full)
    spans = _assistant_spans(tokenizer, messages, tools, full, where)
    if spans is None:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        before = _before_turn(tokenizer, messages, last, tools, full, where)
        end = len(full)
        if last < len(messages) - 1:
            end = _common_prefix(_apply_template(tokenizer, messages[: last + 1], tools, False, where), full)
        start = _common_prefix(before, full)
        spans = [(start, max(start, end))]
        log.debug("%s: chat template is not prefix-stable; only the final assistant turn is a target", where)
    for start, end in spans:
        mask[start:end] = [True] * (end - start)
    return full, mask


def _assistant_spans(tokenizer, messages, tools, full, where) -> list[tuple[int, int]] | None:
    """[start, end) token spans of every assistant turn, or None if the template is not prefix-stable."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _before_turn(tokenizer, messages, i, tools, full, where)
        through = _apply_template(tokenizer, messages[: i + 1], tools, False, where)
        if not (_is_prefix(before, full) and _is_prefix(through, full) and len(before) <= len(through)):
            return None
        spans.append((len(before), len(through)))
    return spans


def _before_turn(tokenizer, messages, i: int, tools, full: list[int], where: str) -> list[int]:
    """The rendering of messages[:i] with the generation prompt: everything before turn i's content.

    For i = 0 that is the empty conversation (BOS, default system prompt, turn header). Many templates refuse
    an empty conversation; then it is the part of `full` that an empty assistant message renders identically.
    """
    if i > 0:
        return _apply_template(tokenizer, messages[:i], tools, True, where)
    try:
        return _apply_template(tokenizer, [], tools, True, "")
    except UserError:
        empty = _apply_template(tokenizer, [{"role": "assistant", "content": ""}], tools, False, where)
        return full[: _common_prefix(empty, full)]


def _apply_template(tokenizer, messages, tools, add_generation_prompt: bool, where: str) -> list[int]:
    """Token ids of templated messages, from a transformers tokenizer or mlx-lm's wrapper.

    `return_dict` is not passed (mlx-lm's custom Python templates do not take it); transformers 5 returns
    a BatchEncoding by default, so both shapes are accepted.
    """
    kwargs = {"add_generation_prompt": add_generation_prompt, "tokenize": True}
    if tools is not None:
        kwargs["tools"] = tools
    try:
        out = tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as e:  # the template is the model's code, the conversation the user's: say which line
        raise UserError(f"{where}: the chat template rejected this conversation: {e}") from e
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(t) for t in out]


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    ids = list(ids)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def _has_chat_template(tokenizer) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)  # mlx-lm's wrapper
    if isinstance(flag, bool):
        return flag
    return getattr(tokenizer, "chat_template", None) is not None


def _is_prefix(a: list[int], b: list[int]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
