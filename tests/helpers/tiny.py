"""Tiny random-init mlx-lm model folders, built offline for tests.

A byte-level BPE tokenizer is trained on a small English corpus (CPython's own pydoc topics), and models
of any width/depth share it, so a "teacher" and a "student" are tokenizer-compatible by construction.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list[str]:
    import pydoc_data.topics as topics

    return [v for _, v in sorted(topics.topics.items())]


def build_tokenizer(out: Path, vocab_size: int = 512, chat_template: str | None = CHATML) -> None:
    """Train a byte-level BPE on the corpus and save it as a transformers fast tokenizer in `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template:
        cfg["chat_template"] = chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (out / "chat_template.jinja").unlink(missing_ok=True)


def build_model(
    out: Path,
    tokenizer_dir: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    arch: str = "llama",
    seed: int = 0,
    tie: bool = True,
) -> Path:
    """A random-init model folder (config, weights, the shared tokenizer) loadable by `mlx_lm.load`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.utils import _get_classes

    files = [f for f in tokenizer_dir.iterdir() if f.is_file()]
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
    }
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape) if p.ndim == 2 else p, model.parameters()))
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config["eos_token_id"] = _token_id(tokenizer_dir, tok_cfg.get("eos_token"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in files:
        shutil.copy(f, out / f.name)
    return out


def _token_id(tokenizer_dir: Path, token: str | None) -> int | None:
    if token is None:
        return None
    for added in json.loads((tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]:
        if added["content"] == token:
            return added["id"]
    return None


def pretrain(model_dir: Path, steps: int = 60, seq_len: int = 64, batch: int = 8, lr: float = 3e-3) -> None:
    """A few steps of plain LM training on the corpus so a tiny teacher has a real, non-uniform distribution."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from worker.engine import fused

    model, tok = load(str(model_dir))
    fused.install(model)  # as the engine runs it, whichever test loaded a model first (the weights depend on it)
    ids = np.array(tok.encode("\n".join(corpus()[:200])), dtype=np.int32)
    opt = optim.AdamW(learning_rate=lr)
    loss_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y, reduction="mean"))
    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - seq_len - 1, batch)
        b = mx.array(np.stack([ids[s : s + seq_len + 1] for s in starts]))
        _, grads = loss_grad(model, b[:, :-1], b[:, 1:])
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    mx.save_safetensors(str(model_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def text_records(n: int = 64, chars: int = 400, offset: int = 0) -> list[dict]:
    """`n` real-prose records of about `chars` characters from the corpus."""
    text = "\n".join(corpus())
    return [{"text": text[(offset + i) * chars : (offset + i + 1) * chars]} for i in range(n)]
