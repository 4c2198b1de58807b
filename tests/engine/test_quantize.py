"""Quantization-aware distillation (`student.quantize`): the student is quantized by mlx-lm's own
`quantize_model` after pruning, a LoRA / DoRA adapter trains on top of the quantized weights, and `student/`
(the quantized model) + the adapter load with `mlx_lm.load` to the very model the engine trained."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load as mlx_load
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from pydantic import ValidationError

from distillery_contract.specs import AdapterSpec, DistillSpec, StudentSpec
from tests.helpers import tiny
from worker.engine import models, preflight
from worker.engine import student as student_mod
from worker.engine.errors import UserError

TOKENS = mx.array(np.random.default_rng(0).integers(3, 500, (2, 24)), dtype=mx.int32)
PROJ = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def build(
    model: Path,
    out: Path,
    *,
    quantize: dict | None = None,
    adapter: dict | None = None,
    keep: list[int] | None = None,
    start: Path | None = None,
) -> student_mod.Student:
    s = {"model": str(model)}
    if quantize is not None:
        s["quantize"] = quantize
    if keep is not None:
        s["keep_layers"] = keep
    if adapter is None:  # a starting adapter fixes the adapter's shape
        adapter = {} if start is not None else {"type": "lora", "rank": 4, "scale": 10.0}
    spec = AdapterSpec.model_validate(adapter)
    mx.random.seed(0)
    return student_mod.build_student(
        StudentSpec.model_validate(s), spec, model, out, adapter_path=start, adapter_fields_set=spec.model_fields_set
    )


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Non-zero lora_b (and a moved DoRA magnitude) so the adapter changes the function."""
    mx.random.seed(seed)
    new = [(k, 0.05 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.parameters()) if k.endswith("lora_b")]
    new += [(k, v * 1.1) for k, v in tree_flatten(model.parameters()) if k.endswith(".m")]
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def logits(model: nn.Module) -> np.ndarray:
    model.eval()
    out = model(TOKENS)
    return np.array(out.astype(mx.float32))


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def base_of(layer: nn.Module) -> nn.Module:
    return layer.linear if isinstance(layer, (LoRALinear, DoRALinear)) else layer


@pytest.fixture(scope="module")
def bf16_student(tiny_root, tiny_tokenizer) -> Path:
    """The tiny student stored in bfloat16, as real checkpoints are."""
    out = tiny_root / "student-bf16"
    if not (out / "config.json").is_file():
        src = tiny.build_model(tiny_root / "student-bf16-src", tiny_tokenizer, hidden=64, layers=4, seed=2)
        out.mkdir()
        for f in src.iterdir():
            (out / f.name).write_bytes(f.read_bytes())
        w = mx.load(str(src / "model.safetensors"))
        mx.save_safetensors(str(out / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in w.items()})
    return out


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("kind,bits,group", [("lora", 4, 32), ("lora", 3, 64), ("dora", 4, 64), ("dora", 8, 32)])
def test_quantized_student_round_trips_through_mlx_lm(tiny_student, tmp_path, kind, bits, group):
    st = build(
        tiny_student,
        tmp_path,
        quantize={"bits": bits, "group_size": group},
        adapter={"type": kind, "rank": 4, "scale": 10.0},
    )
    assert st.path == tmp_path / "student"
    assert st.config["quantization"] == {"group_size": group, "bits": bits, "mode": "affine"}
    wrapper = LoRALinear if kind == "lora" else DoRALinear
    for layer in st.model.layers:
        for key in PROJ:
            m = dict(layer.named_modules())[key]
            assert isinstance(m, wrapper) and isinstance(m.linear, nn.QuantizedLinear)
            assert (m.linear.bits, m.linear.group_size) == (bits, group)
            if mx.default_device() == mx.cpu:  # same parameters, dequantize-then-sgemm forward
                assert isinstance(m.linear, models.DequantizedLinear)
    assert isinstance(st.model.model.embed_tokens, nn.QuantizedEmbedding)
    names = student_mod.trainable_names(st.model)
    assert names and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m") for n in names)

    untrained = logits(st.model)
    perturb(st.model)
    ours = logits(st.model)
    assert np.abs(ours - untrained).max() > 1e-2  # the adapter does change the function
    student_mod.save_adapter(st.model, st.adapter_config, tmp_path / "adapter")

    theirs_model, _ = mlx_load(str(tmp_path / "student"), adapter_path=str(tmp_path / "adapter"))
    q = dict(theirs_model.layers[0].named_modules())["self_attn.q_proj"]
    assert isinstance(q, wrapper) and type(q.linear) is nn.QuantizedLinear  # mlx-lm's own kernel path
    np.testing.assert_allclose(logits(theirs_model), ours, atol=2e-4, rtol=1e-4)


def test_quantize_after_pruning(tiny_student, tmp_path):
    st = build(tiny_student, tmp_path, quantize={"bits": 4, "group_size": 32}, keep=[0, 3])
    cfg = json.loads((tmp_path / "student" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["quantization"]["bits"] == 4 and len(st.model.layers) == 2
    saved = mx.load(str(tmp_path / "student" / "model.safetensors"))
    assert not any(k.startswith("model.layers.2.") for k in saved)
    assert not any(".linear." in k or "lora" in k for k in saved)
    # kept layer 1 is layer 3 of the source, quantized as mlx would quantize it
    orig = mx.load(str(tiny_student / "model.safetensors"))["model.layers.3.mlp.up_proj.weight"]
    w, s, b = mx.quantize(orig, 32, 4)
    assert mx.array_equal(saved["model.layers.1.mlp.up_proj.weight"], w)
    assert mx.array_equal(saved["model.layers.1.mlp.up_proj.scales"], s)
    assert mx.array_equal(saved["model.layers.1.mlp.up_proj.biases"], b)
    perturb(st.model)
    student_mod.save_adapter(st.model, st.adapter_config, tmp_path / "adapter")
    theirs, _ = mlx_load(str(tmp_path / "student"), adapter_path=str(tmp_path / "adapter"))
    np.testing.assert_allclose(logits(theirs), logits(st.model), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_starting_adapter_on_a_quantized_pruned_student(tiny_student, tmp_path, kind):
    """An adapter trained on the full-precision student starts a quantized (and pruned) run: its layers wrap
    the quantized weights, as mlx-lm loads it onto the quantized folder."""
    first = build(tiny_student, tmp_path / "first", adapter={"type": kind, "rank": 4, "scale": 10.0})
    perturb(first.model, seed=5)
    student_mod.save_adapter(first.model, first.adapter_config, tmp_path / "start")
    start = mx.load(str(tmp_path / "start" / "adapters.safetensors"))

    st = build(
        tiny_student, tmp_path / "run", quantize={"bits": 4, "group_size": 64}, keep=[1, 3], start=tmp_path / "start"
    )
    layer = dict(st.model.layers[1].named_modules())["mlp.down_proj"]
    assert isinstance(layer.linear, nn.QuantizedLinear)
    assert mx.array_equal(layer.lora_b, start["model.layers.3.mlp.down_proj.lora_b"])  # kept layer 1 = layer 3
    if kind == "dora":  # the loaded magnitude survives the quantization of the layer under it
        assert mx.array_equal(layer.m, start["model.layers.3.mlp.down_proj.m"])
    assert st.adapter_config["num_layers"] == 2 and st.adapter_config["fine_tune_type"] == kind
    saved = mx.load(str(tmp_path / "run" / "student" / "model.safetensors"))
    assert saved["model.layers.1.mlp.down_proj.weight"].dtype == mx.uint32
    assert not any(".linear." in k or "lora" in k or k.endswith(".m") for k in saved)
    student_mod.save_adapter(st.model, st.adapter_config, tmp_path / "run")
    theirs, _ = mlx_load(str(tmp_path / "run" / "student"), adapter_path=str(tmp_path / "run"))
    np.testing.assert_allclose(logits(theirs), logits(st.model), atol=2e-4, rtol=1e-4)


def test_starting_adapter_that_does_not_fit(tiny_root, tiny_tokenizer, tiny_student, tmp_path):
    wide = tiny.build_model(tiny_root / "wide-128", tiny_tokenizer, hidden=128, layers=4, seed=4)
    other = build(wide, tmp_path / "other")
    student_mod.save_adapter(other.model, other.adapter_config, tmp_path / "start")
    with pytest.raises(
        UserError,
        match=r"(?s)student\.adapter: start does not fit student model student: .*lora_a.*\.\.\. and \d+ more",
    ):
        build(tiny_student, tmp_path / "run", quantize={"bits": 4, "group_size": 32}, start=tmp_path / "start")


# ------------------------------------------------------------------------------------------ refusals


def refused(
    model: Path, out: Path, match: str, *, quantize: dict, adapter: dict | None = None, spec_match: str | None = None
) -> None:
    """Refused by the spec itself (`spec_match`: what the API answers at submit time) or by pre-flight (config
    and shapes only), and by build_student, before anything is written."""
    doc = {
        "student": {"model": str(model), "quantize": quantize},
        "teachers": [{"model": str(model)}],
        "data": {"train": "train.jsonl"},
        "adapter": adapter or {},
        "training": {"learning_rate": 1e-3},
    }
    if spec_match is not None:
        with pytest.raises(ValidationError, match=spec_match):
            DistillSpec.model_validate(doc)
    else:
        with pytest.raises(UserError, match=match):
            preflight.check_student(DistillSpec.model_validate(doc), model)
    with pytest.raises(UserError, match=match):
        build(model, out, quantize=quantize, adapter=adapter)
    assert not out.exists()


def test_refusals(tiny_student, tmp_path):
    refused(
        tiny_student,
        tmp_path / "a",
        r"adapter\.type: full cannot be combined with student\.quantize: "
        r"quantized weights do not train",
        quantize={},
        adapter={"type": "full"},
        spec_match=r"adapter\.type: full cannot train a quantized student",
    )
    refused(
        tiny_student,
        tmp_path / "b",
        r"student\.quantize\.group_size: 128 does not divide the input size of "
        r"\d+ of the model's \d+ linear/embedding layers \(e\.g\. .*: 64\); use 32 or 64",
        quantize={"bits": 4, "group_size": 128},
    )
    refused(
        tiny_student,
        tmp_path / "c",
        r"adapter\.type: dora on a 3-bit student",
        quantize={"bits": 3},
        adapter={"type": "dora"},
        spec_match=r"adapter\.type: dora on 3-bit weights",
    )

    build(tiny_student, tmp_path / "q", quantize={"bits": 4, "group_size": 64})
    refused(
        tmp_path / "q" / "student",
        tmp_path / "d",
        r"student\.quantize: student model student is already "
        r"quantized at 4 bits \(group size 64\)",
        quantize={"bits": 8, "group_size": 64},
    )
    # without student.quantize, an already-quantized model is a fine student (the adapter trains on it as is)
    again = build(tmp_path / "q" / "student", tmp_path / "e")
    assert isinstance(again.model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    assert not (tmp_path / "e" / "student").exists()  # the adapter loads onto the given folder itself


def test_full_starting_adapter_with_quantize_is_refused(tiny_student, tmp_path):
    full = build(tiny_student, tmp_path / "full", adapter={"type": "full", "layers": 1})
    student_mod.save_adapter(full.model, full.adapter_config, tmp_path / "start")
    with pytest.raises(
        UserError,
        match=r"student\.adapter: a full fine-tuning starting adapter cannot be "
        r"combined with student\.quantize",
    ):
        build(tiny_student, tmp_path / "run", quantize={}, start=tmp_path / "start")


# ------------------------------------------------------------------------------------------ fuse


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fuse_keeps_the_student_quantized(tiny_student, tmp_path, kind):
    st = build(tiny_student, tmp_path, quantize={"bits": 4, "group_size": 32}, adapter={"type": kind, "rank": 4})
    perturb(st.model)
    student_mod.save_adapter(st.model, st.adapter_config, tmp_path / "adapter")
    adapted = logits(st.model)
    student_mod.fuse(st, tmp_path / "fused")
    cfg = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert (tmp_path / "fused" / "tokenizer.json").is_file()
    ours = mx.load(str(tmp_path / "fused" / "model.safetensors"))
    assert not any("lora" in k or ".linear." in k for k in ours)

    # what `mlx_lm fuse` makes of student/ + the adapter: the same tensors
    model, _ = mlx_load(str(tmp_path / "student"), adapter_path=str(tmp_path / "adapter"))
    model.update_modules(tree_unflatten([(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]))
    theirs = dict(tree_flatten(model.parameters()))
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        if v.dtype == mx.uint32:  # re-quantized ints may differ where a value sits on a rounding boundary
            assert np.mean(np.array(ours[k]) == np.array(v)) > 0.99, k
        else:
            np.testing.assert_allclose(np.array(ours[k]), np.array(v), atol=1e-5, err_msg=k)

    fused, _ = mlx_load(str(tmp_path / "fused"))
    assert type(fused.layers[0].self_attn.q_proj) is nn.QuantizedLinear
    np.testing.assert_allclose(logits(fused), logits(st.model), atol=2e-4, rtol=1e-4)  # the engine's fused model
    assert kl(adapted, logits(fused)) < 0.05  # re-quantizing W + BA costs little


# ------------------------------------------------------------------------------------------ it is quantized


def test_quantization_error_follows_the_bits(tiny_teacher, tmp_path):
    """The pretrained tiny teacher (hidden 96) as the student: quantized at 8 bits it is close to itself, at 2
    bits much less so; what is saved is packed at the requested bits."""
    full = logits(models.load_model(tiny_teacher)[0])
    divergence = {}
    for bits in (8, 4, 2):
        out = tmp_path / f"q{bits}"
        st = build(tiny_teacher, out, quantize={"bits": bits, "group_size": 32})
        divergence[bits] = kl(full, logits(st.model))  # lora_b = 0: the base alone
        saved = mx.load(str(out / "student" / "model.safetensors"))
        w, s, b = (saved[f"model.layers.0.mlp.down_proj.{x}"] for x in ("weight", "scales", "biases"))
        assert w.dtype == mx.uint32 and w.shape == (96, 192 * bits // 32)
        assert s.shape == b.shape == (96, 192 // 32) and s.dtype == mx.float32
        assert saved["model.embed_tokens.weight"].shape[-1] == 96 * bits // 32
        assert saved["model.norm.weight"].dtype == mx.float32
        assert json.loads((out / "student" / "config.json").read_text())["quantization"]["bits"] == bits
    assert 0 < divergence[8] < 1e-3
    assert divergence[8] < divergence[4] < divergence[2]
    assert divergence[2] > 30 * divergence[8]


def test_bfloat16_student_is_saved_as_bfloat16(bf16_student, tmp_path):
    """A bfloat16 source is quantized in bfloat16 (what `mlx_lm.convert -q` makes of it) and saved so; the
    engine computes on the very same values in its compute dtype."""
    st = build(bf16_student, tmp_path, quantize={"bits": 4, "group_size": 64})
    saved = mx.load(str(tmp_path / "student" / "model.safetensors"))
    src = mx.load(str(bf16_student / "model.safetensors"))
    w, s, b = mx.quantize(src["model.layers.2.self_attn.o_proj.weight"], 64, 4)
    assert s.dtype == mx.bfloat16
    for name, ref in (("weight", w), ("scales", s), ("biases", b)):
        assert mx.array_equal(saved[f"model.layers.2.self_attn.o_proj.{name}"], ref)
    q = st.model.layers[2].self_attn.o_proj.linear
    assert q.scales.dtype == models.compute_dtype(mx.bfloat16)
    assert mx.array_equal(q.scales.astype(mx.bfloat16), s)
    perturb(st.model)
    student_mod.save_adapter(st.model, st.adapter_config, tmp_path / "adapter")
    # models.load_model (the benchmark's loader) casts a quantized folder's floats to the compute dtype too
    again, _, _ = models.load_model(tmp_path / "student")
    assert again.model.norm.weight.dtype == models.compute_dtype(mx.bfloat16)
    from mlx_lm.tuner.utils import load_adapters

    load_adapters(again, str(tmp_path / "adapter"))
    np.testing.assert_allclose(logits(again), logits(st.model), atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ memory estimate


def test_memory_estimate_counts_quantized_weights(tiny_student, tiny_teacher, tiny_text, tmp_path):
    def spec(model=tiny_student, **student):
        return DistillSpec.model_validate(
            {
                "student": {"model": str(model), **student},
                "teachers": [{"model": str(tiny_teacher)}],
                "data": {"train": str(tiny_text["train"]), "valid": str(tiny_text["valid"])},
                "training": {"learning_rate": 1e-3},
            }
        )

    plain = preflight.memory_estimate(spec(), tiny_student, [tiny_teacher])
    q4 = preflight.memory_estimate(spec(quantize={"bits": 4, "group_size": 64}), tiny_student, [tiny_teacher])
    q8 = preflight.memory_estimate(spec(quantize={"bits": 8, "group_size": 64}), tiny_student, [tiny_teacher])
    n, nq = preflight.count_parameters(tiny_student), preflight.count_quantizable(tiny_student, 64)
    assert 0 < nq < n
    assert q4["student_weights"] == 4 * (n - nq) + nq // 2 + 8 * nq // 64
    assert (
        plain["student_weights"] == 4 * n and q4["student_weights"] < q8["student_weights"] < plain["student_weights"]
    )
    if mx.default_device() == mx.cpu:
        assert q4["dequantized_weights"] == 4 * nq
    pruned = preflight.memory_estimate(spec(quantize={}, keep_layers=[0, 1]), tiny_student, [tiny_teacher])
    assert pruned["student_weights"] < q4["student_weights"]

    # a student quantized already (here: ours, 4 bits, group 64) weighs what its files hold
    build(tiny_student, tmp_path, quantize={"bits": 4, "group_size": 64})
    given = preflight.memory_estimate(spec(tmp_path / "student"), tmp_path / "student", [tiny_teacher])
    assert abs(given["student_weights"] - q4["student_weights"]) < 0.05 * q4["student_weights"]
    if mx.default_device() == mx.cpu:
        assert given["dequantized_weights"] == 4 * nq


# ------------------------------------------------------------------------------------------ a whole run


def test_distill_run_with_a_quantized_student(tiny_student, tiny_teacher, tiny_text, tmp_path, tmp_path_factory):
    from worker.engine import distill
    from worker.engine.cache import CacheStore

    spec = DistillSpec.model_validate(
        {
            "student": {
                "model": str(tiny_student),
                "keep_layers": [0, 2, 3],
                "quantize": {"bits": 4, "group_size": 32},
            },
            "teachers": [{"model": str(tiny_teacher)}],
            "data": {"train": str(tiny_text["train"]), "valid": str(tiny_text["valid"])},
            "loss": {"kind": "forward_kl", "top_k": 16},
            "adapter": {"type": "lora", "rank": 4, "scale": 10.0},
            "training": {
                "steps": 6,
                "batch_size": 4,
                "learning_rate": 3e-3,
                "max_seq_len": 48,
                "eval_every": 3,
                "checkpoint_every": 3,
                "seed": 3,
                "eval_batches": 2,
            },
            "output": {"fuse": True},
        }
    )
    inputs = distill.Inputs(
        student=tiny_student, teachers=[tiny_teacher], train=tiny_text["train"], valid=tiny_text["valid"]
    )
    summary = distill.run_distill(spec, inputs, tmp_path, CacheStore(tmp_path_factory.mktemp("qcaches")))
    assert summary["student"] == str(tmp_path / "student")
    assert summary["final"]["val_kl"] < summary["initial"]["val_kl"]
    cfg = json.loads((tmp_path / "student" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["num_hidden_layers"] == 3
    model, _ = mlx_load(str(tmp_path / "student"), adapter_path=str(tmp_path))
    assert isinstance(model.layers[0].mlp.up_proj.linear, nn.QuantizedLinear)
    adapted = logits(model)
    fused, _ = mlx_load(str(tmp_path / "fused"))
    assert type(fused.layers[0].mlp.up_proj) is nn.QuantizedLinear
    assert np.isfinite(adapted).all() and kl(adapted, logits(fused)) < 0.05
