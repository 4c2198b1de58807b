"""Job specs as pydantic models: what `POST /v1/jobs` accepts, the one definition the API validates, the engine
runs and the SDK checks before sending.

Pure pydantic (no MLX, no HTTP), so every process can import it. Unknown fields are rejected everywhere, so
that a typo (`learning_rat`) is an error naming the field, never a silently ignored setting; values are not
coerced (`top_k: true` is an error). The API publishes these models' own JSON schemas in its OpenAPI document.

    from distillery_contract import DistillSpec
    spec = DistillSpec(student={"model": student_id}, teachers=[{"model": teacher_id}], data={"train": ds_id})
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from .jobs import (
    BENCHMARK,
    COMPARE,
    DEFAULT_MAX_SEQ_LEN,
    DEFAULT_TOP_K,
    DISTILL,
    EVALUATE_LABELS,
    GENERATE,
    MAX_GENERATE_TOKENS,
    MAX_STEPS,
    TEACHER_CACHE,
)

__all__ = [
    "DistillSpec",
    "TeacherCacheSpec",
    "BenchmarkSpec",
    "GenerateSpec",
    "GenerateMessage",
    "SPEC_MODELS",
    "PRESETS",
    "PresetName",
    "apply_preset",
    "StudentSpec",
    "QuantizeSpec",
    "TeacherSpec",
    "DataSpec",
    "LossKind",
    "LossSpec",
    "LossOverride",
    "AdapterSpec",
    "ParamGroup",
    "StageSpec",
    "Rate",
    "LRSearchSpec",
    "DivergenceGuardSpec",
    "TrainingSpec",
    "OutputSpec",
    "BenchmarkCandidate",
    "BenchmarkData",
    "BenchmarkSpeed",
    "EvaluateSpec",
    "EVALUATE_LABELS",
    "MAX_STEPS",
]

LossKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"]


class _Spec(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False
    )  # no coercion: `top_k: true` is an error


class QuantizeSpec(_Spec):
    """Quantization-aware distillation: the student is quantized (MLX affine quantization) before training and
    a LoRA / DoRA adapter learns, on the quantized weights, to recover the full-precision teacher."""

    bits: Literal[2, 3, 4, 5, 6, 8] = Field(4, description="Bits per weight.")
    group_size: Literal[32, 64, 128] = Field(64, description="Weights sharing one scale and bias.")


class StudentSpec(_Spec):
    model: str = Field(description="Model id, or a local folder / GGUF path for `distill`.")
    adapter: str | None = Field(None, description="Starting adapter (e.g. an earlier SFT adapter) folder or job id.")
    keep_layers: list[int] | None = Field(
        None, description="Depth pruning at init: indices of the transformer layers to keep, in order."
    )
    quantize: QuantizeSpec | None = Field(
        None,
        description="Quantize the student (after any pruning) and train the adapter on the quantized "
        "model; the run writes the quantized model as `student/`, which the adapter loads onto.",
    )

    @field_validator("keep_layers")
    @classmethod
    def _layers_sorted_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("keep_layers must name at least one layer")
        if any(i < 0 or i > 100_000 for i in v):
            raise ValueError("keep_layers indices must be layer numbers from 0 to 100000")
        if sorted(set(v)) != v:
            raise ValueError("keep_layers must be strictly increasing layer indices")
        return v


class TeacherSpec(_Spec):
    model: str
    weight: float = Field(1.0, gt=0, le=1e6, description="Fixed mixing weight; weights are normalised to sum to 1.")


class DataSpec(_Spec):
    train: str
    valid: str | float = Field(
        0.05, description="A dataset (id or path), or the fraction of train held out for validation."
    )
    preference: str | None = Field(
        None,
        description="A `preference` dataset (id or path): evaluations report the student's preference accuracy "
        "and agreement with the teachers' ranking on its held-out pairs; `loss.preference` trains on the rest.",
    )

    @field_validator("valid")
    @classmethod
    def _fraction_range(cls, v: str | float) -> str | float:
        if isinstance(v, float) and not 0.0 < v < 0.5:
            raise ValueError("a validation fraction must be in (0, 0.5)")
        return v


class HiddenHintSpec(_Spec):
    """`loss.hidden`: hidden-state hints (README: Several teachers). Needs the teacher in the loop (online)."""

    pairs: list[list[int]] = Field(
        min_length=1,
        max_length=64,
        description="[student_layer, teacher_layer] pairs (0-based transformer blocks, their outputs compared); "
        "widths that differ get a learned projection.",
    )
    kind: Literal["mse", "cosine"] = Field(
        "mse", description="mse: squared error relative to the teacher's norm; cosine: 1 - cosine similarity."
    )
    weight: float = Field(1.0, gt=0, le=1e4, description="Weight of the hint term, summed over pairs.")
    teacher: int = Field(0, ge=0, le=7, description="Which teacher (index in `teachers`) gives the hidden states.")

    @field_validator("pairs")
    @classmethod
    def _layer_pairs(cls, v: list[list[int]]) -> list[list[int]]:
        if any(len(p) != 2 for p in v):
            raise ValueError("each pair is [student_layer, teacher_layer]")
        if any(i < 0 for p in v for i in p):
            raise ValueError("layer indices are 0-based and must be >= 0")
        return v


class PreferenceLossSpec(_Spec):
    """`loss.preference`: keep the teachers' ranking of chosen over rejected (needs `data.preference`)."""

    weight: float = Field(1.0, gt=0, le=1e4, description="Weight of the preference term beside the token loss.")
    kind: Literal["bradley_terry", "mse"] = Field(
        "bradley_terry",
        description="bradley_terry: cross-entropy of the preference probabilities σ(margin / temperature); "
        "mse: squared difference of the length-normalised margins.",
    )
    temperature: float = Field(1.0, gt=0, le=100, description="bradley_terry's margin scale.")
    batch_pairs: int = Field(4, ge=1, le=1024, description="Preference pairs per training step.")


class LossSpec(_Spec):
    kind: LossKind = "forward_kl"
    temperature: float = Field(1.0, gt=0, le=20)
    alpha: float = Field(
        1.0, ge=0, le=1, description="Weight of the distillation term; 1 - alpha goes to CE on labels."
    )
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=4096, description="Teacher log-probs kept per position (offline mode).")
    beta: float = Field(0.5, gt=0, lt=1, description="Mixture weight of generalised JSD.")
    skew: float = Field(0.1, ge=0, lt=1, description="Skew of skew KL: KL(p || skew*p + (1-skew)*q).")
    hidden: HiddenHintSpec | None = Field(None, description="Hidden-state hints: intermediate layers matched too.")
    preference: PreferenceLossSpec | None = Field(
        None, description="Preference-aware: the student's chosen-vs-rejected margins pulled to the teachers'."
    )


class LossOverride(_Spec):
    kind: LossKind | None = None
    temperature: float | None = Field(None, gt=0, le=20)
    alpha: float | None = Field(None, ge=0, le=1)
    beta: float | None = Field(None, gt=0, lt=1)
    skew: float | None = Field(None, ge=0, lt=1)


class AdapterSpec(_Spec):
    type: Literal["lora", "dora", "full"] = "lora"
    rank: int = Field(16, ge=1, le=1024)
    scale: float = Field(20.0, gt=0, le=1e4)
    dropout: float = Field(0.0, ge=0, lt=1)
    layers: int = Field(-1, ge=-1, le=100_000, description="Train the last N transformer layers; -1 = all.")
    keys: list[str] | None = Field(
        None, description="Module keys to adapt (e.g. self_attn.q_proj); default: all linear."
    )

    @field_validator("layers")
    @classmethod
    def _not_zero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("layers must be -1 (all) or a positive count")
        return v


class ParamGroup(_Spec):
    pattern: str = Field(description="Regex matched (re.search) against parameter names.")
    lr_mult: float = Field(ge=0, le=1e4, description="Learning-rate multiplier; 0 freezes the matching parameters.")

    @field_validator("pattern")
    @classmethod
    def _valid_regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regex {v!r}: {e}") from None
        return v


class StageSpec(_Spec):
    """One segment of a multi-stage schedule; unset fields inherit from `training` and `loss`."""

    name: str | None = None
    steps: int = Field(gt=0, le=MAX_STEPS)
    learning_rate: float | None = Field(None, gt=0, le=1.0)
    warmup_steps: int | None = Field(None, ge=0, le=MAX_STEPS)
    loss: LossOverride | None = None
    param_groups: list[ParamGroup] | None = None


Rate = Annotated[float, Field(gt=0, le=1.0)]


class LRSearchSpec(_Spec):
    """How `learning_rate: auto` searches: a few short trials from the starting student, judged on held-out
    batches; the best rate (lowest val KL) trains the run. The trials' steps are not part of `steps`."""

    rates: list[Rate] | None = Field(
        None,
        min_length=2,
        max_length=12,
        description="Rates tried; default: five log-spaced rates suited to the adapter type and the model's size.",
    )
    steps: int | None = Field(
        None, ge=1, le=200, description="Steps per trial; default: steps / 10, at least 4 and at most 20."
    )
    eval_batches: int = Field(2, ge=1, le=64, description="Validation batches each trial is judged on.")


class DivergenceGuardSpec(_Spec):
    """Rolls the run back to its best checkpoint, with a lower learning rate, when training diverges: a train
    loss or gradient norm far above its recent median, a non-finite loss, or a validation KL clearly above the
    best one. Steps after a rollback continue the count (the step budget includes rolled-back steps)."""

    enabled: bool = True
    max_rollbacks: int = Field(3, ge=0, le=20, description="Rollbacks before the run stops and ships its best.")
    lr_factor: float = Field(0.5, gt=0, lt=1, description="Learning-rate multiplier applied at each rollback.")
    loss_spike: float = Field(
        3.0, gt=1, le=1e6, description="A train loss above this multiple of the median of the recent window is a spike."
    )
    grad_norm_spike: float = Field(
        10.0,
        gt=1,
        le=1e9,
        description="A gradient norm (before clipping) above this multiple of the recent median is a spike.",
    )
    window: int = Field(
        16,
        ge=2,
        le=10_000,
        description="Recent train steps the medians are taken over; "
        "spikes are looked for once a quarter of it (at least 3 steps) is filled.",
    )
    val_tolerance: float = Field(
        0.05,
        ge=0,
        le=100,
        description="An evaluation whose val KL is above the best by more than this fraction of it rolls back.",
    )


class TrainingSpec(_Spec):
    steps: int = Field(1000, gt=0, le=MAX_STEPS)
    batch_size: int = Field(4, gt=0, le=4096)
    grad_accum: int = Field(1, gt=0, le=1024)
    learning_rate: Rate | Literal["auto"] = Field(
        "auto", description="Peak learning rate, or `auto`: a short search picks it (see `lr_search`)."
    )
    lr_search: LRSearchSpec = Field(default_factory=LRSearchSpec)
    divergence_guard: DivergenceGuardSpec = Field(default_factory=DivergenceGuardSpec)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of the decay, as a fraction of the peak.")
    weight_decay: float = Field(0.0, ge=0, le=10.0)
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6, description="Global-norm clipping; null disables it.")
    max_seq_len: int = Field(DEFAULT_MAX_SEQ_LEN, ge=8, le=131072)
    seed: int = Field(42, ge=0, lt=2**32, description="Seeds data order, adapter initialisation, dropout.")
    eval_every: int = Field(100, gt=0, le=MAX_STEPS)
    eval_batches: int | None = Field(None, gt=0, le=1_000_000, description="Cap on validation batches per evaluation.")
    checkpoint_every: int = Field(100, gt=0, le=MAX_STEPS)
    keep_checkpoints: int = Field(
        2, ge=1, le=1000, description="Most recent checkpoints kept (the best is always kept)."
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, le=1_000_000, description="Evaluations without val KL improvement."
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, le=1e3, description="Smallest val KL decrease that counts as improvement."
    )
    param_groups: list[ParamGroup] = Field(default_factory=list)
    stages: list[StageSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _stages_fill_steps(self) -> TrainingSpec:
        if self.stages:
            total = sum(s.steps for s in self.stages)
            if "steps" in self.model_fields_set and self.steps != total:
                raise ValueError(f"steps ({self.steps}) must equal the sum of stage steps ({total}) or be omitted")
            if total > MAX_STEPS:
                raise ValueError(f"stages: their steps add up to {total}, more than {MAX_STEPS}")
            self.steps = total
        return self


class OnPolicySpec(_Spec):
    """`teacher_mode: on_policy`: the student samples completions for the data's prompts, the teacher scores
    every sampled token, the loss is `loss.kind` (reverse_kl: KL(student ‖ teacher)) on those tokens only."""

    max_new_tokens: int = Field(64, ge=1, le=16384, description="Longest completion sampled per prompt.")
    temperature: float = Field(1.0, ge=0, le=10, description="Sampling temperature of the student; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest token set with this mass.")
    fraction: float = Field(
        1.0,
        ge=0,
        le=1,
        description="GKD's lambda: the share of batches sampled from the student; the rest train on the "
        "dataset's own completions (off-policy), with the same loss.",
    )
    estimator: Literal["full", "sampled"] = Field(
        "full",
        description="full: the divergence over the whole vocabulary at each sampled position; sampled: the "
        "reverse KL estimated from the sampled tokens alone (log q − log p of each, as a per-token reward), "
        "which needs only the teacher's log-prob of each sampled token.",
    )
    eval_prompts: int = Field(
        16,
        ge=1,
        le=4096,
        description="Held-out prompts whose student samples give `val_reverse_kl` at each evaluation.",
    )
    samples_shown: int = Field(
        3, ge=0, le=32, description="Sampled completions shown in the `samples` event of each evaluation."
    )


class WeightingSpec(_Spec):
    """How `teacher_weighting: confidence` and `learned` weigh the teachers of each instance (README:
    Several teachers). The teachers' `weight`s are the prior both start from."""

    temperature: float = Field(
        1.0,
        gt=0,
        le=100,
        description="confidence: w_i ∝ weight_i · exp(mean log p_i(reference token) / temperature); 1 weighs each "
        "teacher by the inverse of its perplexity on the instance, higher is flatter.",
    )
    learning_rate: float = Field(1e-3, gt=0, le=1, description="learned: the teacher gate's Adam learning rate.")
    balance: float = Field(
        0.1,
        ge=0,
        le=100,
        description="learned: weight of the regulariser KL(prior ‖ mean gate weights) that keeps the gate from "
        "collapsing onto one teacher for every instance.",
    )


class OutputSpec(_Spec):
    fuse: bool = Field(False, description="Also write the student with the adapter fused in (`fused/`).")


class TeacherCacheSpec(_Spec):
    teacher: str
    data: str
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=4096)
    max_seq_len: int = Field(DEFAULT_MAX_SEQ_LEN, ge=8, le=131072)


class BenchmarkCandidate(_Spec):
    """One row of a benchmark: a model, a model + adapter, or the student of a distill job (before or after)."""

    label: str = Field(min_length=1, max_length=100)
    model: str | None = Field(
        None,
        description="Model id, or a local folder / GGUF path. Leave it out with "
        "`adapter: <distill job id>` to use that job's own student (its pruned `student/`).",
    )
    adapter: str | None = Field(None, description="A distill job id (or adapter folder) whose adapter is applied.")
    student_of: str | None = Field(
        None,
        description="A distill job id: its student as it was before training "
        "(the `student/` folder it built, or its student model).",
    )

    @model_validator(mode="after")
    def _one_base(self) -> BenchmarkCandidate:
        if self.student_of is not None and (self.model is not None or self.adapter is not None):
            raise ValueError("student_of names the whole candidate; leave model and adapter out")
        if self.model is None and self.adapter is None and self.student_of is None:
            raise ValueError("name a model, an adapter (distill job), or student_of")
        return self


class BenchmarkData(_Spec):
    text: str | None = Field(None, description="Dataset for KL, top-1/top-5 agreement and perplexity vs the reference.")
    mcq: str | None = Field(None, description="Multiple-choice dataset (`mcq` format): accuracy.")
    preference: str | None = Field(None, description="Preference dataset: how often `chosen` outscores `rejected`.")
    prompts: str | None = Field(
        None,
        description="Prompts (`prompts`, `completions` or `chat` data: what comes before the first reply): each "
        "candidate writes completions, the reference scores them: the reverse KL on the candidate's own samples.",
    )

    @model_validator(mode="after")
    def _at_least_one(self) -> BenchmarkData:
        if self.text is None and self.mcq is None and self.preference is None and self.prompts is None:
            raise ValueError("name at least one of text, mcq, preference, prompts")
        return self


class BenchmarkSpeed(_Spec):
    """Generation speed and memory, each model measured alone (mlx-lm's `stream_generate`, greedy)."""

    enabled: bool = Field(True, description="Measure prefill/decode tokens per second and peak memory.")
    prompt_tokens: int = Field(128, ge=1, le=131072, description="Prompt length for the prefill measurement.")
    decode_tokens: int = Field(64, ge=1, le=16384, description="Tokens generated for the decode measurement.")
    repeats: int = Field(1, ge=1, le=20, description="Measured runs per model (after one warm-up); the median is kept.")


class BenchmarkSamples(_Spec):
    """How candidates write their completions of `data.prompts` (the same key for every candidate)."""

    max_new_tokens: int = Field(64, ge=1, le=16384, description="Longest completion per prompt.")
    temperature: float = Field(1.0, ge=0, le=10, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_prompts: int = Field(32, ge=1, le=4096, description="Prompts used (the first ones).")


class BenchmarkSpec(_Spec):
    """Candidates (e.g. a distilled student) measured against a reference model on held-out data."""

    reference: str = Field(description="The reference (teacher) model id or path.")
    candidates: list[BenchmarkCandidate] = Field(min_length=1, max_length=16)
    data: BenchmarkData
    max_seq_len: int = Field(
        DEFAULT_MAX_SEQ_LEN,
        ge=8,
        le=131072,
        description="Longer texts are cut into "
        "windows; longer multiple-choice / preference prompts keep their last tokens.",
    )
    batch_size: int = Field(4, gt=0, le=1024, description="Sequences per forward pass.")
    max_examples: int | None = Field(None, gt=0, description="Use at most the first N records of each dataset.")
    speed: BenchmarkSpeed = Field(default_factory=BenchmarkSpeed)
    samples: BenchmarkSamples = Field(default_factory=BenchmarkSamples)

    @field_validator("candidates")
    @classmethod
    def _unique_labels(cls, v: list[BenchmarkCandidate]) -> list[BenchmarkCandidate]:
        seen: set[str] = set()
        for c in v:
            if c.label in seen:
                raise ValueError(f"duplicate candidate label {c.label!r}; labels name the report's rows")
            seen.add(c.label)
        return v


MAX_PROMPT_CHARS = 100_000  # of a generate job's prompt


class GenerateMessage(_Spec):
    """One turn of a chat prompt, as the model's chat template takes it."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


_MESSAGES: TypeAdapter[list[GenerateMessage]] = TypeAdapter(list[GenerateMessage])


class GenerateSpec(_Spec):
    """The playground: one prompt, and each model's answer to it (loaded one at a time), side by side.

    `models` take the benchmark's candidate shape: a model, a model + a distill job's adapter, `adapter: <job>`
    alone (that job's student with its adapter: the distilled student) or `student_of: <job>` (the student
    before training). A job that has not succeeded yet makes this one wait for it."""

    prompt: str | list[GenerateMessage] = Field(
        description="A text the models continue as it is, or chat messages rendered with each model's chat "
        "template (with the generation prompt; the messages' contents one after another where it has none)."
    )
    models: list[BenchmarkCandidate] = Field(min_length=1, max_length=8, description="The models that answer.")
    max_tokens: int = Field(128, ge=1, le=MAX_GENERATE_TOKENS, description="Longest answer, in tokens.")
    temperature: float = Field(0.0, ge=0, le=10, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of this mass.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="The sampling key: a rerun writes the same answers.")

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _not_empty(cls, v: Any, handler: ValidatorFunctionWrapHandler) -> str | list[GenerateMessage]:
        # checked here rather than by the union, whose errors would name its members (`prompt.str`)
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("the prompt is empty")
            if len(v) > MAX_PROMPT_CHARS:
                raise ValueError(f"the prompt is {len(v)} characters; at most {MAX_PROMPT_CHARS}")
            return v
        if not isinstance(v, list):
            raise ValueError("must be a string or a list of messages ({role, content})")
        if not v:
            raise ValueError("the prompt is an empty list of messages")
        if len(v) > 64:
            raise ValueError(f"the prompt has {len(v)} messages; at most 64")
        try:
            messages = _MESSAGES.validate_python(v)
        except ValidationError as e:
            err = e.errors()[0]
            raise ValueError(f"message {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
        if not any(m.content.strip() for m in messages):
            raise ValueError("every message of the prompt is empty")
        if sum(len(m.content) for m in messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold more than {MAX_PROMPT_CHARS} characters")
        return messages

    @field_validator("models")
    @classmethod
    def _unique_labels(cls, v: list[BenchmarkCandidate]) -> list[BenchmarkCandidate]:
        seen: set[str] = set()
        for c in v:
            if c.label in seen:
                raise ValueError(f"duplicate label {c.label!r}; labels name the answers")
            seen.add(c.label)
        return v


class EvaluateSpec(_Spec):
    """A benchmark run as a child job once the distillation succeeds: the distilled student ("distilled") and,
    unless `baseline` is false, the student before training ("student (before)"), against the first teacher."""

    data: BenchmarkData
    baseline: bool = Field(True, description="Also measure the student as it was before training.")
    candidates: list[BenchmarkCandidate] = Field(
        default_factory=list, max_length=14, description="More rows, e.g. an SFT job's adapter."
    )
    max_seq_len: int | None = Field(None, ge=8, le=131072, description="Default: the training max_seq_len.")
    batch_size: int = Field(4, gt=0, le=1024)
    max_examples: int | None = Field(None, gt=0)
    speed: BenchmarkSpeed = Field(default_factory=BenchmarkSpeed)
    samples: BenchmarkSamples = Field(default_factory=BenchmarkSamples)

    @field_validator("candidates")
    @classmethod
    def _free_labels(cls, v: list[BenchmarkCandidate]) -> list[BenchmarkCandidate]:
        for c in v:
            if c.label in EVALUATE_LABELS:
                raise ValueError(f"label {c.label!r} is taken by the evaluation's own rows")
        return v


PresetName = Literal["fast", "quality", "memory"]

# What a preset fills in (only fields the spec leaves out). Costs, relative to the defaults, are in the README.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "fast": {  # fewer adapter weights, a shorter context, a smaller cache, a quick rate search
        "adapter": {"rank": 8, "scale": 20.0},
        "loss": {"top_k": 32},
        "training": {
            "batch_size": 8,
            "max_seq_len": 256,
            "learning_rate": "auto",
            "lr_search": {"rates": [3e-5, 1e-4, 3e-4], "steps": 4},
        },
    },
    "quality": {  # a larger adapter, more of the teacher's distribution, longer contexts, a wider search
        "adapter": {"rank": 32, "scale": 20.0},
        "loss": {"top_k": 128},
        "training": {
            "batch_size": 4,
            "grad_accum": 2,
            "max_seq_len": 512,
            "learning_rate": "auto",
            "lr_search": {"rates": [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4]},
        },
    },
    "memory": {  # one sequence at a time (gradients accumulated), short contexts, a small adapter and cache
        "adapter": {"rank": 8, "scale": 20.0},
        "loss": {"top_k": 32},
        "training": {"batch_size": 1, "grad_accum": 8, "max_seq_len": 256, "learning_rate": "auto"},
    },
}


def apply_preset(raw: dict) -> dict:
    """The raw spec with its preset's values filled in wherever the spec leaves a field out."""
    preset = raw.get("preset")
    if not isinstance(preset, str) or preset not in PRESETS:
        return raw
    out = dict(raw)
    for section, values in PRESETS[preset].items():
        given = out.get(section, {})
        if not isinstance(given, dict):
            continue  # a wrong type is reported by validation
        merged = dict(given)
        for key, value in values.items():
            if key not in merged:
                merged[key] = dict(value) if isinstance(value, dict) else value
            elif isinstance(value, dict) and isinstance(merged[key], dict):
                merged[key] = {**value, **merged[key]}
        out[section] = merged
    return out


class DistillSpec(_Spec):
    preset: PresetName | None = Field(
        None,
        description="Defaults for the adapter, loss and training fields the "
        "spec leaves out: `fast`, `quality` or `memory` (README: Presets).",
    )
    student: StudentSpec
    teachers: list[TeacherSpec] = Field(min_length=1, max_length=8)
    teacher_mode: Literal["offline", "online", "on_policy"] = Field(
        "offline",
        description="offline: a teacher cache first; online: the teacher in the loop on the dataset; on_policy: "
        "the teacher in the loop on the student's own samples (`on_policy`).",
    )
    on_policy: OnPolicySpec = Field(default_factory=OnPolicySpec)
    teacher_weighting: Literal["fixed", "confidence", "learned"] = Field(
        "fixed",
        description="fixed: the teachers' `weight`s; confidence: per instance, from each teacher's own likelihood "
        "of it (from the cache, offline too); learned: per instance, a gate trained with the student on that "
        "signal and the instance's content (`weighting`).",
    )
    weighting: WeightingSpec = Field(default_factory=WeightingSpec)
    data: DataSpec
    loss: LossSpec = Field(default_factory=LossSpec)
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    evaluate: EvaluateSpec | None = Field(None, description="Benchmark the result in a child job when it succeeds.")

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        return apply_preset(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _quantized_student_trains_an_adapter(self) -> DistillSpec:
        q = self.student.quantize
        if q is not None and self.adapter.type == "full":
            raise ValueError(
                "adapter.type: full cannot train a quantized student (student.quantize); "
                "use lora or dora, which train on top of the quantized weights"
            )
        if self.teacher_mode == "on_policy" and self.on_policy.estimator == "sampled":
            kinds = {self.loss.kind} | {s.loss.kind for s in self.training.stages if s.loss and s.loss.kind}
            if kinds != {"reverse_kl"}:
                raise ValueError(
                    "on_policy.estimator: sampled estimates the reverse KL from the sampled tokens alone; "
                    "loss.kind (and every stage's) must be reverse_kl, or use estimator: full"
                )
        hint = self.loss.hidden
        if hint is not None and self.teacher_mode != "online":
            raise ValueError(
                "loss.hidden needs the teacher's hidden states, which only a teacher in the loop gives: use "
                f"teacher_mode: online (a teacher cache holds its top-k log-probs only; got {self.teacher_mode})"
            )
        if hint is not None and hint.teacher >= len(self.teachers):
            raise ValueError(f"loss.hidden.teacher: {hint.teacher} but the spec has {len(self.teachers)} teacher(s)")
        if self.loss.preference is not None and self.data.preference is None:
            raise ValueError("loss.preference needs data.preference: a dataset of {prompt, chosen, rejected} pairs")
        if self.teacher_weighting != "fixed" and len(self.teachers) < 2:
            raise ValueError(
                f"teacher_weighting: {self.teacher_weighting} weighs several teachers against each other; "
                "with one teacher use fixed (the default)"
            )
        if q is not None and self.adapter.type == "dora" and q.bits in (3, 5, 6):
            raise ValueError(
                f"adapter.type: dora on {q.bits}-bit weights is not supported by mlx-lm; use 2, 4 or 8 bits, or lora"
            )
        return self


# The spec model of each job kind.
CompareArm = Literal["single", "equal", "confidence", "learned"]
COMPARE_ARMS: tuple[CompareArm, ...] = ("single", "equal", "confidence", "learned")


class CompareSpec(_Spec):
    """One distillation (`base`) run several ways on the same data, steps and seed, as child distill jobs, and
    one table of their results (README: Several teachers). Arms: `single` (one run per teacher, that teacher
    alone), `equal` (every teacher, equal fixed weights), `confidence` and `learned` (teacher_weighting). With
    `base.evaluate` each arm also gets its benchmark, and the table has its numbers."""

    base: DistillSpec
    arms: list[CompareArm] = Field(default_factory=lambda: list(COMPARE_ARMS), min_length=1, max_length=4)
    domains: dict[str, str] | None = Field(
        None,
        description="Held-out text per domain (name: dataset id or path): each arm's student is scored on each, "
        "the KL to every teacher (full vocabulary) and its perplexity, with the teachers' own perplexity there.",
    )

    @model_validator(mode="after")
    def _several_teachers(self) -> CompareSpec:
        if len(set(self.arms)) != len(self.arms):
            raise ValueError("arms: each arm once")
        if len(self.base.teachers) < 2:
            raise ValueError("base.teachers: a comparison of teacher weightings needs two or more teachers")
        if self.domains is not None and not 1 <= len(self.domains) <= 8:
            raise ValueError("domains: name 1 to 8 held-out datasets")
        if self.domains and any(not k.strip() or len(k) > 40 for k in self.domains):
            raise ValueError("domains: each name non-empty, at most 40 characters")
        return self


def compare_arms(spec: CompareSpec) -> list[tuple[str, dict]]:
    """(arm name, its distill spec as JSON) for each arm of a comparison, in order."""
    base = spec.base.model_dump(mode="json", exclude_none=True)
    arms: list[tuple[str, dict]] = []
    for arm in spec.arms:
        if arm == "single":
            for i, teacher in enumerate(base["teachers"]):
                only = {**base, "teachers": [{**teacher, "weight": 1.0}], "teacher_weighting": "fixed"}
                hint = base["loss"].get("hidden")
                if hint is not None:  # hints read one teacher's layers: kept for that teacher's own arm only
                    loss = {k: v for k, v in base["loss"].items() if k != "hidden"}
                    only["loss"] = {**loss, "hidden": {**hint, "teacher": 0}} if hint["teacher"] == i else loss
                arms.append((f"teacher {i}", only))
        elif arm == "equal":
            equal = [{**t, "weight": 1.0} for t in base["teachers"]]
            arms.append(("equal", {**base, "teachers": equal, "teacher_weighting": "fixed"}))
        else:
            arms.append((arm, {**base, "teacher_weighting": arm}))
    return arms


SPEC_MODELS: dict[str, type[_Spec]] = {
    DISTILL: DistillSpec,
    TEACHER_CACHE: TeacherCacheSpec,
    BENCHMARK: BenchmarkSpec,
    GENERATE: GenerateSpec,
    COMPARE: CompareSpec,
}
