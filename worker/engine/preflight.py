"""Pre-flight: everything that can be checked before any compute, each failure a clear `UserError`.

Tokenizer compatibility, chat templates, dataset validation and a memory estimate against what the machine
has. Cheap by design: tokenizers and safetensors headers only, no weights loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

from distillery_contract.specs import DistillSpec

from . import data as data_mod
from . import models
from .errors import ResourceError, UserError

GiB = 1 << 30


def _tensor_shapes(model_dir: Path, with_dtype: bool = False):
    """(name, shape[, dtype]) of every tensor, from the safetensors headers (no tensor is read)."""
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                yield (name, info["shape"], info["dtype"]) if with_dtype else (name, info["shape"])


def _size(shape) -> int:
    size = 1
    for d in shape:
        size *= d
    return size


def count_parameters(model_dir: Path) -> int:
    """Parameter count from the safetensors headers (no tensor is read)."""
    return sum(_size(shape) for _, shape in _tensor_shapes(model_dir))


def count_unpacked_quantized(model_dir: Path, bits: int) -> int:
    """Weights held in an already-quantized folder's packed uint32 matrices."""
    return sum(
        _size(shape) * 32 // bits
        for name, shape, dtype in _tensor_shapes(model_dir, with_dtype=True)
        if dtype == "U32" and name.endswith(".weight")
    )


def count_quantizable(model_dir: Path, group_size: int) -> int:
    """Weights `student.quantize` quantizes: the matrices (linear and embedding weights) whose rows split into
    groups of `group_size`."""
    return sum(
        _size(shape)
        for name, shape in _tensor_shapes(model_dir)
        if name.endswith(".weight") and len(shape) == 2 and shape[-1] % group_size == 0
    )


def available_memory() -> int:
    """Bytes the run may use: the GPU's recommended working set on Metal, MemAvailable on Linux."""
    try:
        import mlx.core as mx

        if mx.default_device() == mx.gpu and sys.platform == "darwin":
            info = mx.device_info()
            return int(info.get("max_recommended_working_set_size") or info["memory_size"])
    except Exception:  # no MLX GPU info: fall back to the OS view
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_estimate(spec: DistillSpec, student_dir: Path, teacher_dirs: list[Path]) -> dict[str, int]:
    """A deliberately simple upper-ish estimate of peak bytes during training (float32 compute)."""
    cfg = json.loads((student_dir / "config.json").read_text())
    p_student = count_parameters(student_dir)
    q = spec.student.quantize
    p_quant = count_quantizable(student_dir, q.group_size) if q is not None else 0
    embed = cfg.get("vocab_size", 0) * cfg.get("hidden_size", 0) * (1 if cfg.get("tie_word_embeddings", True) else 2)
    if spec.student.keep_layers:
        keep = len(spec.student.keep_layers) / max(cfg.get("num_hidden_layers", 1), 1)
        p_student = embed + int((p_student - embed) * keep)
        p_quant = min(embed, p_quant) + int(max(p_quant - embed, 0) * keep) if p_quant else 0
    b, seq = spec.training.batch_size, spec.training.max_seq_len
    hidden, layers, vocab = cfg.get("hidden_size", 0), cfg.get("num_hidden_layers", 0), cfg.get("vocab_size", 0)
    if spec.student.keep_layers:
        layers = len(spec.student.keep_layers)
    trainable = p_student if spec.adapter.type == "full" else 0
    # a quantized student: bits/8 bytes per quantized weight plus a float32 scale and bias per group
    # (the rest, e.g. norms, stays float32)
    student_bytes = (
        4 * (p_student - p_quant) + p_quant * q.bits // 8 + 8 * p_quant // q.group_size
        if q is not None
        else 4 * p_student
    )
    est = {
        "student_weights": student_bytes,
        "optimizer_and_grads": 12 * trainable + 12 * (p_student // 50 if spec.adapter.type != "full" else 0),
        # per token: ~34 saved activations of width `hidden` per layer, and ~4 vocab-wide float32 arrays
        # (logits, their softmax, the gradient, the loss's temporaries)
        "activations": 4 * b * seq * (34 * hidden * layers + 4 * vocab),
    }
    given = models.quantization_of(cfg)  # a student that is quantized already (student.quantize refuses it)
    if q is None and given is not None and isinstance(given.get("bits"), int):
        p_quant = count_unpacked_quantized(student_dir, given["bits"])
        if spec.student.keep_layers:
            p_quant = int(p_quant * len(spec.student.keep_layers) / max(cfg.get("num_hidden_layers", 1), 1))
    if p_quant and (spec.adapter.type == "dora" or _on_cpu()):
        # DoRA layers, and the CPU's dequantize-then-matmul layers (models.DequantizedLinear), dequantize their
        # weights in the forward pass and the backward keeps those float32 matrices
        est["dequantized_weights"] = 4 * p_quant
    if spec.teacher_mode in ("online", "on_policy"):  # teachers at full precision, whatever the student's
        est["teacher_weights"] = sum(4 * count_parameters(t) for t in teacher_dirs)
        est["teacher_logits"] = 4 * b * seq * vocab * len(teacher_dirs)
    if spec.teacher_mode == "on_policy":  # the student's KV cache while it samples, float32 keys and values
        kv_heads = int(cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or 1)
        head_dim = int(cfg.get("head_dim") or hidden // max(int(cfg.get("num_attention_heads") or 1), 1))
        est["generation_cache"] = 2 * 4 * layers * kv_heads * head_dim * b * seq
    est["total"] = sum(est.values())
    return est


def _on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def check_memory(spec: DistillSpec, student_dir: Path, teacher_dirs: list[Path]) -> dict[str, int]:
    est = memory_estimate(spec, student_dir, teacher_dirs)
    have = available_memory()
    if os.environ.get("DISTILLERY_SKIP_MEMORY_CHECK") != "1" and est["total"] > 0.9 * have:
        parts = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in est.items() if k != "total")
        raise UserError(
            f"not enough memory: the run needs about {est['total'] / GiB:.1f} GiB ({parts}) and "
            f"{have / GiB:.1f} GiB is available; lower training.batch_size or training.max_seq_len"
            + (", or use teacher_mode: offline" if spec.teacher_mode == "online" else "")
            + (", on_policy.max_new_tokens" if spec.teacher_mode == "on_policy" else "")
        )
    return {**est, "available": have}


DISK_MARGIN = 1.1  # what a run writes, plus this fraction, plus DISK_SLACK must be free
DISK_SLACK = 64 << 20


def check_disk(path: Path, needed: int, what: str) -> dict[str, int]:
    """Refuse to start writing `needed` bytes under `path` when its filesystem has not got them free: a run
    that fills the disk halfway fails later anyway, and leaves every job after it short of space."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if os.environ.get("DISTILLERY_SKIP_DISK_CHECK") != "1" and free < needed * DISK_MARGIN + DISK_SLACK:
        raise ResourceError(
            f"not enough disk space in {path}: {what} needs about {_human(needed)} and "
            f"{_human(free)} is free; free some space (e.g. delete finished jobs' files with "
            "DELETE /v1/jobs/{id}/files) and submit again"
        )
    return {"needed": needed, "free": free}


def run_disk_estimate(spec: DistillSpec, trainable: int, parameters: int, student_dir: Path) -> dict[str, int]:
    """Bytes a distill run writes into its folder once the student is built: checkpoints (weights and AdamW's
    two moments of every trainable parameter, float32) as many as are kept at once, the adapter, `fused/`."""
    checkpoint = 12 * trainable
    kept = spec.training.keep_checkpoints + 3  # + the best (two versions while it moves) + one being written
    est = {"checkpoints": checkpoint * kept, "adapter": 4 * trainable}
    if spec.output.fuse:
        on_disk = sum(f.stat().st_size for f in student_dir.glob("*.safetensors"))
        est["fused"] = (
            max(on_disk, 2 * parameters)
            if models.quantization_of(json.loads((student_dir / "config.json").read_text()))
            else on_disk
        )
    est["total"] = sum(est.values())
    return est


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_student(spec: DistillSpec, student_dir: Path, adapter_dir: Path | None = None) -> None:
    """What the student spec refuses that the spec alone cannot tell (e.g. `student.quantize` on a model that is
    already quantized, or a group size its layers do not split into): config files and shapes, no weights."""
    from . import student as student_mod

    student_mod.check_quantize(spec.student, spec.adapter, student_dir, adapter_dir)


def check_chat_template(fmt: str, tokenizer, name: str, dataset: Path) -> None:
    if (
        data_mod.needs_chat_template(fmt)
        and not getattr(tokenizer, "has_chat_template", False)
        and not getattr(tokenizer, "chat_template", None)
    ):
        raise UserError(
            f"{dataset.name} is chat data but {name} has no chat template "
            f"(add `chat_template` to its tokenizer_config.json)"
        )


def uses_chat_template(ds) -> bool:
    """Whether training renders the dataset with the chat template: chat data, or prompts given as messages."""
    if data_mod.needs_chat_template(ds.format):
        return True
    return ds.format == "prompts" and any(isinstance(r.get("prompt"), list) for r in ds.records)


def check_templates(student_dir: Path, teacher_dirs: list[Path]) -> None:
    """Data rendered with the student's chat template is what every teacher scores: each teacher must use the
    same template (a teacher reading another family's turn markers scores text unlike any it was trained on)."""
    student = getattr(models.load_tokenizer(student_dir), "chat_template", None)
    for t in teacher_dirs:
        theirs = getattr(models.load_tokenizer(t), "chat_template", None)
        if theirs != student:
            raise UserError(
                f"teacher {t.name} and student {student_dir.name} have different chat templates, and this data is "
                "rendered with the student's: the teacher would score turns marked as it was never trained on. "
                "Use a teacher and student of one family, or give both the same `chat_template` in "
                "tokenizer_config.json"
            )


def check_models(student_dir: Path, teacher_dirs: list[Path]):
    """Load the tokenizers and check each teacher against the student. Returns the student's tokenizer."""
    student_tok = models.load_tokenizer(student_dir)
    for t in teacher_dirs:
        models.check_tokenizers(
            models.load_tokenizer(t), student_tok, f"teacher {t.name}", f"student {student_dir.name}"
        )
    return student_tok
