"""The capacity controller's decisions (no Ray, no model), moving settings in place, and the
refusal of shape-bound requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.checkpoint import Position, read_position, restore_training, save_checkpoint
from pipelines.experiment import OverrideError, apply_overrides
from pipelines.recipes import debug
from pipelines.train.capacity import (
    CapacityController,
    CapacitySettings,
    ShapeBoundError,
    move_memory,
    refuse_shape_bound,
    set_base_lr,
)
from pipelines.train.loop import lr_schedule
from pipelines.tune.pbt import check_pbt_space
from pipelines.tune.space import parse_space

SETTINGS = CapacitySettings(
    policy="loss", patience=2, max_memory_size=32, min_memory_size=4, probe_every=3, tolerance=0.05
)


def test_grows_after_patience_evaluations_without_improvement():
    controller = CapacityController.start(SETTINGS, 8)
    assert controller.observe(step=10, loss=2.0) is None  # the first loss sets the bar
    assert controller.observe(step=20, loss=1.99) is None  # within tolerance: stale 1
    assert controller.observe(step=30, loss=1.98) == 16  # stale 2 = patience
    assert controller.changes[-1] == {
        "step": 30,
        "old": 8,
        "new": 16,
        "reason": "grow",
        "loss": 1.98,
        "probe_loss": None,
    }
    assert controller.observe(step=40, loss=1.5) is None  # the new size starts a new bar


def test_improving_losses_keep_the_size():
    controller = CapacityController.start(SETTINGS.model_copy(update={"probe_every": 100}), 8)
    for step, loss in enumerate([3.0, 2.5, 2.0, 1.5, 1.0]):
        assert controller.observe(step, loss) is None
    assert controller.memory_size == 8


def test_never_grows_past_the_maximum_nor_starts_outside_the_bounds():
    controller = CapacityController.start(SETTINGS, 1000)
    assert controller.memory_size == 32
    for step in range(12):
        new = controller.observe(step, 2.0, probe_loss=None)
        assert new is None
    assert CapacityController.start(SETTINGS, 1).memory_size == 4


def test_shrinks_when_the_probe_costs_less_than_the_tolerance():
    controller = CapacityController.start(SETTINGS, 16)
    assert controller.probe_size(1.0) is None
    controller.observe(1, 1.0)
    controller.observe(2, 0.5)
    assert controller.probe_size(0.2) == 8  # the third evaluation probes half the size
    assert controller.observe(3, 0.2, probe_loss=0.23) == 8
    assert controller.changes[-1]["reason"] == "shrink"
    assert controller.changes[-1]["probe_loss"] == 0.23


def test_keeps_the_size_when_the_probe_costs_more_and_never_shrinks_below_the_minimum():
    controller = CapacityController.start(SETTINGS, 4)
    for step in range(6):
        assert controller.probe_size(1.0 - 0.1 * step) is None  # already at the minimum
        controller.observe(step, 1.0 - 0.1 * step)
    controller = CapacityController.start(SETTINGS, 16)
    controller.observe(1, 1.0)
    controller.observe(2, 0.5)
    assert controller.observe(3, 0.2, probe_loss=0.4) is None
    assert controller.memory_size == 16


def test_state_round_trips_through_a_checkpoint(tmp_path: Path):
    """The controller's state rides in `Position`; a restored run continues at its size."""
    controller = CapacityController.start(SETTINGS, 8)
    controller.observe(1, 2.0)
    controller.observe(2, 2.0)
    controller.observe(3, 2.0)  # grows to 16
    config = apply_overrides(debug("attention"), {"train.capacity.policy": "loss"})
    model = config.model.build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = lr_schedule(optimizer, 2, 10)
    position = Position(epoch=1, global_step=3, capacity=controller.state())
    save_checkpoint(tmp_path, model, optimizer, scheduler, position, config)

    restored = restore_training(tmp_path, model, optimizer, scheduler)
    again = CapacityController.from_state(SETTINGS, restored.capacity)
    assert again == controller
    assert read_position(tmp_path).capacity["memory_size"] == 16


def test_moving_settings_changes_every_block_and_the_lr_under_its_schedule():
    model = debug("attention").model.build()
    move_memory(model, memory_size=5, forget_threshold=0.1)
    assert {b.memory.config.memory_size for b in model.blocks} == {5}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = lr_schedule(optimizer, warmup_steps=4, total_steps=10)
    optimizer.step()
    scheduler.step()  # factor 2/4 in warm-up
    set_base_lr(optimizer, scheduler, 0.01)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0075)


def test_a_shape_bound_capacity_request_is_refused_naming_the_kind_and_the_fix():
    with pytest.raises(OverrideError) as error:
        apply_overrides(debug("lstm"), {"train.capacity.policy": "loss"})
    message = str(error.value)
    assert "cannot move memory_size of kind 'lstm'" in message
    assert "train.capacity.policy=fixed" in message
    assert "attention" in message  # a kind that can
    with pytest.raises(ShapeBoundError, match="kind 'gru'"):
        refuse_shape_bound("gru", "memory_size", asked_by="test", fix="Do something else")
    refuse_shape_bound("attention", "memory_size", asked_by="test", fix="-")


def test_pbt_refuses_a_shape_bound_size_before_any_ray_work():
    base = debug("gru")
    space = parse_space({"model.memory.memory_size": {"grid": [8, 16]}}, base)
    with pytest.raises(ShapeBoundError) as error:
        check_pbt_space(space, base)
    assert "--scheduler pbt cannot move memory_size of kind 'gru'" in str(error.value)
    assert "Drop model.memory.memory_size" in str(error.value)
    lr_only = parse_space({"train.lr": {"loguniform": [1e-4, 1e-2]}}, base)
    check_pbt_space(lr_only, base)  # the learning rate moves for any kind
    mixed = {"model.memory.kind": {"grid": ["attention", "lstm"]}} | {
        "model.memory.memory_size": {"grid": [8, 16]}
    }
    with pytest.raises(ShapeBoundError, match="kind 'lstm'"):
        check_pbt_space(parse_space(mixed, debug("attention")), debug("attention"))


def test_capacity_bounds_must_be_in_order():
    with pytest.raises(ValueError, match="min_memory_size=64 is above"):
        CapacitySettings(min_memory_size=64, max_memory_size=8)


def test_memlab_tune_refuses_a_shape_bound_pbt_size_before_ray_starts(monkeypatch):
    from typer.testing import CliRunner

    from pipelines import cli

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(cli, "_ray", no_ray)
    args = ["tune", "--recipe", "debug-gru", "-m", "8", "-m", "16", "--scheduler", "pbt"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2
    assert "cannot move memory_size of kind 'gru'" in " ".join(result.output.split())


def test_no_probe_on_a_plateau_nor_before_a_growth_pays_off():
    """Every size does equally badly on a plateau: a probe there would shrink the memory the
    model is about to need."""
    controller = CapacityController.start(SETTINGS, 8)
    probes = []

    def loss_at(size: int) -> float:
        probes.append(size)
        return 2.0

    assert [controller.decide(step, 2.0, loss_at) for step in range(3)] == [None, None, 16]
    assert [controller.decide(step, 2.0, loss_at) for step in range(3, 6)] == [None, None, 32]
    assert [controller.decide(step, 2.0, loss_at) for step in range(6, 11)] == [None] * 5
    assert probes == []  # stalled throughout, and 32 on probation: its loss has not beaten 2.0
    assert controller.decide(11, 1.0, loss_at) is None  # improving, the probe costs 1.0
    assert probes == [16]
    assert controller.memory_size == 32


def test_pbt_leaves_a_final_report_alone():
    """An exploit at the last report would relabel a trial whose model is already logged."""
    from ray.tune.schedulers import TrialScheduler

    from pipelines.tune.pbt import pbt_scheduler
    from pipelines.tune.settings import SweepSettings

    base = debug("attention")
    space = parse_space({"train.lr": {"loguniform": [1e-4, 1e-2]}}, base)
    scheduler = pbt_scheduler(SweepSettings(scheduler="pbt"), space)
    decision = scheduler.on_trial_result(None, None, {"done": True, "epoch": 2})
    assert decision == TrialScheduler.CONTINUE
