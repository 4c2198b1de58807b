"""`learning_rate: auto`: a few short trials from the starting student, and the rate whose trial ends lowest.

Each trial starts from the same weights with a fresh optimizer, runs the same first batches of the run at a
constant rate, and is judged by val KL on the first held-out batches. A trial whose loss stops being finite
is out. When no trial beats the starting student, the smallest rate is chosen (and the run's own guards keep
the start if training still does not help). The trials' steps do not count against `training.steps`.

The default grid is five half-decade steps: around 1e-4 for adapters (LoRA/DoRA with mlx-lm's scale), ten
times lower for full fine-tuning, and three times lower again for models above 3B parameters, whose updates
move more weights at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

LORA_RATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
LARGE_MODEL_PARAMS = 3e9


def default_rates(fine_tune_type: str, n_params: int) -> list[float]:
    scale = 0.1 if fine_tune_type == "full" else 1.0
    if n_params >= LARGE_MODEL_PARAMS:
        scale /= 3.0
    return [float(f"{r * scale:.3g}") for r in LORA_RATES]


def trial_steps(run_steps: int, configured: int | None) -> int:
    return configured if configured is not None else min(max(run_steps // 10, 4), 20)


def search(
    rates: list[float],
    steps: int,
    start_score: float,
    run_trial: Callable[[float], dict],
    on_trial: Callable[[dict], None],
    metric: str = "val KL",
) -> dict:
    """Run one trial per rate (`run_trial(rate) -> {"val_kl", "loss", ...}`, "val_kl" the run's score, named
    `metric` in messages) and choose.

    Returns what goes into `summary.lr_search`.
    """
    t0 = time.perf_counter()
    trials = []
    for rate in sorted(rates):
        trial = {"learning_rate": rate, **run_trial(rate)}
        trials.append(trial)
        on_trial(trial)
    usable = [t for t in trials if math.isfinite(t["val_kl"])]
    improving = [t for t in usable if t["val_kl"] < start_score]
    if improving:
        chosen = min(improving, key=lambda t: (t["val_kl"], t["learning_rate"]))
        reason = f"lowest {metric} after the trial"
    else:
        chosen = trials[0]
        reason = "no trial improved on the starting student; the smallest rate is used"
    return {
        "chosen": chosen["learning_rate"],
        "reason": reason,
        "start_val_kl": start_score,
        "steps_per_trial": steps,
        "trials": trials,
        "seconds": time.perf_counter() - t0,
    }
