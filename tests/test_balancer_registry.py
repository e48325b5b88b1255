"""The balancer registry: register_balancer, TrainerConfig's live name check, GradientCombiner."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mtlbook.balancing import BALANCERS, GradientCombiner, LossBalancer, PCGrad, build_balancer, register_balancer
from mtlbook.models import PLE
from mtlbook.train import BALANCER_NAMES, Trainer, TrainerConfig

from _tiny import SPECS, make_dataset


@pytest.fixture
def clean_registry():
    before = dict(BALANCERS)
    yield
    BALANCERS.clear()
    BALANCERS.update(before)


def test_a_balancer_defined_here_trains_by_name_through_the_trainer(clean_registry):
    class HalfOfTheFirst(LossBalancer):
        """Task 0 at weight 0.5, the others at 1; counts its calls."""

        def __init__(self, n_tasks: int, first: float = 0.5) -> None:
            super().__init__(n_tasks)
            self.first = first
            self.calls = 0

        def weights(self) -> Tensor:
            w = torch.ones(self.n_tasks)
            w[0] = self.first
            return w

        def weight_losses(self, task_losses: Tensor, present: Tensor | None = None) -> Tensor:
            self.calls += 1
            return super().weight_losses(task_losses, present)

    with pytest.raises(ValueError, match="balancing"):
        TrainerConfig(balancing="half_first")
    assert "half_first" not in BALANCER_NAMES
    assert register_balancer("half_first", HalfOfTheFirst) is HalfOfTheFirst
    assert "half_first" in BALANCER_NAMES  # a live view of the registry

    torch.manual_seed(0)
    model = PLE(5, SPECS, n_levels=1, n_shared_experts=2, expert_hidden=(8,), expert_dim=6, tower_hidden=(6,))
    cfg = TrainerConfig(phase1_epochs=2, phase2_epochs=0, batch_size=16, lr=5e-3, progress=False, patience=None,
                        seed=1, balancing="half_first", balancing_kwargs={"first": 0.25})  # fmt: skip
    trainer = Trainer(model, cfg)
    history = trainer.fit(make_dataset(64), make_dataset(32, seed=1))
    assert isinstance(trainer.balancer, HalfOfTheFirst) and trainer.balancer.first == 0.25
    assert trainer.balancer.calls == 2 * 4  # 2 epochs of 64 / 16 batches
    last = history.records[-1]
    assert last["balancer_weights"] == [0.25, 1.0, 1.0]
    assert all(math.isfinite(v) for k, v in last["train"].items() if k.endswith("/loss"))


def test_register_balancer_rejects_bad_input(clean_registry):
    class Fine(LossBalancer):
        pass

    with pytest.raises(ValueError, match="name must be a lower-case identifier"):
        register_balancer("Has Space", Fine)
    with pytest.raises(ValueError, match="name must be"):
        register_balancer(3, Fine)
    with pytest.raises(TypeError, match="cls must be a subclass of LossBalancer"):
        register_balancer("plain_module", nn.Linear)
    with pytest.raises(TypeError, match="cls must be a subclass of LossBalancer"):
        register_balancer("instance", Fine(2))

    class Abstract(GradientCombiner):
        pass

    with pytest.raises(TypeError, match="concrete"):
        register_balancer("abstract", Abstract)
    with pytest.raises(ValueError, match="already registered to PCGrad"):
        register_balancer("pcgrad", Fine)
    register_balancer("pcgrad", PCGrad)  # the same class again is fine
    register_balancer("pcgrad", Fine, replace=True)
    assert isinstance(build_balancer("pcgrad", 2), Fine)
    with pytest.raises(TypeError, match="replace must be a bool"):
        register_balancer("fine", Fine, replace="yes")


def test_rewrites_shared_gradients_flag():
    assert not LossBalancer.rewrites_shared_gradients
    assert GradientCombiner.rewrites_shared_gradients and PCGrad.rewrites_shared_gradients
    for name, cls in BALANCERS.items():
        assert cls.rewrites_shared_gradients == issubclass(cls, GradientCombiner), name


def test_a_gradient_combiner_needs_only_combine():
    """A combiner keeping only task 0's shared gradient: shared params get g_0 plus the
    residual term, other params the plain gradient, accumulated gradients survive."""

    class FirstOnly(GradientCombiner):
        def combine(self, grads: Tensor) -> Tensor:
            return grads[0]

    shared = nn.Parameter(torch.tensor([1.0, 2.0]))
    head = nn.Parameter(torch.tensor([3.0]))
    shared.grad = torch.tensor([10.0, 10.0])
    balancer = FirstOnly(2)
    losses = balancer.weight_losses(torch.stack([(shared**2).sum(), (shared * head).sum()]))
    objective = losses.sum() + 0.5 * shared.sum()  # a non-task term: never combined
    balancer.backward(objective, losses, [shared])
    assert shared.grad.tolist() == [10.0 + 2.0 + 0.5, 10.0 + 4.0 + 0.5]
    assert head.grad.tolist() == [3.0]

    class WrongShape(GradientCombiner):
        def combine(self, grads: Tensor) -> Tensor:
            return grads

    p = nn.Parameter(torch.ones(2))
    w = WrongShape(2)
    losses = w.weight_losses(torch.stack([p.sum(), (2 * p).sum()]))
    with pytest.raises(RuntimeError, match="combine must return a tensor of shape \\[2\\]"):
        w.backward(losses.sum(), losses, [p])
