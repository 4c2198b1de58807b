"""The divergence guard: tells a healthy training step from a diverging one.

A step is in trouble when its loss or gradient norm is not finite, or when it spikes: above `loss_spike` times
the median of the recent window (or the gradient norm above `grad_norm_spike` times its median). One spike
alone may be an unusual batch: its update is skipped and training goes on. A second spike in a row, a
non-finite value, or an evaluation whose val KL is above the best by more than `val_tolerance` means the run
is diverging: the training loop rolls back to the best checkpoint with a lower learning rate.

Everything the guard remembers lives in the train state (plain floats), so a resumed run decides as the
uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from distillery_contract.specs import DivergenceGuardSpec

OK, SKIP, ROLLBACK = "ok", "skip", "rollback"


@dataclass
class Verdict:
    action: str  # OK, SKIP (drop this update) or ROLLBACK
    reason: str = ""


class DivergenceGuard:
    def __init__(self, cfg: DivergenceGuardSpec):
        self.cfg = cfg

    @property
    def warmup(self) -> int:
        """Steps in the window before spikes are looked for."""
        return max(3, self.cfg.window // 4)

    def check_step(self, state, loss: float, grad_norm: float) -> Verdict:
        if not self.cfg.enabled:
            return Verdict(OK)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Verdict(ROLLBACK, f"non-finite loss or gradient (loss {loss}, gradient norm {grad_norm})")
        reason = self._spike(state, loss, grad_norm)
        if reason:
            state.guard_spikes += 1
            if state.guard_spikes >= 2:
                return Verdict(ROLLBACK, f"{reason}, {state.guard_spikes} steps in a row")
            return Verdict(SKIP, reason)
        state.guard_spikes = 0
        state.recent_losses = (state.recent_losses + [loss])[-self.cfg.window :]
        state.recent_grad_norms = (state.recent_grad_norms + [grad_norm])[-self.cfg.window :]
        return Verdict(OK)

    def _spike(self, state, loss: float, grad_norm: float) -> str:
        if len(state.recent_losses) < self.warmup:
            return ""
        loss_median = float(np.median(state.recent_losses))
        if loss > self.cfg.loss_spike * loss_median:
            return f"loss {loss:.4g} > {self.cfg.loss_spike:g} x the recent median {loss_median:.4g}"
        norm_median = float(np.median(state.recent_grad_norms))
        if norm_median > 0 and grad_norm > self.cfg.grad_norm_spike * norm_median:
            return f"gradient norm {grad_norm:.4g} > {self.cfg.grad_norm_spike:g} x the recent median {norm_median:.4g}"
        return ""

    def check_eval(self, val_kl: float, best_val_kl: float, metric: str = "val KL") -> Verdict:
        """`val_kl` is the run's score (val KL, or on_policy's reverse KL on samples: `metric` names it)."""
        if not self.cfg.enabled:
            return Verdict(OK)
        if not math.isfinite(val_kl):
            return Verdict(ROLLBACK, f"{metric} is {val_kl}")
        if val_kl > best_val_kl * (1.0 + self.cfg.val_tolerance):
            return Verdict(
                ROLLBACK,
                f"{metric} {val_kl:.4f} is above the best {best_val_kl:.4f} by more than {self.cfg.val_tolerance:.0%}",
            )
        return Verdict(OK)

    @staticmethod
    def forget(state) -> None:
        """After a rollback the old window describes weights that are gone."""
        state.recent_losses, state.recent_grad_norms, state.guard_spikes = [], [], 0
