"""The playground's engine (`worker.engine.generate`) on the tiny offline models: greedy answers are mlx-lm's own
`generate`, a seed makes sampling repeatable, chat prompts go through the chat template, an adapter that does
not fit is the user's error naming the field."""

from __future__ import annotations

import json

import pytest

from distillery_contract.specs import GenerateSpec
from worker.engine.errors import UserError
from worker.engine.generate import GenerateInput, render_prompt, run_generate
from worker.engine.models import load_tokenizer

PROMPT = "The built-in function"


def spec(**kw) -> GenerateSpec:
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("models", [{"label": "teacher", "model": "t"}])
    return GenerateSpec.model_validate(kw)


def test_greedy_answers_equal_mlx_lms_own_generate(tiny_teacher, tiny_student):
    from mlx_lm import generate, load

    progress: list[dict] = []
    out = run_generate(
        spec(max_tokens=24, models=[{"label": "teacher", "model": "t"}, {"label": "student", "model": "s"}]),
        [
            GenerateInput("teacher", tiny_teacher, field="models.0"),
            GenerateInput("student", tiny_student, field="models.1"),
        ],
        on_progress=progress.append,
    )
    assert [a["label"] for a in out["answers"]] == ["teacher", "student"]
    for a, path in zip(out["answers"], (tiny_teacher, tiny_student)):
        model, tokenizer = load(str(path))
        assert a["text"] == generate(model, tokenizer, prompt=PROMPT, max_tokens=24), a["label"]
        assert 0 < a["tokens"] <= 24 and a["seconds"] > 0 and a["tokens_per_second"] > 0
        assert a["prompt_format"] == "text" and a["finish_reason"] in ("stop", "length")
    assert out["answers"][0]["text"] != out["answers"][1]["text"]  # a trained teacher and a random student
    assert [p["step"] for p in progress] == [0, 1, 2] and {p["total_steps"] for p in progress} == {2}


def test_sampling_with_a_seed_is_repeatable(tiny_teacher):
    inputs = [GenerateInput("a", tiny_teacher), GenerateInput("b", tiny_teacher)]
    models = [{"label": "a", "model": "t"}, {"label": "b", "model": "t"}]
    first = run_generate(spec(models=models, temperature=1.0, top_p=0.95, seed=7, max_tokens=20), inputs)
    again = run_generate(spec(models=models, temperature=1.0, top_p=0.95, seed=7, max_tokens=20), inputs)
    other = run_generate(spec(models=models, temperature=1.0, top_p=0.95, seed=8, max_tokens=20), inputs)
    texts = [a["text"] for a in first["answers"]]
    assert texts == [a["text"] for a in again["answers"]]
    assert texts[0] == texts[1]  # every model starts from the same key
    assert texts != [a["text"] for a in other["answers"]]


def test_chat_messages_use_the_chat_template(tiny_teacher, tiny_tokenizer, tmp_path):
    tokenizer = load_tokenizer(tiny_teacher)
    messages = spec(prompt=[{"role": "user", "content": "What is a list?"}]).prompt
    ids, how = render_prompt(tokenizer, messages, "prompt")
    assert how == "chat_template"
    assert tokenizer.decode(ids) == "<|im_start|>user\nWhat is a list?<|im_end|>\n<|im_start|>assistant\n"
    out = run_generate(
        spec(prompt=[{"role": "user", "content": "What is a list?"}], max_tokens=8),
        [GenerateInput("teacher", tiny_teacher)],
    )
    assert out["answers"][0]["prompt_format"] == "chat_template"
    assert out["answers"][0]["prompt_tokens"] == len(ids)

    # a tokenizer without a template: the contents, joined
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in tiny_teacher.iterdir():
        (plain / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    text, how = render_prompt(
        load_tokenizer(plain),
        spec(prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]).prompt,
        "prompt",
    )
    assert (text, how) == ("Be brief.\n\nHi", "joined")


def test_an_adapter_that_does_not_fit_is_a_user_error_naming_the_field(tiny_teacher, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 1.0}})
    )
    import mlx.core as mx

    mx.save_safetensors(
        str(adapter / "adapters.safetensors"), {"model.layers.0.self_attn.q_proj.lora_a": mx.zeros((7, 4))}
    )
    with pytest.raises(UserError, match=r"^models\.0\.adapter: "):
        run_generate(
            spec(models=[{"label": "x", "model": "t", "adapter": "job"}]),
            [GenerateInput("x", tiny_teacher, adapter, "models.0", "t")],
        )
