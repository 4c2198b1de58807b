"""The playground (the `generate` job, `distillery_contract.specs.GenerateSpec`): one prompt, each model's answer.

Models are loaded one at a time, in the spec's order, each freed before the next is loaded (peak memory is the
largest model). Each answers with mlx-lm's own generation (`stream_generate`, the sampler of `make_sampler`),
after `mx.random.seed(spec.seed)`: every model starts from the same key and a rerun writes the same answers
(greedy, the default, needs no key at all). A text prompt is given to mlx-lm as it is, tokenized as mlx-lm's
`generate` tokenizes it; chat messages are rendered by the model's chat template with the generation prompt,
or, for a tokenizer without one, their contents are joined by blank lines.

The engine only sees local paths (`GenerateInput`); the caller resolves ids and reports progress: one step per
model answered.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from distillery_contract.specs import GenerateMessage, GenerateSpec

from . import cancel, models
from . import student as student_mod
from .data_tokenize import _apply_template, _has_chat_template
from .errors import Cancelled, UserError
from .train import Hooks

__all__ = ["GenerateInput", "run_generate", "load_model_of", "render_prompt"]


@dataclass
class GenerateInput:
    """One model of the spec, resolved: its base model folder and the adapter folder applied to it, if any."""

    label: str
    model: Path
    adapter: Path | None = None
    field: str = ""  # where it is in the spec, for error messages: "models.N"
    name: str = ""  # the model as the spec names it


def load_model_of(m: GenerateInput):
    """(model, tokenizer) in inference mode, the adapter applied; an adapter that does not fit the model is the
    user's to fix (a UserError naming the field)."""
    model, tokenizer, _ = models.load_model(m.model)
    if m.adapter is not None:
        student_mod.load_adapter(model, m.adapter, f"{m.field}.adapter: the adapter does not fit model {m.name}")
    model.eval()  # LoRA dropout off
    mx.eval(model.parameters())
    return model, tokenizer


def render_prompt(tokenizer, prompt: str | list[GenerateMessage], field: str) -> tuple[str | list[int], str]:
    """What mlx-lm's `stream_generate` is given, and how it was made (`text`, `chat_template` or `joined`)."""
    if isinstance(prompt, str):
        return prompt, "text"
    messages = [m.model_dump() for m in prompt]
    if not _has_chat_template(tokenizer):
        return "\n\n".join(m["content"] for m in messages), "joined"
    ids = _apply_template(tokenizer, messages, None, messages[-1]["role"] != "assistant", field)
    return ids, "chat_template"


def answer(model, tokenizer, prompt: str | list[int], spec: GenerateSpec, should_stop: Callable[[], bool]) -> dict:
    """One model's answer: the text, the tokens it wrote (end-of-sequence not counted), the time."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(spec.seed)
    sampler = make_sampler(temp=spec.temperature, top_p=spec.top_p)
    pieces: list[str] = []
    last = None
    t0 = time.perf_counter()
    for last in stream_generate(model, tokenizer, prompt, max_tokens=spec.max_tokens, sampler=sampler):
        pieces.append(last.text)
        cancel.point("generation")
        if should_stop():
            raise Cancelled("generation cancelled")
    seconds = time.perf_counter() - t0
    if last is None:  # mlx-lm always yields a final response; this would be a change of mlx-lm's
        raise RuntimeError("mlx-lm's stream_generate yielded nothing")
    stopped = last.finish_reason == "stop"
    tokens = last.generation_tokens - (1 if stopped else 0)
    decode = last.generation_tps if tokens > 0 else 0.0
    return {
        "text": "".join(pieces),
        "tokens": tokens,
        "prompt_tokens": last.prompt_tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "decode_tokens_per_second": decode,
        "prefill_tokens_per_second": last.prompt_tps,
        "finish_reason": last.finish_reason,
    }


def run_generate(
    spec: GenerateSpec,
    inputs: list[GenerateInput],
    hooks: Hooks | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Every model's answer to the prompt, in the spec's order: `{"answers": [{label, text, tokens, ...}]}`."""
    if len(inputs) != len(spec.models):
        raise ValueError("inputs must resolve spec.models one to one")
    hooks = hooks or Hooks()
    should_stop = hooks.should_stop or (lambda: False)
    report = on_progress or (lambda _: None)
    total = len(inputs)
    report({"step": 0, "total_steps": total, "phase": "generate", "label": None})
    answers = []
    t_start = time.perf_counter()
    for i, m in enumerate(inputs):
        if should_stop():
            raise Cancelled("generation cancelled")
        t_load = time.perf_counter()
        model, tokenizer = load_model_of(m)
        load_seconds = time.perf_counter() - t_load
        try:
            prompt, rendered = render_prompt(tokenizer, spec.prompt, "prompt")
            if isinstance(prompt, list) and not prompt:
                raise UserError(f"prompt: renders to no tokens for {m.field} ({m.label})")
            out = answer(model, tokenizer, prompt, spec, should_stop)
        finally:
            del model, tokenizer
            gc.collect()
            mx.clear_cache()
        row = {"label": m.label, "model": m.name, "prompt_format": rendered, **out, "load_seconds": load_seconds}
        answers.append(row)
        hooks.event(
            "answer",
            f"{m.label}: {out['tokens']} tokens in {out['seconds']:.2f} s",
            label=m.label,
            tokens=out["tokens"],
            seconds=out["seconds"],
        )
        report({"step": i + 1, "total_steps": total, "phase": "generate", "label": m.label})
    return {
        "answers": answers,
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "seed": spec.seed,
        "wall_seconds": time.perf_counter() - t_start,
    }
