"""The PyTorch side of bench/peer_speed.py; runs in the bench-only torch venv, never in the project's.

    <torch-venv>/bin/python bench/_torch_peer.py WORK_DIR

WORK_DIR holds `job.json` (model folder, kept layers, LoRA rank/scale, threads, reps, what to time) and
`batches.npz` (tokens and the teacher cache's top-k rows of each batch, written by peer_speed.py from the
engine's own cache). Prints one line `PEER {json}` with seconds per step / per forward, every rep.

The student and the loss are what the engine trains: the model folder loaded by transformers in float32, every
kept layer (the others dropped), peft LoRA of the same rank on every linear layer of the kept layers (alpha =
rank x scale, so the update is scaled as in mlx-lm), forward KL at T = 1 on the teacher's top-k + tail
(teacher top-k log-probs and tail log-mass against the student's log-softmax at the same ids and its
remaining mass), the mean over target positions, AdamW, gradients clipped at 1.0.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def sparse_forward_kl(logits, ids, t_logp, t_tail, mask):
    """KL(teacher || student) on the k teacher ids plus one tail bucket, mean over masked positions."""
    s_logp_all = torch.log_softmax(logits, dim=-1)
    s_logp = torch.gather(s_logp_all, -1, ids)
    s_top = torch.logsumexp(s_logp, dim=-1)
    s_tail = torch.log(torch.clamp(-torch.expm1(s_top), min=1e-30))  # log(1 - sum of the top-k mass)
    t_p = torch.exp(t_logp)
    kl = (t_p * (t_logp - s_logp)).sum(-1) + torch.exp(t_tail) * (t_tail - s_tail)
    return (kl * mask).sum() / mask.sum()


def load(job: dict, layers: list[int] | None):
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    if layers is not None:
        model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in layers])
        model.config.num_hidden_layers = len(layers)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = i
    return model


def main() -> None:
    work = Path(sys.argv[1])
    job = json.loads((work / "job.json").read_text())
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    data = np.load(work / "batches.npz")
    n = int(data["n"])
    batches = [
        tuple(torch.from_numpy(data[f"{name}{b}"]) for name in ("tokens", "ids", "logp", "tail", "mask"))
        for b in range(n)
    ]
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    if "step" in job["what"]:
        model = load(job, job["keep_layers"])
        cfg = LoraConfig(
            r=job["rank"],
            lora_alpha=job["rank"] * job["scale"],
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        model = get_peft_model(model, cfg)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

        def step(b):
            tokens, ids, logp, tail, mask = batches[b % n]
            logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
            loss = sparse_forward_kl(logits, ids[:, :-1].long(), logp[:, :-1].float(), tail[:, :-1], mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return float(loss)

        out["step_loss"] = step(0)  # warm-up
        times = []
        for r in range(job["reps"]):
            t = time.perf_counter()
            step(r + 1)
            times.append(time.perf_counter() - t)
        out["step_seconds"] = times
        del model, opt

    if "forward" in job["what"]:
        model = load(job, None)
        model.eval()
        times = []
        with torch.inference_mode():
            model(input_ids=batches[0][0], use_cache=False)
            for r in range(job["reps"]):
                t = time.perf_counter()
                model(input_ids=batches[r % n][0], use_cache=False).logits.sum().item()
                times.append(time.perf_counter() - t)
        out["forward_seconds"] = times
    print("PEER " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
