"""The tokenizer of a GGUF file, as a Hugging Face fast tokenizer in the mlx-lm folder.

`write_tokenizer` builds a `tokenizers.Tokenizer` from the file's `tokenizer.ggml.*` metadata and writes
`tokenizer.json` + `tokenizer_config.json`, with the chat template from `tokenizer.chat_template` and the
bos/eos/pad/unk tokens. The tokenizer is built by transformers' own GGUF code (`transformers.integrations.gguf.
gguf_tokenizer_mapping.convert_gguf_tokenizer`, the same one `AutoTokenizer.from_pretrained(...,
gguf_file=...)` uses, called here without torch). If that module is missing (another transformers release), a
byte-level BPE tokenizer is built directly with `tokenizers`. Part of gguf_import.py's import.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from worker.engine.errors import UserError
from worker.engine.gguf_read import GgufFile

log = logging.getLogger(__name__)

# Pre-tokenizer types (`tokenizer.ggml.pre`) transformers' table does not cover but llama.cpp defines:
# these split every digit on its own, then apply GPT-2's byte-level regex.
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact"}
# Pre-tokenizer types for which GPT-2's own byte-level regex is the right one.
_GPT2_PRES = {None, "default", "gpt-2", "gpt2"}

# GGUF metadata key (after `tokenizer.`) -> the key transformers' GGUF tokenizer code expects.
# Same table as transformers' GGUF_TOKENIZER_MAPPING["tokenizer"]; kept here for the fallback path.
_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type",
    "ggml.pre": "pre_tokenizer_type",
    "ggml.tokens": "tokens",
    "ggml.scores": "scores",
    "ggml.token_type": "token_type",
    "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap",
    "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id",
    "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id",
    "ggml.add_space_prefix": "add_prefix_space",
}

# transformers' `convert_gguf_tokenizer(architecture, tokenizer_dict)`: (backend tokenizer, extra kwargs).
ConvertGgufTokenizer = Callable[[str, dict[str, Any]], tuple[Any, dict[str, Any]]]


def _tokenizer_dict(g: GgufFile) -> dict[str, Any]:
    keys: dict[str, str]
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

        keys = GGUF_TOKENIZER_MAPPING["tokenizer"]
    except Exception:
        keys = _TOKENIZER_KEYS
    return {name: g.get(f"tokenizer.{key}") for key, name in keys.items() if g.get(f"tokenizer.{key}") is not None}


def _transformers_gguf_tokenizer() -> tuple[ConvertGgufTokenizer | None, Collection[str]]:
    """transformers' GGUF tokenizer builder and its pre-tokenizer table, or (None, {}) if absent.

    `AutoTokenizer.from_pretrained(..., gguf_file=...)` would be the obvious call, but it reads the
    file with a torch-based reader; the builder it uses underneath needs only `tokenizers`.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
            convert_gguf_tokenizer,
        )
    except ImportError:  # a transformers release without this module
        return None, {}
    return convert_gguf_tokenizer, GGUF_PRE_TOKENIZER_SPLITS


def _backend_tokenizer(g: GgufFile, td: dict[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` for the vocabulary in the file."""
    kind = td.get("tokenizer_type")
    convert_gguf_tokenizer, known_splits = _transformers_gguf_tokenizer()
    if convert_gguf_tokenizer is not None:
        try:
            backend, _ = convert_gguf_tokenizer(g.arch, td)
        except ValueError as e:
            raise UserError(f"{g.path}: cannot build a tokenizer: {e}") from e
    elif kind == "gpt2":
        backend = _byte_level_bpe(td)
    else:
        raise UserError(
            f"{g.path}: tokenizer model {kind!r} needs transformers' GGUF tokenizer support "
            "(transformers.integrations.gguf), which this transformers release lacks"
        )

    if kind == "gpt2":
        pre = td.get("pre_tokenizer_type")
        if pre in _DIGIT_SPLIT_PRES:
            from tokenizers import pre_tokenizers

            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
                ]
            )
        elif pre not in _GPT2_PRES and pre not in known_splits:
            g.notes.append(f"pre-tokenizer {pre!r} unknown, GPT-2 splitting used")
            log.warning("%s: pre-tokenizer %r is not known; using GPT-2's byte-level splitting", g.path, pre)
    return backend


def _byte_level_bpe(td: dict[str, Any]) -> Any:
    """Fallback: a byte-level BPE tokenizer straight from the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens = list(td["tokens"])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in td.get("merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = td.get("pre_tokenizer_type")
    if pre in ("qwen2", "deepseek-r1-qwen"):
        split = (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+"
        )
    elif pre in ("llama3", "llama-bpe", "llama-v3"):
        split = (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        )
    else:
        split = None
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = td.get("token_type") or []
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    return tok


def write_tokenizer(g: GgufFile, folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Write tokenizer.json + tokenizer_config.json; returns the token ids for config.json."""
    td = _tokenizer_dict(g)
    tokens = td.get("tokens")
    if not tokens:
        raise UserError(f"{g.path}: GGUF has no tokenizer.ggml.tokens; cannot build a tokenizer")
    backend = _backend_tokenizer(g, td)

    def token(key: str) -> str | None:
        i = g.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    kind = td.get("tokenizer_type")
    add_bos = g.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = g.get("tokenizer.ggml.add_eos_token", False)
    specials = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    chat_template = g.get("tokenizer.chat_template")

    from transformers import PreTrainedTokenizerFast

    add_bos = bool(add_bos and specials["bos_token"])
    add_eos = bool(add_eos and specials["eos_token"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        model_max_length=config["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        **{k: v for k, v in specials.items() if v is not None},
    )
    fast.save_pretrained(str(folder))
    # chat template and special tokens in tokenizer_config.json itself (readable by any transformers).
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.update({k: v for k, v in specials.items() if v is not None})
    tok_cfg.update(add_bos_token=add_bos, add_eos_token=add_eos)
    if chat_template:
        tok_cfg["chat_template"] = chat_template
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").unlink(missing_ok=True)

    ids: dict[str, Any] = {}
    bos, pad = g.get("tokenizer.ggml.bos_token_id"), g.get("tokenizer.ggml.padding_token_id")
    eos = [g.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    eos = list(dict.fromkeys(i for i in eos if isinstance(i, int)))
    if isinstance(bos, int):
        ids["bos_token_id"] = bos
    if eos:
        ids["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if isinstance(pad, int):
        ids["pad_token_id"] = pad
    return ids
