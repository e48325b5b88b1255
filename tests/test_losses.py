"""Tests for mtlbook.losses: each loss against an independent reference, masking, UW."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtlbook.balancing import UncertaintyBalancer
from mtlbook.data.batch import Batch, TaskSpec
from mtlbook.losses import (
    LOSSES,
    UncertaintyWeighting,
    bce_with_logits_loss,
    cross_entropy_loss,
    default_loss_for,
    focal_loss,
    huber_loss,
    info_nce_loss,
    mse_loss,
    present_tasks,
    task_losses,
)

ELEMENTWISE = [focal_loss, bce_with_logits_loss, huber_loss, mse_loss]


def _binary_data(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n, generator=g)
    target = (torch.rand(n, generator=g) < 0.4).float()
    return logits, target


def _focal_by_hand(x: torch.Tensor, y: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """Textbook focal loss from probabilities (fine for moderate logits)."""
    p = torch.sigmoid(x.double())
    y = y.double()
    p_t = torch.where(y == 1, p, 1 - p)
    alpha_t = torch.where(y == 1, torch.full_like(p, alpha), torch.full_like(p, 1 - alpha))
    return (-alpha_t * (1 - p_t) ** gamma * torch.log(p_t)).mean()


# ------------------------------------------------------------------ focal -------------


def test_focal_matches_hand_formula() -> None:
    torch.manual_seed(0)
    x, y = _binary_data()
    for gamma, alpha in [(2.0, 0.25), (0.5, 0.6), (3.0, 0.9)]:
        x_ours, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
        got = focal_loss(x_ours, y, gamma=gamma, alpha=alpha)
        reference = _focal_by_hand(x_ref, y, gamma, alpha)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(reference.item(), rel=1e-5)
        got.backward()
        reference.backward()
        assert torch.allclose(x_ours.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-7)


def test_focal_gamma_zero_is_alpha_weighted_bce() -> None:
    torch.manual_seed(0)
    x, y = _binary_data(32, seed=3)
    alpha = 0.3
    weights = y * alpha + (1 - y) * (1 - alpha)
    reference = (weights * F.binary_cross_entropy_with_logits(x, y, reduction="none")).mean()
    assert focal_loss(x, y, gamma=0.0, alpha=alpha).item() == pytest.approx(reference.item(), rel=1e-6)
    # and with no alpha it is plain BCE
    plain = F.binary_cross_entropy_with_logits(x, y)
    assert focal_loss(x, y, gamma=0.0, alpha=None).item() == pytest.approx(plain.item(), rel=1e-6)


def test_focal_down_weights_easy_examples() -> None:
    # an easy positive (large logit) loses far more to the modulating factor than a hard one
    y = torch.ones(1)
    easy, hard = torch.tensor([4.0]), torch.tensor([-1.0])
    ratio_easy = (focal_loss(easy, y, gamma=2.0) / focal_loss(easy, y, gamma=0.0)).item()
    ratio_hard = (focal_loss(hard, y, gamma=2.0) / focal_loss(hard, y, gamma=0.0)).item()
    assert ratio_easy < 1e-3 < 0.5 < ratio_hard


def test_focal_stable_for_extreme_logits() -> None:
    x = torch.tensor([200.0, -200.0, 200.0, -200.0, 0.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    for gamma in (0.0, 0.5, 2.0):
        loss = focal_loss(x, y, gamma=gamma)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        # the two confidently wrong rows dominate: roughly alpha_t * 200 each, averaged over 5
        assert loss.item() > 20.0
        x.grad = None


def test_focal_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    x, y = _binary_data(16, seed=5)
    x16, y16 = x.bfloat16().requires_grad_(), y.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = focal_loss(x16, y16)
    assert loss.dtype == torch.float32
    reference = focal_loss(x16.detach().float(), y16.float())
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    loss.backward()
    assert x16.grad is not None and x16.grad.dtype == torch.bfloat16


def test_focal_accepts_column_logits_and_validates() -> None:
    x, y = _binary_data(8)
    assert focal_loss(x[:, None], y).item() == pytest.approx(focal_loss(x, y).item())
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(x, y, gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(x, y, alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        focal_loss(x, y[:4])
    with pytest.raises(TypeError, match="present"):
        focal_loss(x, y, present=torch.ones(8))
    with pytest.raises(ValueError, match="present"):
        focal_loss(x, y, present=torch.ones(7, dtype=torch.bool))


# ------------------------------------------------------------------ simple losses -----


def test_elementwise_losses_match_torch() -> None:
    torch.manual_seed(1)
    out, tgt = torch.randn(20), 2.0 * torch.randn(20)
    x, y = _binary_data(20, seed=1)
    assert bce_with_logits_loss(x, y).item() == pytest.approx(F.binary_cross_entropy_with_logits(x, y).item())
    assert mse_loss(out, tgt).item() == pytest.approx(((out - tgt) ** 2).mean().item())
    for delta in (0.5, 1.0, 3.0):
        err = (out - tgt).abs()
        hand = torch.where(err <= delta, 0.5 * err**2, delta * (err - 0.5 * delta)).mean()
        assert huber_loss(out, tgt, delta=delta).item() == pytest.approx(hand.item(), rel=1e-6)
    with pytest.raises(ValueError, match="delta"):
        huber_loss(out, tgt, delta=0.0)


def test_cross_entropy_matches_log_softmax() -> None:
    torch.manual_seed(2)
    logits = torch.randn(10, 4)
    target = torch.randint(0, 4, (10,))
    hand = -torch.log_softmax(logits, dim=1)[torch.arange(10), target].mean()
    assert cross_entropy_loss(logits, target).item() == pytest.approx(hand.item(), rel=1e-6)
    with pytest.raises(TypeError, match="integer"):
        cross_entropy_loss(logits, target.float())
    with pytest.raises(ValueError, match="n_classes"):
        cross_entropy_loss(logits[:, 0], target)


# ------------------------------------------------------------------ masking ------------


@pytest.mark.parametrize("loss_fn", ELEMENTWISE, ids=lambda f: f.__name__)
def test_missing_rows_with_nan_targets_are_ignored(loss_fn) -> None:
    torch.manual_seed(3)
    x, y = _binary_data(10, seed=4)
    present = torch.tensor([True, False, True, True, False, True, True, False, True, True])
    poisoned = y.clone()
    poisoned[~present] = float("nan")
    x_all = x.clone().requires_grad_()
    loss = loss_fn(x_all, poisoned, present)
    loss.backward()
    reference = loss_fn(x[present], y[present])
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.isfinite(x_all.grad).all()
    assert torch.all(x_all.grad[~present] == 0)
    assert torch.any(x_all.grad[present] != 0)


def test_cross_entropy_missing_rows_with_invalid_placeholders() -> None:
    torch.manual_seed(4)
    logits = torch.randn(6, 3, requires_grad=True)
    target = torch.tensor([0, -1, 2, 99, 1, -1])  # -1 / 99 would crash cross_entropy
    present = target.ge(0) & target.lt(3)
    loss = cross_entropy_loss(logits, target, present)
    loss.backward()
    reference = F.cross_entropy(logits.detach()[present], target[present])
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.all(logits.grad[~present] == 0)


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_all_missing_gives_connected_zero(loss_name) -> None:
    torch.manual_seed(5)
    n = 5
    if loss_name == "ce":
        output, target = torch.randn(n, 3), torch.full((n,), -1)
    elif loss_name == "infonce":
        output, target = torch.randn(n, 4), torch.full((n,), -7)
    else:
        output, target = torch.randn(n), torch.full((n,), float("nan"))
    output.requires_grad_()
    loss = LOSSES[loss_name](output, target, torch.zeros(n, dtype=torch.bool))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.all(output.grad == 0)


# ------------------------------------------------------------------ InfoNCE ------------


def _info_nce_by_hand(emb: torch.Tensor, ids: torch.Tensor, temperature: float) -> float:
    z = F.normalize(emb.double(), dim=1)
    n = len(ids)
    total, anchors = 0.0, 0
    for i in range(n):
        positives = [p for p in range(n) if p != i and ids[p] == ids[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(n) if k != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / temperature) / denominator) for p in positives) / len(positives)
        anchors += 1
    return total / anchors


def test_info_nce_matches_hand_computation() -> None:
    torch.manual_seed(6)
    emb = torch.randn(7, 5)
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # ids 2 and 3 have no positive
    for temperature in (0.1, 0.5):
        got = info_nce_loss(emb, ids, temperature=temperature)
        assert got.item() == pytest.approx(_info_nce_by_hand(emb, ids, temperature), rel=1e-5)


def test_info_nce_single_positive_is_cross_entropy_over_peers() -> None:
    torch.manual_seed(7)
    emb = torch.randn(4, 3)
    ids = torch.tensor([0, 0, 1, 2])
    z = F.normalize(emb, dim=1)
    scores = z @ z.T / 0.1
    # anchor 0: positive 1 among {1, 2, 3}; anchor 1: positive 0 among {0, 2, 3}
    ce0 = F.cross_entropy(scores[0, [1, 2, 3]][None], torch.tensor([0]))
    ce1 = F.cross_entropy(scores[1, [0, 2, 3]][None], torch.tensor([0]))
    assert info_nce_loss(emb, ids).item() == pytest.approx(((ce0 + ce1) / 2).item(), rel=1e-5)


def test_info_nce_lower_for_aligned_embeddings() -> None:
    torch.manual_seed(8)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    centres = torch.randn(4, 16)
    aligned = centres[ids] + 0.05 * torch.randn(8, 16)
    shuffled = centres[ids[torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])]] + 0.05 * torch.randn(8, 16)
    random = torch.randn(8, 16)
    aligned_loss = info_nce_loss(aligned, ids).item()
    assert aligned_loss < info_nce_loss(random, ids).item()
    assert aligned_loss < info_nce_loss(shuffled, ids).item()


def test_info_nce_missing_rows_are_not_negatives() -> None:
    torch.manual_seed(9)
    emb = torch.randn(6, 4)
    ids = torch.tensor([0, 0, 1, 1, 5, 5])
    present = torch.tensor([True, True, True, True, False, False])
    got = info_nce_loss(emb, ids, present)
    assert got.item() == pytest.approx(info_nce_loss(emb[:4], ids[:4]).item(), rel=1e-6)


def test_info_nce_no_positive_gives_zero() -> None:
    emb = torch.randn(3, 4, requires_grad=True)
    loss = info_nce_loss(emb, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(emb.grad == 0)


# ------------------------------------------------------------------ registry / task_losses


def _toy_batch() -> tuple[Batch, dict[str, torch.Tensor], list[TaskSpec]]:
    torch.manual_seed(10)
    n = 8
    specs = [
        TaskSpec("click", "binary"),
        TaskSpec("value", "regression"),
        TaskSpec("segment", "multiclass", 3),
        TaskSpec("brand", "contrastive", 4),
    ]
    value_present = torch.tensor([True, True, False, True, False, True, True, True])
    value = torch.randn(n)
    value[~value_present] = float("nan")
    batch = Batch(
        torch.randn(n, 5),
        {
            "click": (torch.rand(n) < 0.5).float(),
            "value": value,
            "segment": torch.randint(0, 3, (n,)),
            "brand": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
        },
        {"value": value_present, "segment": torch.zeros(n, dtype=torch.bool)},
    )
    outputs = {
        "click": torch.randn(n, requires_grad=True),
        "value": torch.randn(n, requires_grad=True),
        "segment": torch.randn(n, 3, requires_grad=True),
        "brand": torch.randn(n, 4, requires_grad=True),
    }
    return batch, outputs, specs


def test_default_losses_and_registry() -> None:
    assert set(LOSSES) == {"focal", "bce", "huber", "mse", "ce", "infonce"}
    assert [default_loss_for(k) for k in ("binary", "regression", "multiclass", "contrastive")] == [
        "bce",
        "mse",
        "ce",
        "infonce",
    ]
    with pytest.raises(ValueError, match="binary"):
        default_loss_for("ranking")


def test_task_losses_vector_with_weights_and_options() -> None:
    batch, outputs, specs = _toy_batch()
    losses = task_losses(
        outputs,
        batch,
        specs,
        loss_names={"click": "focal", "value": "huber"},
        loss_kwargs={"click": {"alpha": 0.6}, "value": {"delta": 0.5}},
        fixed_weights={"click": 2.0, "brand": 0.5},
    )
    assert losses.shape == (4,) and losses.dtype == torch.float32
    assert torch.isfinite(losses).all()
    expected = torch.stack(
        [
            2.0 * focal_loss(outputs["click"], batch.targets["click"], alpha=0.6),
            huber_loss(outputs["value"], batch.targets["value"], batch.present["value"], delta=0.5),
            torch.tensor(0.0),  # segment: no present row
            0.5 * info_nce_loss(outputs["brand"], batch.targets["brand"]),
        ]
    )
    assert torch.allclose(losses, expected)
    losses.sum().backward()
    assert torch.all(outputs["segment"].grad == 0)
    assert torch.isfinite(outputs["value"].grad).all()
    assert present_tasks(batch, specs).tolist() == [True, True, False, True]
    assert present_tasks(batch, ["segment", "click"]).tolist() == [False, True]


def test_task_losses_rejects_bad_names() -> None:
    batch, outputs, specs = _toy_batch()
    with pytest.raises(ValueError, match="focal"):  # the message lists the valid losses
        task_losses(outputs, batch, specs, loss_names={"click": "hinge"})
    with pytest.raises(ValueError, match="valid task names"):
        task_losses(outputs, batch, specs, loss_names={"clicks": "bce"})
    with pytest.raises(ValueError, match="regression"):
        task_losses(outputs, batch, specs, loss_names={"value": "ce"})
    with pytest.raises(ValueError, match="fixed_weights"):
        task_losses(outputs, batch, specs, fixed_weights={"click": -1.0})
    with pytest.raises(ValueError, match="outputs"):
        task_losses({"click": outputs["click"]}, batch, specs)


# ------------------------------------------------------------------ uncertainty weighting


def test_uncertainty_weighting_formula() -> None:
    uw = UncertaintyWeighting(3)
    with torch.no_grad():
        uw.log_var.copy_(torch.tensor([0.0, 1.0, -2.0]))
    losses = torch.tensor([2.0, 0.5, 3.0])
    sigma2 = torch.exp(uw.log_var.detach())
    expected = losses / (2 * sigma2) + 0.5 * torch.log(sigma2)
    assert torch.allclose(uw(losses), expected)
    assert torch.allclose(uw.weights(), 0.5 / sigma2)


def test_uncertainty_weighting_range_is_kept_by_projection_not_by_a_dead_gradient() -> None:
    uw = UncertaintyWeighting(2)
    with torch.no_grad():
        uw.log_var.copy_(torch.tensor([10.0, -10.0]))
    uw.project_()
    bound = torch.tensor([4.0, -4.0])
    assert torch.equal(uw.log_var.detach(), bound)
    losses = torch.tensor([1.5, 1.5])
    out = uw(losses)
    assert torch.allclose(out, losses * torch.exp(-bound) / 2 + 0.5 * bound)
    out.sum().backward()
    # d/ds (L e^{-s} / 2 + s / 2) = (1 - L e^{-s}) / 2: alive at both bounds
    assert torch.allclose(uw.log_var.grad, 0.5 * (1 - losses * torch.exp(-bound)))
    assert torch.allclose(uw.weights(), torch.exp(-bound) / 2)
    assert not hasattr(UncertaintyWeighting, "PRECISION_RANGE")  # the clamp that could never bind is gone


@pytest.mark.parametrize("hook", [True, False])  # False: a custom loop that never calls the hook
def test_uncertainty_weight_recovers_after_a_long_stretch_of_tiny_loss(hook: bool) -> None:
    """A loss at 0.005 (optimum s = -5.3, beyond the bound) for 300 steps, then 1.0:
    the weight must come back toward 1/2 (it used to stay at 27.3 for good)."""
    balancer = UncertaintyBalancer(1)
    opt = torch.optim.Adam(balancer.parameters(), lr=0.05)

    def steps(loss: float, n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            balancer.weight_losses(torch.tensor([loss])).sum().backward()
            opt.step()
            if hook:
                balancer.after_optimizer_step()
                assert -4.0 <= float(balancer.uncertainty.log_var.detach()) <= 4.0

    steps(0.005, 300)
    balancer.uncertainty.project_()
    assert float(balancer.weights()) == pytest.approx(0.5 * math.exp(4.0))  # held at the bound
    steps(1.0, 300)
    assert float(balancer.weights()) == pytest.approx(0.5, abs=0.05)


def test_uncertainty_weighting_absent_tasks() -> None:
    uw = UncertaintyWeighting(3)
    losses = torch.tensor([1.0, float("nan"), 2.0], requires_grad=True)
    present = torch.tensor([True, False, True])
    out = uw(losses, present)
    assert out[1].item() == 0.0 and torch.isfinite(out).all()
    out.sum().backward()
    assert uw.log_var.grad[1].item() == 0.0
    # d/ds [L e^{-s}/2 + s/2] at s = 0 is (1 - L)/2
    assert uw.log_var.grad[0].item() == pytest.approx(0.0)
    assert uw.log_var.grad[2].item() == pytest.approx(-0.5)


def test_uncertainty_weighting_learns_inverse_loss_scale() -> None:
    torch.manual_seed(11)
    uw = UncertaintyWeighting(2)
    opt = torch.optim.SGD(uw.parameters(), lr=0.2)
    losses = torch.tensor([0.5, 4.0])  # the optimum is sigma^2 = L
    for _ in range(300):
        opt.zero_grad()
        uw(losses).sum().backward()
        opt.step()
    assert torch.allclose(uw.log_var.detach(), torch.log(losses), atol=1e-2)


def test_uncertainty_weighting_validates() -> None:
    with pytest.raises(ValueError, match="n_tasks"):
        UncertaintyWeighting(0)
    with pytest.raises(ValueError, match="shape"):
        UncertaintyWeighting(2)(torch.ones(3))
