"""One registry per extension point: a model, a loss and a metric defined inside a test are
found by name, and a bad registration is refused with a clear error."""

from __future__ import annotations

import math

import pytest
import torch

from mtlbook import losses as losses_module
from mtlbook.losses import LOSSES, mse_loss, register_loss
from mtlbook.models import MODELS, SharedBottom, build_model, register_model
from mtlbook.train import Trainer, TrainerConfig
from mtlbook.train.metrics import METRICS, register_metric, rmse

from _tiny import SPECS, make_dataset


@pytest.fixture
def clean_registries():
    saved = dict(MODELS), dict(LOSSES), dict(losses_module.LOSS_TASK_KINDS), dict(METRICS)
    yield
    for registry, copy in zip((MODELS, LOSSES, losses_module.LOSS_TASK_KINDS, METRICS), saved):
        registry.clear()
        registry.update(copy)


def test_a_model_and_a_loss_defined_here_train_by_name(clean_registries):
    class Narrow(SharedBottom):
        """A Shared-Bottom with a narrow default trunk."""

        def __init__(self, n_features, task_specs, **kwargs):
            super().__init__(n_features, task_specs, expert_hidden=(4,), expert_dim=3, **kwargs)

    calls = []

    def doubled_mse(output, target, present=None, **kwargs):
        calls.append(1)
        return 2.0 * mse_loss(output, target, present, **kwargs)

    register_model("narrow", Narrow)
    register_loss("doubled_mse", doubled_mse, ["regression"])
    torch.manual_seed(0)
    model = build_model("narrow", 5, SPECS)
    config = TrainerConfig(phase1_epochs=1, phase2_epochs=0, batch_size=32, progress=False, seed=0,
                           losses={"value": "doubled_mse"})  # fmt: skip
    history = Trainer(model, config).fit(make_dataset(64))
    assert isinstance(model, Narrow) and calls and math.isfinite(history[0]["train"]["loss"])
    with pytest.raises(ValueError, match="does not fit a binary task"):
        Trainer(build_model("narrow", 5, SPECS), config.replace(losses={"click": "doubled_mse"}))


def test_a_metric_defined_here_is_found_by_name(clean_registries):
    register_metric("mae", lambda out, target, present=None: float((out - target).abs().mean()))
    out, target = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    assert METRICS["mae"](out, target) == 1.5
    assert METRICS["mse"](out, target) == pytest.approx(rmse(out, target) ** 2)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: register_model("ple", SharedBottom), ValueError, "already registered"),
        (lambda: register_model("thing", object), TypeError, "nn.Module subclass"),
        (lambda: register_loss("mse", mse_loss, ["regression"]), ValueError, "already registered"),
        (lambda: register_loss("new", mse_loss, ["ranking"]), ValueError, "task_kinds"),
        (lambda: register_loss("new", 3, ["regression"]), TypeError, "callable"),
        (lambda: register_metric("auc", rmse), ValueError, "already registered"),
        (lambda: register_metric("", rmse), ValueError, "non-empty"),
    ],
)
def test_bad_registrations_are_refused(clean_registries, call, error, match):
    with pytest.raises(error, match=match):
        call()
