"""The student: base model, optional depth pruning and starting adapter, then LoRA / DoRA / full training.

Adapters go through mlx-lm's own tuner (`linear_to_lora_layers`, `load_adapters`), so what we save is what
`mlx_lm.load(student, adapter_path=...)` expects.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters

from . import models
from .errors import UserError
from .spec import AdapterSpec, ParamGroup, StudentSpec


@dataclass
class Student:
    model: nn.Module
    tokenizer: object
    config: dict
    path: Path             # the folder the adapter loads onto (the source, or the pruned `student/` we wrote)
    adapter_config: dict   # adapter_config.json as mlx-lm reads it


def adapter_config(adapter: AdapterSpec, num_layers: int) -> dict:
    cfg = {"fine_tune_type": adapter.type, "num_layers": num_layers if adapter.layers == -1 else adapter.layers,
           "lora_parameters": {"rank": adapter.rank, "scale": adapter.scale, "dropout": adapter.dropout}}
    if adapter.keys:
        cfg["lora_parameters"]["keys"] = list(adapter.keys)
    return cfg


def build_student(spec: StudentSpec, adapter: AdapterSpec, model_path: Path, out_dir: Path,
                  adapter_path: Path | None = None, adapter_fields_set: set[str] | None = None) -> Student:
    """Load, prune (writing `out_dir/student/` when pruned), apply the starting adapter or a fresh one."""
    model, tokenizer, config = models.load_model(model_path)
    model.freeze()
    path = model_path
    if adapter_path is not None:
        start_cfg = json.loads((adapter_path / "adapter_config.json").read_text())
        _check_starting_adapter(start_cfg, adapter, adapter_fields_set or set())
        load_adapters(model, str(adapter_path))   # applies its LoRA layers and weights (frozen for now)
        acfg = start_cfg
    if spec.keep_layers is not None:
        if adapter_path is not None and start_cfg.get("fine_tune_type") == "full":
            raise UserError("student.keep_layers cannot be combined with a full fine-tuning starting adapter")
        dtype = models.source_dtype(model_path)
        config = models.prune_layers(model, config, spec.keep_layers)
        path = out_dir / "student"
        _save_base(model, config, model_path, path, dtype)
    n_layers = len(model.layers)
    if adapter_path is None:
        acfg = adapter_config(adapter, n_layers)
        if acfg["num_layers"] > n_layers:
            raise UserError(f"adapter.layers: {adapter.layers} > the student's {n_layers} layers")
        if adapter.type in ("lora", "dora"):
            try:
                linear_to_lora_layers(model, acfg["num_layers"], acfg["lora_parameters"], use_dora=adapter.type == "dora")
            except ValueError as e:
                raise UserError(f"adapter: {e}") from None
    else:  # after pruning, the adapted layers are the kept ones from the first adapted layer on
        adapted = [i for i, layer in enumerate(model.layers) if any(hasattr(m, "lora_a") for _, m in layer.named_modules())]
        acfg = dict(acfg, num_layers=n_layers - adapted[0] if adapted else n_layers)
    unfreeze_trainable(model, acfg)
    mx.eval(model.parameters())
    return Student(model=model, tokenizer=tokenizer, config=config, path=path, adapter_config=acfg)


def _check_starting_adapter(start: dict, adapter: AdapterSpec, fields_set: set[str]) -> None:
    """A starting adapter fixes the adapter's shape; explicitly asking for another shape is a contradiction."""
    lora = start.get("lora_parameters", {})
    theirs = {"type": start.get("fine_tune_type", "lora"), "rank": lora.get("rank"), "scale": lora.get("scale")}
    for field in ("type", "rank", "scale"):
        if field in fields_set and theirs[field] is not None and getattr(adapter, field) != theirs[field]:
            raise UserError(f"adapter.{field}: {getattr(adapter, field)!r} contradicts the starting adapter's "
                            f"{theirs[field]!r} (student.adapter); omit it or make them equal")


def _save_base(model: nn.Module, config: dict, source: Path, out: Path, dtype: mx.Dtype) -> None:
    """Write the pruned base weights (without any LoRA parameters) as a plain mlx-lm folder."""
    base = {}
    for name, value in tree_flatten(model.parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lora_a", "lora_b", "m"):
            continue
        base[name.replace(".linear.", ".")] = value  # LoRALinear wraps the base layer as `.linear`
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"),
                        {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in base.items()},
                        metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in models.TOKENIZER_FILES:
        if (source / name).is_file():
            (out / name).write_bytes((source / name).read_bytes())


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
    return [k for k, _ in tree_flatten(model.trainable_parameters())]


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
    weights = dict(tree_flatten(model.trainable_parameters()))
    if acfg.get("fine_tune_type", "lora") != "full":
        weights = dict(tree_flatten(_adapter_leaves(model)))
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps({**acfg, **(extra or {})}, indent=2))


def _adapter_leaves(model: nn.Module) -> dict:
    """All LoRA/DoRA leaves, frozen ones included (param groups may freeze some; mlx-lm still expects them)."""
    from mlx.utils import tree_unflatten

    leaves = [(k, v) for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")]
    return tree_unflatten(leaves)


def fuse(student: Student, out: Path) -> Path:
    """The student with its adapter merged into the weights: a plain model folder, no adapter needed."""
    fused = [(n, m.fuse()) for n, m in student.model.named_modules() if hasattr(m, "fuse")]
    from mlx.utils import tree_unflatten

    if fused:
        student.model.update_modules(tree_unflatten(fused))
    return models.save_model_folder(out, student.model, student.config, student.path,
                                    dtype=models.source_dtype(student.path))
