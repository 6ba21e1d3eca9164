"""Optimizers and learning-rate schedules: formulas at key steps, plateau, exact resume, errors."""

from __future__ import annotations

import math

import pytest
import torch

from nmt.config import OptimizerConfig, ScheduleConfig
from nmt.errors import NmtError
from nmt.training.optim import build_optimizer, build_scheduler, clip_gradients, total_norm

PEAK = 1e-3


def optimizer(lr: float = PEAK, kind: str = "adam") -> torch.optim.Optimizer:
    return build_optimizer(torch.nn.Linear(3, 2).parameters(), OptimizerConfig(type=kind, lr=lr))


def lrs(schedule, updates: int) -> list[float]:
    """The learning rate each of the next `updates` updates uses, as read from the optimizer."""
    out = []
    for _ in range(updates):
        out.append(schedule.optimizer.param_groups[0]["lr"])
        schedule.step()
    return out


# -- optimizers -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_each_optimizer_type_is_built_with_the_configured_settings(kind, cls):
    cfg = OptimizerConfig(type=kind, lr=0.05, betas=[0.8, 0.95], eps=1e-7, weight_decay=0.01, momentum=0.7)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model.parameters(), cfg)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.05 and group["weight_decay"] == 0.01
    assert group["fused"] is True  # float parameters on the CPU take the fused kernels
    if kind == "sgd":
        assert group["momentum"] == 0.7
    else:
        assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7
    before = model.weight.detach().clone()
    model(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, model.weight)


def test_frozen_parameters_are_left_out():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    opt = build_optimizer(model.parameters(), OptimizerConfig())
    assert opt.param_groups[0]["params"] == [model.weight]


@pytest.mark.parametrize("betas", [[0.9], [0.9, 1.0], [0.9, 0.98, 0.99]])
def test_bad_betas_name_the_key(betas):
    with pytest.raises(NmtError, match=r"train\.optimizer\.betas"):
        build_optimizer(torch.nn.Linear(3, 2).parameters(), OptimizerConfig(betas=betas))


# -- schedules ------------------------------------------------------------------------------


def test_constant_with_and_without_warmup():
    assert lrs(build_scheduler(optimizer(), ScheduleConfig(type="constant"), 100), 3) == [PEAK] * 3
    warm = lrs(build_scheduler(optimizer(), ScheduleConfig(type="constant", warmup_steps=4), 100), 6)
    assert warm == pytest.approx([PEAK / 4, PEAK / 2, 3 * PEAK / 4, PEAK, PEAK, PEAK])


@pytest.mark.parametrize("kind", ["noam", "inverse_sqrt"])
def test_noam_and_inverse_sqrt_peak_at_warmup_then_decay_as_inverse_sqrt(kind):
    schedule = build_scheduler(optimizer(), ScheduleConfig(type=kind, warmup_steps=100), 0)
    assert schedule.lr_at(1) == pytest.approx(PEAK / 100)
    assert schedule.lr_at(50) == pytest.approx(PEAK / 2)
    assert schedule.lr_at(100) == pytest.approx(PEAK)
    assert max(schedule.lr_at(u) for u in range(1, 1000)) == pytest.approx(PEAK)
    assert schedule.lr_at(400) == pytest.approx(PEAK / 2)  # sqrt(100 / 400)
    assert schedule.lr_at(10_000) == pytest.approx(PEAK / 10)
    floored = build_scheduler(optimizer(), ScheduleConfig(type=kind, warmup_steps=100, min_lr=2e-4), 0)
    assert floored.lr_at(400) == pytest.approx(PEAK / 2)
    assert floored.lr_at(10_000) == pytest.approx(2e-4)


def test_linear_decays_from_peak_to_min_lr_over_the_horizon_then_stays():
    cfg = ScheduleConfig(type="linear", warmup_steps=10, min_lr=1e-4)
    schedule = build_scheduler(optimizer(), cfg, max_steps=110)
    assert schedule.lr_at(5) == pytest.approx(PEAK / 2)
    assert schedule.lr_at(10) == pytest.approx(PEAK)
    assert schedule.lr_at(60) == pytest.approx(1e-4 + 0.5 * (PEAK - 1e-4))
    assert schedule.lr_at(110) == pytest.approx(1e-4)
    assert schedule.lr_at(500) == pytest.approx(1e-4)
    explicit = build_scheduler(optimizer(), ScheduleConfig(type="linear", total_steps=20), max_steps=1000)
    assert explicit.lr_at(10) == pytest.approx(PEAK / 2)  # total_steps overrides max_steps


def test_cosine_follows_half_a_cosine_to_min_lr():
    schedule = build_scheduler(optimizer(), ScheduleConfig(type="cosine", warmup_steps=10, min_lr=1e-4), 110)
    assert schedule.lr_at(10) == pytest.approx(PEAK)
    assert schedule.lr_at(35) == pytest.approx(1e-4 + (PEAK - 1e-4) * (1 + math.cos(math.pi / 4)) / 2)
    assert schedule.lr_at(60) == pytest.approx(1e-4 + (PEAK - 1e-4) / 2)
    assert schedule.lr_at(110) == pytest.approx(1e-4)
    assert schedule.lr_at(10_000) == pytest.approx(1e-4)
    values = [schedule.lr_at(u) for u in range(10, 111)]
    assert values == sorted(values, reverse=True)


def test_plateau_reduces_after_patience_and_never_below_min_lr():
    cfg = ScheduleConfig(type="plateau", plateau_factor=0.5, plateau_patience=2, min_lr=2e-4)
    schedule = build_scheduler(optimizer(), cfg, 100)
    schedule.step()
    seen = []
    for bleu in [10.0, 12.0, 11.0, 12.0, 11.5, 13.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]:
        schedule.on_validation(bleu, higher_is_better=True)
        seen.append(schedule.lr)
    # 12 does not beat 12 (strict improvement); PEAK / 8 is floored at min_lr
    assert seen == pytest.approx([PEAK, PEAK, PEAK, PEAK / 2, PEAK / 2, PEAK / 2, PEAK / 2, PEAK / 4,
                                  PEAK / 4, 2e-4, 2e-4, 2e-4])
    assert schedule.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_plateau_with_a_lower_is_better_metric_and_patience_zero():
    schedule = build_scheduler(optimizer(), ScheduleConfig(type="plateau", plateau_patience=0), 100)
    for loss in [3.0, 2.0, 2.5, float("nan"), 1.0]:
        schedule.on_validation(loss, higher_is_better=False)
    assert schedule.lr == pytest.approx(PEAK / 4)


def test_other_schedules_ignore_validations():
    schedule = build_scheduler(optimizer(), ScheduleConfig(type="constant"), 100)
    for bleu in [5.0, 1.0, 1.0, 1.0, 1.0]:
        schedule.on_validation(bleu, higher_is_better=True)
    assert schedule.lr == PEAK


@pytest.mark.parametrize("kind", ["constant", "noam", "inverse_sqrt", "linear", "cosine", "plateau"])
def test_state_dict_round_trip_gives_the_same_future_lrs(kind):
    cfg = ScheduleConfig(type=kind, warmup_steps=5, min_lr=1e-5, plateau_patience=1)
    original = build_scheduler(optimizer(), cfg, 40)
    lrs(original, 12)
    for metric in [1.0, 0.5, 0.5]:
        original.on_validation(metric, higher_is_better=True)
    state = original.state_dict()
    resumed = build_scheduler(optimizer(), cfg, 40)
    resumed.load_state_dict(state)
    assert resumed.optimizer.param_groups[0]["lr"] == original.optimizer.param_groups[0]["lr"]
    assert lrs(resumed, 30) == lrs(original, 30)
    if kind != "constant":
        assert len(set(lrs(build_scheduler(optimizer(), cfg, 40), 30))) > 1  # the comparison is not trivial


def test_optimizer_lr_follows_the_schedule_in_every_group():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 2 * PEAK}], lr=PEAK)
    schedule = build_scheduler(opt, ScheduleConfig(type="constant", warmup_steps=2), 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([PEAK / 2, PEAK])
    schedule.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([PEAK, 2 * PEAK])


@pytest.mark.parametrize("cfg, max_steps, key", [
    (ScheduleConfig(type="linear"), 0, "train.schedule.total_steps"),
    (ScheduleConfig(type="cosine"), 0, "train.schedule.total_steps"),
    (ScheduleConfig(type="cosine", warmup_steps=50, total_steps=50), 100, "train.schedule.total_steps"),
    (ScheduleConfig(type="linear", warmup_steps=100), 80, "train.max_steps"),
    (ScheduleConfig(type="noam"), 100, "train.schedule.warmup_steps"),
    (ScheduleConfig(type="inverse_sqrt"), 100, "train.schedule.warmup_steps"),
    (ScheduleConfig(type="plateau", min_lr=0.1), 100, "train.schedule.min_lr"),
])
def test_invalid_combinations_name_the_key(cfg, max_steps, key):
    with pytest.raises(NmtError, match=key.replace(".", r"\.")):
        build_scheduler(optimizer(), cfg, max_steps)


def _two_models(fused: bool):
    torch.manual_seed(0)
    models = [torch.nn.Linear(16, 8) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    return models, [torch.optim.Adam(m.parameters(), lr=0.1, fused=fused, foreach=None if fused else True)
                    for m in models]


@pytest.mark.parametrize("fused, in_step", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("max_norm", [0.01, 100.0])  # clipped / left alone
def test_clip_gradients_steps_like_clip_grad_norm(fused, in_step, max_norm):
    (ours, reference), (opt, ref_opt) = _two_models(fused)
    for _ in range(3):
        x = torch.randn(4, 16)
        for model in (ours, reference):
            model(x).square().sum().backward()
        clip_gradients(opt, max_norm, in_step=in_step)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        opt.step()
        ref_opt.step()
        for o in (opt, ref_opt):
            o.zero_grad(set_to_none=True)
    for p, q in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clip_gradients_without_gradients_does_nothing():
    (model, _), (opt, _) = _two_models(True)
    clip_gradients(opt, 1.0)
    assert opt.grad_scale is None and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "torch"])
def test_total_norm_is_the_norm_of_all_gradients_together(kernels, monkeypatch):
    """One pass of nmt/csrc/squared_norm.cpp (sizes below, at and above its 16K-element chunks, and empty
    tensors) or torch's get_total_norm; other dtypes and layouts always through torch."""
    from nmt import cpu_kernels
    if kernels and cpu_kernels.extension() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason}")
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "extension", lambda: None)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) * 3 for n in (0, 1, 17, 16384, 16385, 100_003)]
    grads.append(torch.randn(300, 257, generator=gen))
    expected = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    assert total_norm(grads) == pytest.approx(expected, rel=1e-6)
    assert total_norm([]) == 0.0
    strided = torch.randn(64, 64, generator=gen).t()
    assert total_norm([strided, grads[3]]) == pytest.approx(math.hypot(strided.norm(), grads[3].norm()), rel=1e-6)
    assert total_norm([grads[4].bfloat16()]) == pytest.approx(float(grads[4].bfloat16().float().norm()), rel=1e-2)
