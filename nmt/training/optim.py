"""Optimizers and learning-rate schedules.

Every schedule is a pure function of the update count (plus, for `plateau`, the number of reductions
so far), so a resumed run continues with exactly the learning rates it would have had. `u` below is
the 1-based index of the update a learning rate is used for, `w` = warmup_steps, `T` = the decay
horizon (schedule.total_steps, default train.max_steps), `peak` = optimizer.lr:

    warmup (u < w, every type)  peak * u / w            (the first update uses peak / w)
    constant                    peak
    noam, inverse_sqrt          max(min_lr, peak * sqrt(w / u))
    linear                      min_lr + (peak - min_lr) * (1 - progress)
    cosine                      min_lr + (peak - min_lr) * (1 + cos(pi * progress)) / 2
    plateau                     max(min_lr, peak * plateau_factor ** reductions)
    with progress = min(1, (u - w) / (T - w)).

`noam` is the d_model-free Noam schedule: the original d_model^-0.5 * min(u^-0.5, u * w^-1.5) rescaled
so that its peak (at u = w) is the configured lr, i.e. peak * min(u / w, sqrt(w / u)) -- the same
curve as fairseq's `inverse_sqrt` with warmup_init_lr = 0; both names are accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from nmt import cpu_kernels
from nmt.config import OptimizerConfig, ScheduleConfig
from nmt.errors import NmtError

FUSED_DEVICE_TYPES = ("cpu", "cuda")  # where torch's fused Adam/AdamW/SGD kernels run


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Adam (L2 weight decay), AdamW (decoupled weight decay) or SGD with momentum, from `cfg`.

    Uses torch's fused kernels when every parameter is a float tensor on the CPU or a CUDA device
    (2.5x faster than the per-parameter loop for Adam on a 2-core CPU), else the multi-tensor path.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise NmtError("the model has no trainable parameters")
    fused = all(p.is_floating_point() and p.device.type in FUSED_DEVICE_TYPES for p in params)
    speed = {"fused": True} if fused else {"foreach": True}
    if cfg.type == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **speed)
    adam = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.type]
    return adam(params, lr=cfg.lr, betas=_betas(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, **speed)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float, in_step: bool = True) -> None:
    """Scale the gradients of `optimizer`'s parameters so that their total 2-norm is at most max_norm
    (as `torch.nn.utils.clip_grad_norm_`). With `in_step`, a fused optimizer gets the factor as its
    `grad_scale` (its kernel divides each gradient by it on its way in) instead of a pass over every
    gradient; the next call sets or clears it, so call it before every step of such an optimizer. Pass
    in_step=False when a GradScaler steps the optimizer: it sets grad_scale itself."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    fused = in_step and bool(optimizer.defaults.get("fused"))
    if fused:
        optimizer.grad_scale = None
    if not grads:
        return
    total = total_norm(grads)
    coef = max_norm / (total + 1e-6)
    if coef >= 1.0:
        return
    if fused and math.isfinite(total):
        optimizer.grad_scale = torch.tensor(1.0 / coef, device=grads[0].device)
    else:
        torch._foreach_mul_(grads, coef)


def total_norm(grads: list[torch.Tensor]) -> float:
    """The 2-norm of all gradients together (`torch.nn.utils.get_total_norm`); contiguous fp32 CPU gradients
    in one pass of `nmt/csrc/squared_norm.cpp` where the kernels are available (one op instead of one per
    tensor: 113 for the d256 recipe)."""
    if all(g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous() for g in grads):
        kernels = cpu_kernels.extension()
        if kernels is not None:
            return math.sqrt(kernels.squared_norm(grads))
    return float(torch.nn.utils.get_total_norm(grads))


def _betas(betas: list[float]) -> tuple[float, float]:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise NmtError(f"train.optimizer.betas: expected two numbers in [0, 1), got {betas!r}")
    return float(betas[0]), float(betas[1])


# ----------------------------------------------------------------------------------------------
# Schedules


class Schedule:
    """Sets the optimizer's learning rate from the update count; call `step()` after each update."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
        self.optimizer = optimizer
        self.cfg = cfg
        self.total_steps = total_steps
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]  # peak lr of each group
        self.peak = self.base_lrs[0]
        self.curve = CURVES[cfg.type]
        self.updates = 0  # optimizer updates done
        self.reductions = 0  # plateau: times the lr was multiplied by plateau_factor
        self.best: float | None = None  # plateau: best validation metric so far
        self.bad_validations = 0  # plateau: validations since the last improvement or reduction
        self._apply()

    def lr_at(self, update: int) -> float:
        """The learning rate of the `update`-th update (1-based) for the first parameter group."""
        warmup = self.cfg.warmup_steps
        if update < warmup:
            return self.curve(self, warmup) * update / warmup
        return self.curve(self, update)

    @property
    def lr(self) -> float:
        """The learning rate the next update will use."""
        return self.lr_at(self.updates + 1)

    def step(self) -> None:
        """Record one optimizer update and set the learning rate of the next one."""
        self.updates += 1
        self._apply()

    def on_validation(self, value: float, higher_is_better: bool) -> None:
        """Plateau: after `plateau_patience` validations without improvement, multiply the lr by
        `plateau_factor` (patience 0 acts as 1: every validation that does not improve reduces it;
        NaN never improves). Other schedules ignore validations."""
        if self.cfg.type != "plateau":
            return
        improved = not math.isnan(value) and (
            self.best is None or (value > self.best if higher_is_better else value < self.best))
        if improved:
            self.best, self.bad_validations = value, 0
            return
        self.bad_validations += 1
        if self.bad_validations >= max(self.cfg.plateau_patience, 1):
            self.reductions += 1
            self.bad_validations = 0
            self._apply()

    def state_dict(self) -> dict[str, Any]:
        """Counters that, with the config, determine every future learning rate (primitives only)."""
        return {"type": self.cfg.type, "updates": self.updates, "reductions": self.reductions,
                "best": self.best, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s counters and set the optimizer's lr accordingly."""
        self.updates = int(state["updates"])
        self.reductions = int(state["reductions"])
        self.best = state["best"]
        self.bad_validations = int(state["bad_validations"])
        self._apply()

    def _apply(self) -> None:
        scale = self.lr / self.peak
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * scale


def _constant(s: Schedule, update: int) -> float:
    return s.peak


def _inverse_sqrt(s: Schedule, update: int) -> float:
    return max(s.cfg.min_lr, s.peak * math.sqrt(s.cfg.warmup_steps / update))


def _progress(s: Schedule, update: int) -> float:
    """Fraction of the decay phase done: 0 at the end of warmup, 1 at (and after) the horizon."""
    warmup = s.cfg.warmup_steps
    return min(1.0, (update - warmup) / (s.total_steps - warmup))


def _linear(s: Schedule, update: int) -> float:
    return s.cfg.min_lr + (s.peak - s.cfg.min_lr) * (1.0 - _progress(s, update))


def _cosine(s: Schedule, update: int) -> float:
    return s.cfg.min_lr + (s.peak - s.cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * _progress(s, update)))


def _plateau(s: Schedule, update: int) -> float:
    return max(s.cfg.min_lr, s.peak * s.cfg.plateau_factor ** s.reductions)


# schedule type -> lr after warmup as a function of (schedule, 1-based update index)
CURVES: dict[str, Callable[[Schedule, int], float]] = {
    "constant": _constant, "noam": _inverse_sqrt, "inverse_sqrt": _inverse_sqrt,
    "linear": _linear, "cosine": _cosine, "plateau": _plateau,
}
NEEDS_WARMUP = ("noam", "inverse_sqrt")
NEEDS_HORIZON = ("linear", "cosine")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int) -> Schedule:
    """The schedule of `cfg` driving `optimizer`; `max_steps` (0 = unlimited) is the default horizon."""
    peak = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    if cfg.min_lr > peak:
        raise NmtError(f"train.schedule.min_lr: {cfg.min_lr} is above the peak train.optimizer.lr {peak}")
    if cfg.type in NEEDS_WARMUP and cfg.warmup_steps == 0:
        raise NmtError(f"train.schedule.warmup_steps: the {cfg.type} schedule needs warmup_steps > 0 "
                       "(its decay lr * sqrt(warmup / step) is scaled by it)")
    total = cfg.total_steps or max_steps
    if cfg.type in NEEDS_HORIZON:
        if not total:
            raise NmtError(f"train.schedule.total_steps: required by the {cfg.type} schedule when "
                           "train.max_steps is 0 (no step limit)")
        if total <= cfg.warmup_steps:
            key = "train.schedule.total_steps" if cfg.total_steps else "train.max_steps"
            raise NmtError(f"{key}: the {cfg.type} decay horizon ({total}) must be longer than "
                           f"train.schedule.warmup_steps ({cfg.warmup_steps})")
    return Schedule(optimizer, cfg, total)
