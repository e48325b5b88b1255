"""The per-task backward through a shared expert, written out (:mod:`mtlbook.expert_vjp`).

It must give autograd's per-task gradients (parameters and input) for the experts it models,
decline (None) every expert it does not, and be the path the structured extraction takes on
CGC and two-level PLE in both forms, while the result stays the loop's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlbook.gradients as gradients_module
from mtlbook.expert_vjp import expert_vjp
from mtlbook.models.experts import Expert

from test_structured_extraction import assert_same, make, measure


def autograd_reference(expert: Expert, u: torch.Tensor, cotangents: torch.Tensor):
    """Per-task gradients by one autograd.grad per task: the definition."""
    out = expert(u)
    params = list(expert.parameters())
    rows = [torch.autograd.grad(out, params + [u], c, retain_graph=True) for c in cotangents]
    return [torch.stack(g) for g in zip(*rows)]


@pytest.mark.parametrize("hidden", [(), (7,), (6, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_written_out_gradients_are_autograds(hidden, dtype):
    torch.manual_seed(0)
    expert = Expert(4, 3, hidden).to(dtype)
    u = torch.randn(11, 4, dtype=dtype, requires_grad=True)
    cotangents = torch.randn(5, 11, 3, dtype=dtype)
    reference = autograd_reference(expert, u, cotangents)
    vjp = expert_vjp(expert, u.detach(), expert(u).detach(), cotangents, want_input=True)
    assert vjp is not None
    assert [p for p, _ in vjp.parameters] == list(expert.parameters())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for (_, got), want in zip(vjp.parameters, reference[:-1]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(vjp.input, reference[-1], atol=tol, rtol=tol)
    assert expert_vjp(expert, u.detach(), expert(u).detach(), cotangents).input is None


def test_a_dead_relu_unit_passes_no_gradient():
    expert = Expert(2, 1, (3,))
    with torch.no_grad():
        expert.body[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))
        expert.body[0].bias.zero_()
    u = torch.tensor([[1.0, -1.0]])  # hidden pre-activations 1, -1, -1: two units dead
    vjp = expert_vjp(expert, u, expert(u).detach(), torch.ones(2, 1, 1))
    first_weight = vjp.parameters[0][1]
    assert torch.equal(first_weight[:, 1:], torch.zeros(2, 2, 2))
    assert bool(first_weight[:, 0].abs().sum() > 0)


@pytest.mark.parametrize("case", ["dropout_training", "gelu", "output_activation", "hook", "wrong_output",
                                  "mixed_dtype", "not_an_expert"])  # fmt: skip
def test_it_declines_what_it_does_not_model(case):
    torch.manual_seed(0)
    expert: nn.Module = Expert(4, 3, (5,), dropout=0.2 if case == "dropout_training" else 0.0,
                               activation="gelu" if case == "gelu" else "relu",
                               output_activation="tanh" if case == "output_activation" else "identity")  # fmt: skip
    if case == "hook":
        expert.body[0].register_forward_hook(lambda module, args, out: out * 2)
    if case == "not_an_expert":
        expert = nn.Sequential(nn.Linear(4, 3))
    u = torch.randn(6, 4)
    output = expert(u).detach()
    cotangents = torch.randn(2, 6, 3)
    if case == "wrong_output":
        output = output + 1e-6
    if case == "mixed_dtype":
        cotangents = cotangents.double()
    assert expert_vjp(expert, u, output, cotangents) is None


def test_dropout_in_eval_mode_is_modelled():
    torch.manual_seed(0)
    expert = Expert(4, 3, (5,), dropout=0.3).eval()
    u = torch.randn(6, 4)
    assert expert_vjp(expert, u, expert(u), torch.randn(2, 6, 3)) is not None


@pytest.fixture
def batched_autograd_calls(monkeypatch):
    """How many ``autograd.grad(..., is_grads_batched=True)`` calls :mod:`mtlbook.gradients` makes."""
    calls = []
    original = torch.autograd.grad

    def spy(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(gradients_module.torch.autograd, "grad", spy)
    return calls


@pytest.mark.parametrize("kind, bank, written", [
    ("cgc", False, True), ("cgc", True, True), ("ple", False, True), ("ple", True, True),
    ("mmoe", False, True), ("mmoe", True, False),  # the bank runs MMoE's experts stacked
])  # fmt: skip
def test_structured_mode_writes_the_shared_backward_out(kind, bank, written, batched_autograd_calls):
    model = make(kind, bank=bank)
    reference = measure(model, "loop")
    batched_autograd_calls.clear()
    structured = measure(model, "structured")
    assert_same(structured, reference)
    # one batched call remains: the task losses' cotangents (losses_are_task_separable's check)
    through_experts = len(batched_autograd_calls) - 1
    assert (through_experts == 0) == written


def test_dropout_while_training_takes_autograds_way_and_stays_exact(batched_autograd_calls):
    model = make("ple", bank=True, dropout=0.3)
    torch.manual_seed(5)
    reference = measure(model, "loop")
    torch.manual_seed(5)
    batched_autograd_calls.clear()
    structured = measure(model, "structured")
    assert_same(structured, reference)
    assert len(batched_autograd_calls) > 1
