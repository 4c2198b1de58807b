"""Pre-flight: everything that can be checked before any compute, each failure a clear `UserError`.

Tokenizer compatibility, chat templates, dataset validation and a memory estimate against what the machine
has. Cheap by design: tokenizers and safetensors headers only, no weights loaded.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

from . import data as data_mod
from . import models
from .errors import UserError
from .spec import DistillSpec

GiB = 1 << 30


def count_parameters(model_dir: Path) -> int:
    """Parameter count from the safetensors headers (no tensor is read)."""
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                size = 1
                for d in info["shape"]:
                    size *= d
                total += size
    return total


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
    if spec.student.keep_layers:
        keep = len(spec.student.keep_layers) / max(cfg.get("num_hidden_layers", 1), 1)
        embed = cfg.get("vocab_size", 0) * cfg.get("hidden_size", 0) * (1 if cfg.get("tie_word_embeddings", True) else 2)
        p_student = embed + int((p_student - embed) * keep)
    b, seq = spec.training.batch_size, spec.training.max_seq_len
    hidden, layers, vocab = cfg.get("hidden_size", 0), cfg.get("num_hidden_layers", 0), cfg.get("vocab_size", 0)
    if spec.student.keep_layers:
        layers = len(spec.student.keep_layers)
    trainable = p_student if spec.adapter.type == "full" else 0
    est = {
        "student_weights": 4 * p_student,
        "optimizer_and_grads": 12 * trainable + 12 * (p_student // 50 if spec.adapter.type != "full" else 0),
        # per token: ~34 saved activations of width `hidden` per layer, and ~4 vocab-wide float32 arrays
        # (logits, their softmax, the gradient, the loss's temporaries)
        "activations": 4 * b * seq * (34 * hidden * layers + 4 * vocab),
    }
    if spec.teacher_mode == "online":
        est["teacher_weights"] = sum(4 * count_parameters(t) for t in teacher_dirs)
        est["teacher_logits"] = 4 * b * seq * vocab * len(teacher_dirs)
    est["total"] = sum(est.values())
    return est


def check_memory(spec: DistillSpec, student_dir: Path, teacher_dirs: list[Path]) -> dict[str, int]:
    est = memory_estimate(spec, student_dir, teacher_dirs)
    have = available_memory()
    if os.environ.get("DISTILLERY_SKIP_MEMORY_CHECK") != "1" and est["total"] > 0.9 * have:
        parts = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in est.items() if k != "total")
        raise UserError(f"not enough memory: the run needs about {est['total'] / GiB:.1f} GiB ({parts}) and "
                        f"{have / GiB:.1f} GiB is available; lower training.batch_size or training.max_seq_len"
                        + (", or use teacher_mode: offline" if spec.teacher_mode == "online" else ""))
    return {**est, "available": have}


def check_chat_template(fmt: str, tokenizer, name: str, dataset: Path) -> None:
    if data_mod.needs_chat_template(fmt) and not getattr(tokenizer, "has_chat_template", False) \
            and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{dataset.name} is chat data but {name} has no chat template "
                        f"(add `chat_template` to its tokenizer_config.json)")


def check_models(student_dir: Path, teacher_dirs: list[Path]):
    """Load the tokenizers and check each teacher against the student. Returns the student's tokenizer."""
    student_tok = models.load_tokenizer(student_dir)
    for t in teacher_dirs:
        models.check_tokenizers(models.load_tokenizer(t), student_tok, f"teacher {t.name}", f"student {student_dir.name}")
    return student_tok
