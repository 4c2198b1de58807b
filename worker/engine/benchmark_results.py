"""The benchmark's report: sizes and compression ratios, `report.json`'s content, and what each metric means.

benchmark.py fills each row's metrics from its model's scores; `add_sizes` adds the size phase (parameters, bytes
on disk, compression against the reference), `build_report` assembles `report.json` with `DEFINITIONS`, and
`HEADLINE` names the metrics of the run's summary. report.py draws the charts and writes `report.md` from it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import mlx.core as mx

from distillery_contract.specs import BenchmarkSpec

from .benchmark_data import MCQ_PROMPT
from .benchmark_inputs import Row
from .mlx_typed import load_safetensors

HEADLINE = (
    "ppl",
    "kl",
    "top1_agreement",
    "mcq_accuracy",
    "pref_accuracy",
    "pref_accuracy_norm",
    "sample_reverse_kl",
    "prefill_tokens_per_second",
    "decode_tokens_per_second",
    "peak_memory_bytes",
    "compression_ratio_params",
)

_TIE = "a tie (equal scores) counts as half a pair"
DEFINITIONS = {
    "kl": "forward KL(reference || model) per target token, full vocabulary, T = 1 (nats); candidates are "
    "compared with the reference's log-probs stored as float16 and renormalised (off by ~1e-6 relative)",
    "js": "Jensen-Shannon divergence between reference and model per target token (nats)",
    "top1_agreement": "share of target tokens where the model's argmax equals the reference's",
    "top5_agreement": "share of target tokens where the reference's argmax is among the model's 5 highest logits",
    "ce": "mean cross-entropy of the data's own next tokens (nats); ppl = exp(ce)",
    "mcq_accuracy": "share of questions whose answer has the highest summed log-likelihood of ' ' + choice "
    "after 'Question: ...\\nAnswer:'",
    "mcq_accuracy_norm": "as mcq_accuracy, each choice's log-likelihood divided by its token count",
    "pref_accuracy": "share of pairs with log p(chosen | prompt) > log p(rejected | prompt), each summed over the "
    f"response's tokens (longer responses score lower); {_TIE}",
    "pref_accuracy_norm": "as pref_accuracy, each response scored by its mean log-prob per response token "
    f"(length-normalised); {_TIE}",
    "pref_agreement": "share of pairs the model orders (chosen vs rejected, summed scores) as the reference does; "
    "both tying counts as the same order, one tying as half",
    "pref_agreement_norm": "as pref_agreement, with the per-token mean scores",
    "pref_ties": "pairs whose summed scores are exactly equal (pref_ties_norm: whose per-token means are)",
    "sample_reverse_kl": "KL(model ‖ reference) over the full vocabulary at each token the model samples for "
    "data.prompts, averaged over those tokens (sample_tokens); the reference's own is not measured",
    "pref_harmless_accuracy": "harmlessness: pref_accuracy on the pairs whose subject is `harmless` "
    "(pref_harmless_accuracy_norm: pref_accuracy_norm on them)",
    "prefill_tokens_per_second": "prompt tokens / time to the first generated token (mlx-lm stream_generate)",
    "decode_tokens_per_second": "generated tokens / seconds since the first one appeared (mlx-lm's generation_tps)",
    "peak_memory_bytes": "peak of MLX-allocated memory while generating (weights, KV cache, activations; "
    "not the Python process's other memory), the model loaded alone",
    "parameters": "parameters of the base model (quantized weights counted unpacked); adapter_parameters apart",
    "size_bytes": "bytes on disk: the model's *.safetensors plus the adapter's files",
    "compression_ratio_params": "reference parameters / model parameters (base + LoRA/DoRA adapter)",
    "compression_ratio_size": "reference size_bytes / model size_bytes",
}


def add_sizes(rows: list[Row]) -> None:
    """Adapter parameters, bytes on disk, and the compression ratios against the reference row."""
    for r in rows:
        m = r.metrics
        size = sum(f.stat().st_size for f in r.path.glob("*.safetensors"))
        m["adapter_parameters"], m["adapter_size_bytes"] = 0, 0
        if r.adapter is not None:
            files = [r.adapter / "adapters.safetensors", r.adapter / "adapter_config.json"]
            m["adapter_size_bytes"] = sum(f.stat().st_size for f in files)
            m["adapter_parameters"] = sum(v.size for v in load_safetensors(files[0]).values())
            m["adapter_type"] = json.loads(files[1].read_text()).get("fine_tune_type", "lora")
        m["size_bytes"] = size + m["adapter_size_bytes"]
    ref = rows[0].metrics
    for r in rows:
        m = r.metrics
        # a full fine-tune "adapter" replaces base weights; LoRA / DoRA weights run beside them
        total = m["parameters"] + (m["adapter_parameters"] if m.get("adapter_type", "lora") != "full" else 0)
        ref_total = ref["parameters"]
        m["compression_ratio_params"] = ref_total / total if total else None
        m["compression_ratio_size"] = ref["size_bytes"] / m["size_bytes"] if m["size_bytes"] else None


def build_report(spec: BenchmarkSpec, rows: list[Row], datasets: dict, text_ex: list) -> dict:
    data_info = {}
    for slot, ds in datasets.items():
        data_info[slot] = {"file": ds.path.name, "format": ds.format, "sha256": ds.sha256, "records": len(ds.records)}
    if text_ex:
        data_info["text"]["sequences"] = len(text_ex)
    cpu = mx.default_device() == mx.cpu
    return {
        "reference": rows[0].label,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kl_method": "full",
        "settings": {
            **spec.model_dump(mode="json", include={"max_seq_len", "batch_size", "max_examples", "speed"}),
            "mcq_prompt": MCQ_PROMPT + " {choice}",
            "device": "cpu" if cpu else "gpu",
            "compute_dtype": "float32" if cpu else "as stored",
            "reference_logprobs": "float16 on disk, renormalised (candidates' kl, js)",
            "preference_tie": "half a pair",
        },
        "data": data_info,
        "candidates": [
            {
                "label": r.label,
                "model": r.name,
                "adapter": r.adapter_name,
                "is_reference": r.is_reference,
                "metrics": r.metrics,
            }
            for r in rows
        ],
        "definitions": DEFINITIONS,
    }
