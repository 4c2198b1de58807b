"""JSONL datasets for the engine: loading and validating a file, and the engine's dataset API in one place.

The formats, their fields and the line-by-line validation are `distillery_contract.records`, the rules the API
checks an upload with; a dataset that fails them is a `UserError` here. Numpy, no MLX.

This module loads (`load_jsonl` -> `Dataset`); the later steps live beside it and are re-exported here, so the
engine reaches every step as `data.<name>`:

    data_tokenize.py   token ids and target masks per example (`tokenize`, `Example`)
    data_batching.py   the holdout split, batch orders and padding (`holdout`, `length_batches`,
                       `eval_batches`, `collate`, `padding_fraction`)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distillery_contract.records import FORMATS, TRAINABLE_FORMATS, DatasetError, JsonlChecker, detect_format
from worker.engine.data_batching import collate, eval_batches, holdout, length_batches, padding_fraction
from worker.engine.data_tokenize import MIN_WINDOW_TOKENS, Example, needs_chat_template, tokenize
from worker.engine.errors import UserError

__all__ = [
    # loading (this module)
    "Dataset",
    "load_jsonl",
    # the formats, from the contract
    "FORMATS",
    "TRAINABLE_FORMATS",
    "DatasetError",
    "JsonlChecker",
    "detect_format",
    # tokenizing (data_tokenize.py)
    "MIN_WINDOW_TOKENS",
    "Example",
    "needs_chat_template",
    "tokenize",
    # splits and batches (data_batching.py)
    "collate",
    "eval_batches",
    "holdout",
    "length_batches",
    "padding_fraction",
]


@dataclass(frozen=True)
class Dataset:
    path: Path
    format: str
    records: list[dict]  # validated records
    lines: list[int]  # 1-based source line of each record
    sha256: str  # of the file bytes


def load_jsonl(path: str | Path, format: str | None = None, *, max_bytes: int | None = None) -> Dataset:
    """Read and validate a JSONL dataset; the format is stated or detected from the first record.

    Every line is checked and up to `records.MAX_REPORTED_ERRORS` problems are reported together, so a user fixes a
    file in one round instead of one error per upload.
    """
    path = Path(path)
    name = path.name
    if format is not None and format not in FORMATS:
        raise UserError(f"unknown dataset format {format!r}; expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise UserError(f"{name}: no such file")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise UserError(f"{name}: file is {size} bytes, larger than the limit of {max_bytes} bytes")
    checker = JsonlChecker(name, format, keep=True)
    try:
        checker.feed_file(path)
        fmt = checker.close()
    except DatasetError as e:
        raise UserError(str(e)) from None
    return Dataset(path=path, format=fmt, records=checker.records, lines=checker.lines, sha256=checker.sha256)
