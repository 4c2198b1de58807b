"""GGUF -> mlx-lm folder import (worker.engine.gguf_import).

The fast tests write a tiny GGUF with `gguf.GGUFWriter` the way llama.cpp's converter does (Q/K rows
permuted for llama, a byte-level BPE vocabulary with merges, a chat template) and check the import
round-trips. The slow test imports the real SmolLM2-135M-Instruct Q4_1 GGUF and asks it a question.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from worker.engine.errors import UserError  # noqa: E402
from worker.engine.gguf_import import import_gguf  # noqa: E402

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, CTX = 64, 4, 2, 2, 128, 512
HEAD_DIM = HIDDEN // HEADS
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SAMPLES = [
    "Hello world",
    "The capital of France is Paris.",
    "  leading spaces and 12345 digits\nnew line\ttab",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "naïve café – unicode ✓",
]


# ------------------------------------------------------------------------------------ tiny GGUF


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (`LlamaModel.permute`): HF half-split rotary rows -> ggml interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE (trained offline on Python's own docs) and its vocab/merges in id order."""
    import pydoc_data.topics as topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([v for _, v in sorted(topics.topics.items())][:60], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tok, [t for t, _ in vocab], merges


def bpe_vocab(bpe) -> dict:
    """GGUF tokenizer metadata for the byte-level BPE fixture, as llama.cpp writes a GPT-2 style vocab."""
    _, tokens, merges = bpe
    return {
        "model": "gpt2",
        "pre": "gpt-2",
        "tokens": tokens,
        "types": [3 if t in SPECIALS else 1 for t in tokens],
        "merges": merges,
        "bos": tokens.index("<|im_start|>"),
        "eos": tokens.index("<|im_end|>"),
        "unk": tokens.index("<|endoftext|>"),
        "pad": tokens.index("<|endoftext|>"),
        "add_bos": False,
    }


def write_gguf(
    path: Path,
    bpe,
    arch: str = "llama",
    tied: bool = False,
    seed: int = 0,
    extra_tensors: dict | None = None,
    rope_freqs: np.ndarray | None = None,
    vocab_meta: dict | None = None,
) -> dict[str, np.ndarray]:
    """Write a tiny GGUF like llama.cpp would; returns the HF-layout float32 weights it encodes."""
    meta = vocab_meta or bpe_vocab(bpe)
    vocab = len(meta["tokens"])
    rng = np.random.default_rng(seed)
    hf: dict[str, np.ndarray] = {}

    def rand(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model(meta["model"])
    if meta.get("pre"):
        w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    if meta.get("scores") is not None:
        w.add_token_scores(meta["scores"])
    if meta.get("merges") is not None:
        w.add_token_merges(meta["merges"])
    w.add_bos_token_id(meta["bos"])
    w.add_eos_token_id(meta["eos"])
    w.add_unk_token_id(meta["unk"])
    if meta.get("pad") is not None:
        w.add_pad_token_id(meta["pad"])
    w.add_add_bos_token(meta["add_bos"])
    w.add_chat_template(CHATML)

    def put(gguf_name: str, hf_name: str, data: np.ndarray, qtype=Q.F32, stored: np.ndarray | None = None):
        hf[hf_name] = data
        stored = data if stored is None else stored
        if qtype == Q.F32:
            w.add_tensor(gguf_name, stored.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(gguf_name, stored.astype(np.float16))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)

    put("token_embd.weight", "model.embed_tokens.weight", rand(vocab, HIDDEN, scale=0.5), Q.F16)
    for i in range(LAYERS):
        b, p = f"blk.{i}", f"model.layers.{i}"
        q, k = rand(HEADS * HEAD_DIM, HIDDEN), rand(KV_HEADS * HEAD_DIM, HIDDEN)
        permuted = arch == "llama"
        put(f"{b}.attn_q.weight", f"{p}.self_attn.q_proj.weight", q, stored=_permute(q, HEADS) if permuted else q)
        put(f"{b}.attn_k.weight", f"{p}.self_attn.k_proj.weight", k, stored=_permute(k, KV_HEADS) if permuted else k)
        put(f"{b}.attn_v.weight", f"{p}.self_attn.v_proj.weight", rand(KV_HEADS * HEAD_DIM, HIDDEN), Q.F16)
        put(f"{b}.attn_output.weight", f"{p}.self_attn.o_proj.weight", rand(HIDDEN, HIDDEN))
        if arch == "qwen2":
            put(f"{b}.attn_q.bias", f"{p}.self_attn.q_proj.bias", rand(HEADS * HEAD_DIM))
            put(f"{b}.attn_k.bias", f"{p}.self_attn.k_proj.bias", rand(KV_HEADS * HEAD_DIM))
            put(f"{b}.attn_v.bias", f"{p}.self_attn.v_proj.bias", rand(KV_HEADS * HEAD_DIM))
        if arch == "qwen3":
            put(f"{b}.attn_q_norm.weight", f"{p}.self_attn.q_norm.weight", 1 + rand(HEAD_DIM))
            put(f"{b}.attn_k_norm.weight", f"{p}.self_attn.k_norm.weight", 1 + rand(HEAD_DIM))
        put(f"{b}.ffn_gate.weight", f"{p}.mlp.gate_proj.weight", rand(FFN, HIDDEN))
        put(f"{b}.ffn_up.weight", f"{p}.mlp.up_proj.weight", rand(FFN, HIDDEN))
        # one quantized tensor per layer, as in real files
        put(f"{b}.ffn_down.weight", f"{p}.mlp.down_proj.weight", rand(HIDDEN, FFN), Q.Q8_0)
        put(f"{b}.attn_norm.weight", f"{p}.input_layernorm.weight", 1 + rand(HIDDEN))
        put(f"{b}.ffn_norm.weight", f"{p}.post_attention_layernorm.weight", 1 + rand(HIDDEN))
    put("output_norm.weight", "model.norm.weight", 1 + rand(HIDDEN))
    if not tied:
        put("output.weight", "lm_head.weight", rand(vocab, HIDDEN))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, (data, qtype) in (extra_tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _load_safetensors(folder: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    arrays = mx.load(str(folder / "model.safetensors"))
    return {k: np.array(v.astype(mx.float32)) for k, v in arrays.items()}


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, bpe):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    hf = write_gguf(path, bpe)
    return path, hf


@pytest.fixture(scope="module")
def llama_f32(tmp_path_factory, llama_gguf):
    out = tmp_path_factory.mktemp("imp") / "llama-f32"
    desc = import_gguf(llama_gguf[0], out, dtype="float32")
    return out, desc


@pytest.fixture(scope="module")
def llama_f16(tmp_path_factory, llama_gguf):
    out = tmp_path_factory.mktemp("imp") / "llama-f16"
    import_gguf(llama_gguf[0], out)
    return out


# --------------------------------------------------------------------------------- fast tests


def test_config_round_trips(llama_f32, bpe):
    out, desc = llama_f32
    cfg = json.loads((out / "config.json").read_text())
    _, tokens, _ = bpe
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (HIDDEN, LAYERS, FFN)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 50000.0
    assert cfg["vocab_size"] == len(tokens) and cfg["max_position_embeddings"] == CTX
    assert cfg["tie_word_embeddings"] is False
    assert cfg["bos_token_id"] == tokens.index("<|im_start|>")
    assert cfg["eos_token_id"] == tokens.index("<|im_end|>")
    assert "rope_scaling" not in cfg
    assert desc.startswith(f"llama, {LAYERS} layers, ") and f"vocab {len(tokens)}" in desc and "float32" in desc
    # written atomically: nothing but the output folder beside it
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_tensors_round_trip_and_qk_unpermuted(llama_f32, llama_gguf):
    out, _ = llama_f32
    _, hf = llama_gguf
    got = _load_safetensors(out)
    assert set(got) == set(hf)
    for name, ref in hf.items():
        assert got[name].shape == ref.shape, name
    for i in range(LAYERS):
        p = f"model.layers.{i}.self_attn"
        # F32 in the file: bit-exact, in HF's (unpermuted) row order
        np.testing.assert_array_equal(got[f"{p}.q_proj.weight"], hf[f"{p}.q_proj.weight"])
        np.testing.assert_array_equal(got[f"{p}.k_proj.weight"], hf[f"{p}.k_proj.weight"])
        assert not np.array_equal(got[f"{p}.q_proj.weight"], _permute(hf[f"{p}.q_proj.weight"], HEADS))
        # F16 and Q8_0 in the file: equal up to their precision
        np.testing.assert_allclose(got[f"{p}.v_proj.weight"], hf[f"{p}.v_proj.weight"], atol=1e-4)
        down = f"model.layers.{i}.mlp.down_proj.weight"
        err = np.abs(got[down] - hf[down]).max()
        assert err < 0.01 * np.abs(hf[down]).max(), err
    np.testing.assert_allclose(got["model.embed_tokens.weight"], hf["model.embed_tokens.weight"], atol=1e-3)
    np.testing.assert_array_equal(got["lm_head.weight"], hf["lm_head.weight"])


def test_default_dtype_is_float16_and_mlx_lm_loads_it(llama_f16, bpe):
    import mlx.core as mx
    from mlx_lm import load

    assert json.loads((llama_f16 / "config.json").read_text())["torch_dtype"] == "float16"
    arrays = mx.load(str(llama_f16 / "model.safetensors"))
    assert {v.dtype for v in arrays.values()} == {mx.float16}

    model, tok = load(str(llama_f16))
    src, _, _ = bpe
    ids = tok.encode("Hello world")
    assert ids == src.encode("Hello world").ids
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), len(bpe[1]))
    assert bool(mx.all(mx.isfinite(logits)))
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_tokenizer_matches_source_vocabulary(llama_f16, bpe):
    from transformers import AutoTokenizer

    src, tokens, _ = bpe
    tok = AutoTokenizer.from_pretrained(str(llama_f16))
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == src.encode(text).ids, text
        assert tok.decode(ids) == text
    # special tokens stay whole, and are the ones the file names
    assert tok.encode("<|im_end|>") == [tokens.index("<|im_end|>")]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|endoftext|>",
    )
    cfg = json.loads((llama_f16 / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHATML
    assert cfg["add_bos_token"] is False
    assert (llama_f16 / "tokenizer.json").is_file()


def test_fallback_tokenizer_without_transformers_gguf_support(tmp_path, llama_gguf, bpe, monkeypatch):
    """If transformers lacks its GGUF tokenizer module, the `tokenizers`-built BPE gives the same ids."""
    from transformers import AutoTokenizer

    import worker.engine.gguf_tokenizer as gi

    monkeypatch.setattr(gi, "_transformers_gguf_tokenizer", lambda: (None, {}))
    out = tmp_path / "fallback"
    import_gguf(llama_gguf[0], out)
    tok = AutoTokenizer.from_pretrained(str(out))
    src, _, _ = bpe
    for text in SAMPLES:
        assert tok.encode(text) == src.encode(text).ids, text


def test_sentencepiece_vocabulary(tmp_path, bpe):
    """A llama-style sentencepiece vocabulary (scores, byte fallback, no merges) encodes like sentencepiece."""
    import io
    import pydoc_data.topics as topics

    import sentencepiece as spm
    from transformers import AutoTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([v for _, v in sorted(topics.topics.items())][:60]),
        model_writer=buf,
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # as Llama's tokenizer.model: no NFKC, spaces kept
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    meta = {
        "model": "llama",
        "pre": "default",
        "tokens": [sp.id_to_piece(i) for i in range(n)],
        "scores": [sp.get_score(i) for i in range(n)],
        "types": types,
        "bos": 1,
        "eos": 2,
        "unk": 0,
        "add_bos": True,
    }
    path = tmp_path / "spm.gguf"
    write_gguf(path, bpe, tied=True, vocab_meta=meta)
    out = tmp_path / "spm"
    import_gguf(path, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    for text in ["Hello world, 12345 naïve", "The capital of France is Paris.", "def f(x):\n    return x"]:
        ids = tok.encode(text)
        assert ids == [1] + sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    from mlx_lm import load

    _, mlx_tok = load(str(out))
    assert mlx_tok.encode("Hello world") == [1] + sp.encode("Hello world")
    detok = mlx_tok.detokenizer
    detok.reset()
    for i in sp.encode("Hello world, naïve"):
        detok.add_token(i)
    detok.finalize()
    assert detok.text.strip() == "Hello world, naïve"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_keeps_qk_order(tmp_path, bpe, arch):
    """llama.cpp writes Qwen2/Qwen3 Q/K rows unpermuted: they are copied as they are."""
    import mlx.core as mx
    from mlx_lm import load

    path = tmp_path / f"tiny-{arch}.gguf"
    hf = write_gguf(path, bpe, arch=arch, tied=True)
    out = tmp_path / arch
    import_gguf(path, out, dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["tie_word_embeddings"] is True
    got = _load_safetensors(out)
    assert set(got) == set(hf) and "lm_head.weight" not in got
    for name in ("q_proj.weight", "k_proj.weight"):
        name = f"model.layers.0.self_attn.{name}"
        np.testing.assert_array_equal(got[name], hf[name])
    if arch == "qwen2":
        np.testing.assert_array_equal(
            got["model.layers.0.self_attn.k_proj.bias"], hf["model.layers.0.self_attn.k_proj.bias"]
        )
    model, _ = load(str(out))
    assert ("bias" in model.model.layers[0].self_attn.q_proj) == (arch == "qwen2")
    assert bool(mx.all(mx.isfinite(model(mx.array([[1, 2, 3]])))))


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, bpe):
    from worker.engine.gguf_config import _llama3_rope_factors

    factors = _llama3_rope_factors(HEAD_DIM, 50000.0, factor=8.0, low=1.0, high=4.0, orig=8192)
    assert factors.max() == 8.0 and factors.min() == 1.0
    path = tmp_path / "rope.gguf"
    write_gguf(path, bpe, tied=True, rope_freqs=factors)
    out = tmp_path / "rope"
    desc = import_gguf(path, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs" in desc


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model")
    with pytest.raises(UserError, match="not a GGUF file") as e:
        import_gguf(bad, tmp_path / "out")
    assert str(bad) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_file(tmp_path, llama_gguf):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(llama_gguf[0].read_bytes()[:5000])
    with pytest.raises(UserError) as e:
        import_gguf(bad, tmp_path / "out")
    assert str(bad) in str(e.value)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="'falcon' is not supported") as e:
        import_gguf(path, tmp_path / "out")
    assert str(path) in str(e.value)


def test_unsupported_tensor_type(tmp_path, bpe):
    path = tmp_path / "q81.gguf"
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    extra = {"blk.0.attn_q_extra.weight": (np.zeros((4, size), np.uint8), Q.Q8_1)}
    write_gguf(path, bpe, extra_tensors=extra)
    with pytest.raises(UserError, match="Q8_1") as e:
        import_gguf(path, tmp_path / "out")
    assert str(path) in str(e.value)
    assert list(tmp_path.iterdir()) == [path]  # no output, no temporary folder left


def test_refuses_non_empty_output_but_accepts_empty(tmp_path, llama_gguf):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        import_gguf(llama_gguf[0], out)
    assert (out / "keep.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    import_gguf(llama_gguf[0], empty)
    assert (empty / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


def test_bad_dtype(tmp_path, llama_gguf):
    with pytest.raises(UserError, match="dtype"):
        import_gguf(llama_gguf[0], tmp_path / "out", dtype="int8")


def test_cli_import_gguf(tmp_path, llama_gguf):
    from click.testing import CliRunner

    from service.commands.cli import main

    out = tmp_path / "cli-out"
    res = CliRunner().invoke(main, ["import-gguf", str(llama_gguf[0]), str(out), "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    assert "llama, 2 layers" in res.output and "bfloat16" in res.output
    res = CliRunner().invoke(main, ["import-gguf", str(llama_gguf[0]), str(out)])
    assert res.exit_code != 0 and "not empty" in res.output


# ----------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_answers_paris():
    from mlx_lm import generate, load

    from tests.helpers.smollm2 import smollm2_gguf, smollm2_mlx

    folder = smollm2_mlx()
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["vocab_size"]) == ("llama", 30, 49152)

    model, tok = load(str(folder))
    # every GGUF token keeps its id
    tokens = gguf.GGUFReader(str(smollm2_gguf())).fields["tokenizer.ggml.tokens"].contents()
    vocab = tok.get_vocab()
    assert len(vocab) == len(tokens) and all(vocab[t] == i for i, t in enumerate(tokens))
    # the vocabulary as llama.cpp reads it: "Hello" and "Ġworld" are single tokens, digits split one by one
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.convert_ids_to_tokens(tok.encode(" 2024")) == ["Ġ", "2", "0", "2", "4"]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    answer = generate(model, tok, prompt=prompt, max_tokens=12)
    assert "paris" in answer.lower(), answer
    completion = generate(model, tok, prompt="The capital of France is", max_tokens=8)
    assert "paris" in completion.lower(), completion
