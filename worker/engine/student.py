"""The student: base model, optional depth pruning and starting adapter, then LoRA / DoRA / full training.

Adapters go through mlx-lm's own tuner (`linear_to_lora_layers`, `load_adapters`), so what we save is what
`mlx_lm.load(student, adapter_path=...)` expects.

With `student.quantize` the (pruned) student is affine-quantized by mlx-lm's `quantize_model` before the adapter
is put on it (QLoRA): the run writes that quantized model as `student/`, and LoRA / DoRA train on top of the
quantized weights, the same layers `mlx_lm.load(student/, adapter_path=...)` rebuilds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tuner.dora import DoRAEmbedding
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

from distillery_contract.specs import AdapterSpec, ParamGroup, StudentSpec

from . import models
from .errors import UserError
from .mlx_typed import flat_arrays


@dataclass
class Student:
    model: nn.Module
    tokenizer: TokenizerWrapper
    config: dict
    path: Path  # the folder the adapter loads onto (the source, or the pruned/quantized `student/` we wrote)
    adapter_config: dict  # adapter_config.json as mlx-lm reads it


def adapter_config(adapter: AdapterSpec, num_layers: int) -> dict:
    cfg: dict[str, Any] = {
        "fine_tune_type": adapter.type,
        "num_layers": num_layers if adapter.layers == -1 else adapter.layers,
        "lora_parameters": {"rank": adapter.rank, "scale": adapter.scale, "dropout": adapter.dropout},
    }
    if adapter.keys:
        cfg["lora_parameters"]["keys"] = list(adapter.keys)
    return cfg


def build_student(
    spec: StudentSpec,
    adapter: AdapterSpec,
    model_path: Path,
    out_dir: Path,
    adapter_path: Path | None = None,
    adapter_fields_set: set[str] | None = None,
) -> Student:
    """Load, prune, quantize (writing `out_dir/student/` when pruned or quantized), apply the starting adapter
    or a fresh one."""
    start_cfg: dict = json.loads((adapter_path / "adapter_config.json").read_text()) if adapter_path is not None else {}
    check_quantize(spec, adapter, model_path, adapter_path)
    model, tokenizer, config = models.load_model(model_path)
    model.freeze()
    path = model_path
    if adapter_path is not None:
        _check_starting_adapter(start_cfg, adapter, adapter_fields_set or set())
        # applies its LoRA layers and weights (frozen for now)
        load_adapter(
            model, adapter_path, f"student.adapter: {adapter_path.name} does not fit student model {model_path.name}"
        )
        acfg = start_cfg
    dtype = models.source_dtype(model_path)
    if spec.keep_layers is not None:
        if adapter_path is not None and start_cfg.get("fine_tune_type") == "full":
            raise UserError("student.keep_layers cannot be combined with a full fine-tuning starting adapter")
        config = models.prune_layers(model, config, spec.keep_layers)
    if spec.quantize is not None:
        config = _quantize_base(model, config, spec.quantize, dtype)
    if spec.keep_layers is not None or spec.quantize is not None:
        path = out_dir / "student"
        _save_base(model, config, model_path, path, dtype)
    models.dequantized_compute(model)  # a quantized student (ours or given) at OpenBLAS speed on the CPU
    n_layers = len(model.layers)
    if adapter_path is None:
        acfg = adapter_config(adapter, n_layers)
        if acfg["num_layers"] > n_layers:
            raise UserError(f"adapter.layers: {adapter.layers} > the student's {n_layers} layers")
        if adapter.type in ("lora", "dora"):
            try:
                linear_to_lora_layers(
                    model, acfg["num_layers"], acfg["lora_parameters"], use_dora=adapter.type == "dora"
                )
            except ValueError as e:
                raise UserError(f"adapter: {e}") from None
    else:  # after pruning, the adapted layers are the kept ones from the first adapted layer on
        adapted = [
            i for i, layer in enumerate(model.layers) if any(hasattr(m, "lora_a") for _, m in layer.named_modules())
        ]
        acfg = dict(acfg, num_layers=n_layers - adapted[0] if adapted else n_layers)
    if spec.quantize is not None:
        _check_quantized_adapters(model)
    unfreeze_trainable(model, acfg)
    mx.eval(model.parameters())
    return Student(model=model, tokenizer=tokenizer, config=config, path=path, adapter_config=acfg)


# DoRALinear.from_base (mlx-lm 0.32) recovers a quantized layer's input size as packed * (32 // bits), which is
# only right when bits divides 32: with 3, 5 or 6 bits its lora_a has the wrong shape (also in `mlx_lm.load`).
DORA_QUANTIZE_BITS = (2, 4, 8)


def check_quantize(spec: StudentSpec, adapter: AdapterSpec, model_path: Path, adapter_path: Path | None) -> None:
    """What `student.quantize` cannot be combined with, from config files and the model's shapes alone (no weight
    is loaded): pre-flight runs it before any compute, `build_student` again."""
    q = spec.quantize
    if q is None:
        return
    start_cfg = json.loads((adapter_path / "adapter_config.json").read_text()) if adapter_path is not None else None
    already = models.quantization_of(models.read_config(model_path))
    if already is not None:
        raise UserError(
            f"student.quantize: student model {model_path.name} is already quantized at "
            f"{already.get('bits', '?')} bits (group size {already.get('group_size', '?')}); "
            "give its full-precision model, or drop student.quantize to train an adapter on it as is"
        )
    kind = start_cfg.get("fine_tune_type", "lora") if start_cfg is not None else adapter.type
    if kind == "full":
        field = "student.adapter" if start_cfg is not None else "adapter.type"
        what = "a full fine-tuning starting adapter" if start_cfg is not None else "full"
        raise UserError(
            f"{field}: {what} cannot be combined with student.quantize: quantized weights do not "
            "train; use a lora or dora adapter on the quantized student"
        )
    if kind == "dora" and q.bits not in DORA_QUANTIZE_BITS:
        field = "student.adapter" if start_cfg is not None and adapter.type != "dora" else "adapter.type"
        raise UserError(
            f"{field}: dora on a {q.bits}-bit student is not supported by mlx-lm (its DoRA layer "
            f"gets the input size of 3/5/6-bit layers wrong); use student.quantize.bits 2, 4 or 8, "
            "or a lora adapter"
        )
    models.check_group_size(models.skeleton(model_path), q.group_size)


def _quantize_base(model: nn.Module, config: dict, q, dtype: mx.Dtype) -> dict:
    """Quantize the base layers; a starting adapter's LoRA/DoRA layers keep wrapping them, as when mlx-lm loads
    that adapter onto the quantized folder."""
    wrapped = [(name, m, attr) for name, m in model.named_modules() if (attr := _base_attr(m))]
    if wrapped:  # quantize the plain model, so paths (and the model's quant_predicate) are what mlx-lm sees
        model.update_modules(tree_unflatten([(name, m[attr]) for name, m, attr in wrapped]))
    config = models.quantize(model, config, bits=q.bits, group_size=q.group_size, storage_dtype=dtype)
    if wrapped:
        modules = dict(model.named_modules())
        for name, m, attr in wrapped:
            setattr(m, attr, modules[name])  # plain attribute: a DoRA layer keeps its loaded magnitude `m`
        model.update_modules(tree_unflatten([(name, m) for name, m, _ in wrapped]))
    return config


def _base_attr(module: nn.Module) -> str | None:
    """The attribute an mlx-lm LoRA/DoRA layer keeps its base layer in, or None for other modules."""
    if "lora_a" not in module:
        return None
    return next((a for a in ("linear", "embedding") if a in module and isinstance(module[a], nn.Module)), None)


def _check_quantized_adapters(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, DoRAEmbedding) and isinstance(m.embedding, nn.QuantizedEmbedding):
            raise UserError(
                f"adapter.keys: dora cannot adapt the quantized embedding {name} (mlx-lm's DoRA "
                "embedding has no quantized form); use lora, or leave embeddings out of adapter.keys"
            )


def load_adapter(model: nn.Module, adapter_dir: Path, refusal: str) -> None:
    """mlx-lm's `load_adapters`; an adapter that does not fit the model is the user's to fix: a UserError that
    starts with `refusal` and lists the first mismatched tensors (mlx-lm names every one)."""
    try:
        load_adapters(model, str(adapter_dir))
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        head, *lines = str(e).splitlines() or [type(e).__name__]
        lines = [head, *sorted(lines)]
        if len(lines) > 6:
            lines = lines[:6] + [f"  ... and {len(lines) - 6} more"]
        raise UserError(f"{refusal}: " + "\n".join(lines)) from None


def _check_starting_adapter(start: dict, adapter: AdapterSpec, fields_set: set[str]) -> None:
    """A starting adapter fixes the adapter's shape; explicitly asking for another shape is a contradiction."""
    lora = start.get("lora_parameters", {})
    theirs = {"type": start.get("fine_tune_type", "lora"), "rank": lora.get("rank"), "scale": lora.get("scale")}
    for field in ("type", "rank", "scale"):
        if field in fields_set and theirs[field] is not None and getattr(adapter, field) != theirs[field]:
            raise UserError(
                f"adapter.{field}: {getattr(adapter, field)!r} contradicts the starting adapter's "
                f"{theirs[field]!r} (student.adapter); omit it or make them equal"
            )


def _save_base(model: nn.Module, config: dict, source: Path, out: Path, dtype: mx.Dtype) -> None:
    """Write the base weights (pruned and/or quantized, without any LoRA parameters) as a plain mlx-lm folder."""
    out.mkdir(parents=True, exist_ok=True)
    weights = {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in _base_weights(model).items()
    }
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    models.save_config(config, out)
    models.copy_tokenizer(source, out)


def _base_weights(model: nn.Module) -> dict[str, mx.array]:
    """The model's parameters under the base model's names: LoRA/DoRA leaves out, their wrapped layer unwrapped."""
    wrappers = {name: attr for name, m in model.named_modules() if (attr := _base_attr(m))}
    base: dict[str, mx.array] = {}
    for name, value in flat_arrays(model.parameters()):
        owner, leaf = name.rsplit(".", 1)
        if owner in wrappers and leaf in ("lora_a", "lora_b", "m"):
            continue
        parts = name.split(".")
        for i in range(1, len(parts) - 1):
            if wrappers.get(".".join(parts[:i])) == parts[i]:  # `q_proj.linear.weight` -> `q_proj.weight`
                name = ".".join(parts[:i] + parts[i + 1 :])
                break
        base[name] = value
    return base


def unfreeze_trainable(model: nn.Module, acfg: dict) -> None:
    kind = acfg.get("fine_tune_type", "lora")
    n = acfg["num_layers"]
    if kind == "full":
        for layer in model.layers[-n:]:
            layer.unfreeze()
        return
    # LoRA/DoRA: only the adapter leaves train (they may have been frozen by load_adapters/freeze above).
    for _, module in model.named_modules():
        if hasattr(module, "lora_a"):
            module.unfreeze(keys=[k for k in ("lora_a", "lora_b", "m") if k in module], recurse=False)


def trainable_names(model: nn.Module) -> list[str]:
    return [k for k, _ in flat_arrays(model.trainable_parameters())]


def apply_param_groups(model: nn.Module, groups: list[ParamGroup]) -> dict[str, float]:
    """Learning-rate multiplier per trainable parameter (first matching group wins); 0 freezes it."""
    mults: dict[str, float] = {}
    for name in trainable_names(model):
        mult = next((g.lr_mult for g in groups if re.search(g.pattern, name)), 1.0)
        mults[name] = mult
    frozen = [n for n, m in mults.items() if m == 0.0]
    for name in frozen:
        module_path, leaf = name.rsplit(".", 1)
        dict(model.named_modules())[module_path].freeze(keys=[leaf], recurse=False)
    if not any(m > 0 for m in mults.values()):
        raise UserError("training.param_groups: every trainable parameter is frozen (lr_mult 0)")
    return {n: m for n, m in mults.items() if m > 0}


def save_adapter(model: nn.Module, acfg: dict, out: Path, extra: dict | None = None) -> None:
    """`adapters.safetensors` + `adapter_config.json` exactly as mlx-lm writes and reads them."""
    out.mkdir(parents=True, exist_ok=True)
    # (hidden-state hints' projections train with the student but are the run's, not the adapter's: hidden.py)
    weights = {k: v for k, v in flat_arrays(model.trainable_parameters()) if not k.startswith("hidden_projections.")}
    if acfg.get("fine_tune_type", "lora") != "full":
        weights = dict(tree_flatten(_adapter_leaves(model)))
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps({**acfg, **(extra or {})}, indent=2))


def _adapter_leaves(model: nn.Module) -> dict:
    """All LoRA/DoRA leaves, frozen ones included (param groups may freeze some; mlx-lm still expects them)."""
    from mlx.utils import tree_unflatten

    leaves = [(k, v) for k, v in flat_arrays(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")]
    return tree_unflatten(leaves)


def fuse(student: Student, out: Path) -> Path:
    """The student with its adapter merged into the weights: a plain model folder, no adapter needed.

    A quantized student stays quantized, as with `mlx_lm fuse`: each adapted layer is dequantized, merged with
    its adapter and quantized again with its own bits and group size (in the folder's dtype, like mlx-lm on the
    saved model), so the fused folder has the student's `quantization` config and loads with `mlx_lm.load`.
    """
    dtype = models.source_dtype(student.path)
    fused = []
    for name, m in student.model.named_modules():
        if not hasattr(m, "fuse"):
            continue
        base = m[_base_attr(m)] if _base_attr(m) else None
        if base is not None and "scales" in base:
            fused.append((name, models.requantize(m.fuse(dequantize=True), base, dtype)))
        else:
            fused.append((name, m.fuse()))
    if fused:
        student.model.update_modules(tree_unflatten(fused))
    return models.save_model_folder(out, student.model, student.config, student.path, dtype=dtype)
