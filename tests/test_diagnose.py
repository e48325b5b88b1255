"""mtlbook.gradients, mtlbook.diagnose and mtlbook.GradientMonitor on models mtlbook did not build."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import mtlbook
from mtlbook.diagnose import DiagnosisReport, Finding, split_batch
from mtlbook.diagnose.noise import binomial_tail, noise_thresholds
from mtlbook.gradients import cosine_matrix, per_task_gradients

ROOT = Path(__file__).resolve().parents[1]


class TwoHeads(nn.Module):
    """A plain multi-task net: a trunk, a regression head and a 3-class head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.ReLU())
        self.reg = nn.Linear(8, 1)
        self.cls = nn.Linear(8, 3)

    def forward(self, x):
        z = self.trunk(x)
        return self.reg(z).squeeze(1), self.cls(z)


def make_batches(n_batches=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(size, 6, generator=g)
        out.append({"x": x, "y": 50 * x[:, 0] + 10, "c": (x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()})
    return out


def loss_fn(model):
    def task_losses(batch):
        reg, cls = model(batch["x"])
        return {"reg": ((reg - batch["y"]) ** 2).mean(), "cls": nn.functional.cross_entropy(cls, batch["c"])}
    return task_losses


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TwoHeads()


# --------------------------------------------------------------------------- the gradient helper


def test_per_task_gradients_equal_autograd_and_keep_the_graph(model):
    batch = make_batches(1)[0]
    losses = loss_fn(model)(batch)
    params = list(model.trunk.parameters())
    result = per_task_gradients(losses, params)
    assert result.task_names == ("reg", "cls") and result.detached == ()
    for row, loss in zip(result.gradients, losses.values()):
        direct = torch.autograd.grad(loss, params, retain_graph=True)
        torch.testing.assert_close(row, torch.cat([g.reshape(-1) for g in direct]).double())
    sum(losses.values()).backward()  # the graph survived
    assert all(p.grad is not None for p in params)


def test_cosine_matrix_has_a_floor_for_zero_rows():
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-2.0, 0.0]])
    c = cosine_matrix(g)
    torch.testing.assert_close(c, torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 1.0]]))


def test_per_task_gradients_report_detached_losses(model):
    batch = make_batches(1)[0]
    reg, cls = model(batch["x"])
    losses = {"reg": reg.mean(), "const": torch.tensor(1.0), "head_only": model.cls.bias.sum()}
    result = per_task_gradients(losses, model.trunk)
    assert result.detached == ("const", "head_only")
    assert result.gradients[1:].abs().sum() == 0 and result.gradients[0].abs().sum() > 0


# --------------------------------------------------------------------------- diagnose: the numbers


def test_diagnose_norms_and_cosines_equal_a_direct_autograd_computation(model):
    batches = make_batches(5)
    report = mtlbook.diagnose(loss_fn(model), batches, model.trunk)
    assert isinstance(report, DiagnosisReport) and report.task_names == ("reg", "cls")
    assert report.grad_norms.shape == (5, 2) and report.cosines.shape == (5, 2, 2)
    params = list(model.trunk.parameters())
    for b, batch in enumerate(batches):
        reg, cls = model(batch["x"])
        losses = [((reg - batch["y"]) ** 2).mean(), nn.functional.cross_entropy(cls, batch["c"])]
        flat = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, params, retain_graph=True)]).double() for l in losses]
        np.testing.assert_allclose(report.grad_norms[b], [f.norm().item() for f in flat], rtol=1e-10)
        cos = (flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm())).item()
        np.testing.assert_allclose(report.cosines[b, 0, 1], cos, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(report.ratios[b, 0, 1], flat[0].norm().item() / flat[1].norm().item(), rtol=1e-10)
    assert all(p.grad is None for p in model.parameters())  # diagnose touches no .grad


def test_diagnose_affinity_is_chapter_5s_ema(model):
    report = mtlbook.diagnose(loss_fn(model), make_batches(4), model.trunk, noise_baseline=False)
    expected = report.cosines[0, 0, 1]
    for c in report.cosines[1:, 0, 1]:
        expected = 0.9 * expected + 0.1 * c
    np.testing.assert_allclose(report.affinity[0, 1], expected, rtol=1e-5)
    assert not report.has_noise_baseline
    assert any(f.kind == "no-noise-baseline" for f in report.findings())


def test_imbalance_finding_names_the_small_task_and_the_number(model):
    report = mtlbook.diagnose(loss_fn(model), make_batches(8), model.trunk)
    median = float(np.median(report.grad_norms[:, 0] / report.grad_norms[:, 1]))
    assert median > 10
    imbalance = [f for f in report.findings() if f.kind == "imbalance"]
    assert len(imbalance) == 1 and imbalance[0].tasks == ("reg", "cls") and imbalance[0].chapter == "chapter 2"
    assert imbalance[0].value == pytest.approx(median)
    assert f"{median:.0f}x smaller" in imbalance[0].text


def test_two_identical_tasks_have_cosine_one_and_never_conflict(model):
    def same(batch):
        reg, _ = model(batch["x"])
        loss = ((reg - batch["y"]) ** 2).mean()
        return {"a": loss, "b": loss}

    report = mtlbook.diagnose(same, make_batches(12), model.trunk)
    np.testing.assert_allclose(report.cosines[:, 0, 1], 1.0, atol=1e-12)
    assert report.conflict_share[0, 1] == 0.0
    assert not any(f.kind == "conflict" for f in report.findings())
    assert any(f.kind == "no-conflict" for f in report.findings())


def _noise_tasks(seed, n_batches=300):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 8))
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(64, 20, generator=g), torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g))
               for _ in range(n_batches)]

    def losses(batch):
        x, s1, s2 = batch
        z = trunk(x)
        # linear losses with zero-mean random coefficients: each gradient is pure noise
        return {"n1": (s1 * z).sum(1).mean(), "n2": (s2 * z).sum(1).mean()}

    return mtlbook.diagnose(losses, batches, trunk)


def test_two_independent_noise_tasks_conflict_at_the_noise_rate():
    report = _noise_tasks(0)
    k, m = report.conflict_counts()
    share = report.conflict_share[0, 1]
    # about half of the cosines are negative: the naive count would call that conflict
    assert 0.4 < report.negative_share[0, 1] < 0.6
    # below the noise threshold: consistent with alpha = 5 % (two-sided binomial check at 0.1 %)
    assert binomial_tail(int(k[0, 1]), int(m[0, 1]), 0.05) > 0.001
    assert binomial_tail(int(m[0, 1] - k[0, 1]), int(m[0, 1]), 0.95) > 0.001
    assert share < 0.1
    assert report.noise_threshold[0, 1] < -0.05
    assert not any(f.kind == "conflict" for f in report.findings())
    assert {f.tasks for f in report.findings() if f.kind == "noisy-task"} == {("n1",), ("n2",)}


def test_a_real_conflict_is_called():
    torch.manual_seed(0)
    trunk = nn.Linear(10, 4)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(32, 10, generator=g) for _ in range(40)]

    def losses(x):
        z = trunk(x)
        return {"up": (z - 1).pow(2).mean(), "down": (z + 1).pow(2).mean()}

    report = mtlbook.diagnose(losses, batches, trunk)
    assert report.conflict_share[0, 1] > 0.9
    conflict = [f for f in report.findings() if f.kind == "conflict"]
    assert len(conflict) == 1 and conflict[0].chapter == "chapter 3"
    assert any(f.kind == "blocking" for f in report.findings())


def test_noise_thresholds_and_binomial_tail():
    null = np.zeros((4, 2, 2))
    null[:, 0, 1] = [0.1, -0.2, 0.3, 0.05]
    null[:, 1, 0] = np.nan
    t = noise_thresholds(null, 0.25)
    pooled = np.array([0.1, -0.2, 0.3, 0.05, -0.1, 0.2, -0.3, -0.05])
    assert t[0, 1] == pytest.approx(np.quantile(pooled, 0.25)) and t[0, 1] == t[1, 0] and t[0, 0] == 0
    assert binomial_tail(0, 10, 0.3) == 1.0
    assert binomial_tail(10, 10, 0.5) == pytest.approx(0.5**10)
    assert binomial_tail(3, 5, 0.5) == pytest.approx(0.5)


# --------------------------------------------------------------------------- transfer bound


def test_transfer_factors_follow_the_column_sums(model):
    report = mtlbook.diagnose(loss_fn(model), make_batches(3), model.trunk)
    n = 3
    report = DiagnosisReport(
        task_names=("a", "b", "c"), grad_norms=np.ones((1, n)), cosines=np.ones((1, n, n)),
        noise_cosines=np.full((1, n), np.nan), null_cosines=np.full((1, n, n), np.nan), losses=np.ones((1, n)),
        affinity_history=np.array([[[1.0, 0.5, 0.5], [0.5, 1.0, -0.5], [0.5, -0.5, 1.0]]]), steps=np.zeros(1),
    )
    # a lends to b and c (1/2 each); b and c can only lend to a (1 each): c_a = 1 + 0.1 * 2
    np.testing.assert_allclose(report.transfer_factors(), [1.2, 1.05, 1.05])
    transfer = [f for f in report.findings() if f.kind == "transfer"][0]
    assert transfer.value == pytest.approx(20.0) and "appendix A.5" in transfer.text
    open_all = DiagnosisReport(**{**report.__dict__, "affinity_history": np.ones((1, n, n))})
    np.testing.assert_allclose(open_all.transfer_factors(), 1.1)  # every row lends fully: 1 + lambda


# --------------------------------------------------------------------------- report outputs


def test_summary_plot_and_findings(model):
    report = mtlbook.diagnose(loss_fn(model), make_batches(6), model.trunk)
    table = report.summary()
    assert list(table.index) == ["reg / cls"]
    assert table.loc["reg / cls", "median ratio"] == pytest.approx(report.ratio_quantiles("reg", "cls", [0.5])[0])
    assert set(report.task_summary().index) == {"reg", "cls"}
    fig = report.plot()
    assert isinstance(fig, Figure) and len(fig.axes) == 4  # three panels and a colour bar
    boxes = [ax.get_position() for ax in fig.axes[:3]]
    assert boxes[0].x0 < boxes[1].x0 < boxes[2].x0, "a wide figure puts the panels side by side"
    column = report.plot(width=5.6, height=7.2)
    boxes = [ax.get_position() for ax in column.axes[:3]]
    assert boxes[0].y0 > boxes[1].y0 > boxes[2].y0, "a column-wide figure stacks them"
    findings = report.findings()
    assert findings and all(isinstance(f, Finding) and re.search(r"\((chapter \d|appendix A\.5)\)\.$", f.text) for f in findings)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(model):
    batches = make_batches(2)
    fn = loss_fn(model)
    with pytest.raises(ValueError, match="batches yielded no batch"):
        mtlbook.diagnose(fn, [], model.trunk)
    with pytest.raises(TypeError, match="batches must be an iterable"):
        mtlbook.diagnose(fn, 3, model.trunk)
    with pytest.raises(TypeError, match="task_losses must be a callable"):
        mtlbook.diagnose("loss", batches, model.trunk)

    def vector(batch):
        reg, _ = model(batch["x"])
        return {"reg": (reg - batch["y"]) ** 2}

    with pytest.raises(ValueError, match=r"task_losses\(batch 0\)\['reg'\] must be a scalar"):
        mtlbook.diagnose(vector, batches, model.trunk)

    def nonfinite(batch):
        reg, _ = model(batch["x"])
        return {"reg": reg.mean() * float("nan"), "b": reg.mean()}

    with pytest.raises(ValueError, match=r"task_losses\(batch 0\) gave non-finite losses \{'reg': nan\}"):
        mtlbook.diagnose(nonfinite, batches, model.trunk)
    with pytest.raises(TypeError, match="must return a dict"):
        mtlbook.diagnose(lambda b: [fn(b)["reg"]], batches, model.trunk)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"shared_parameters\[0\] .* does not require grad"):
        mtlbook.diagnose(fn, batches, list(frozen.parameters()))
    with pytest.raises(ValueError, match="shared_parameters: the module has no parameter"):
        mtlbook.diagnose(fn, batches, frozen)
    with pytest.raises(ValueError, match="shared_parameters must hold at least one tensor"):
        mtlbook.diagnose(fn, batches, [])
    with pytest.raises(ValueError, match="n_batches must be an int >= 1"):
        mtlbook.diagnose(fn, batches, model.trunk, n_batches=0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 0.5\)"):
        mtlbook.diagnose(fn, batches, model.trunk, alpha=0.7)
    with pytest.raises(ValueError, match="expected the same tasks"):
        calls = iter([fn, lambda b: {"other": fn(b)["reg"]}])
        mtlbook.diagnose(lambda b: next(calls)(b), batches, model.trunk, noise_baseline=False)
    with pytest.raises(ValueError, match="split: a batch needs at least 2 rows"):
        mtlbook.diagnose(fn, [{k: v[:1] for k, v in batches[0].items()}], model.trunk)


def test_a_task_that_does_not_reach_the_shared_parameters_is_reported(model):
    def losses(batch):
        reg, cls = model(batch["x"])
        return {"reg": ((reg - batch["y"]) ** 2).mean(), "bias": model.cls.bias.pow(2).sum(), "const": torch.tensor(2.0)}

    report = mtlbook.diagnose(losses, make_batches(3), model.trunk)
    assert report.detached_tasks == ("bias", "const")
    detached = [f for f in report.findings() if f.kind == "detached"]
    assert [f.tasks for f in detached] == [("bias",), ("const",)]
    assert np.isnan(report.ratios[:, 0, 1]).all()


# --------------------------------------------------------------------------- split


@dataclass
class Pair:
    x: torch.Tensor
    meta: str


def test_split_batch_handles_containers():
    x = torch.arange(10).reshape(5, 2)
    a, b = split_batch({"x": x, "t": (x[:, 0], [x[:, 1]]), "k": 3, "p": Pair(x, "m")})
    assert a["x"].tolist() == x[0::2].tolist() and b["x"].tolist() == x[1::2].tolist()
    assert a["t"][1][0].tolist() == [1, 5, 9] and a["k"] == 3 and b["p"].meta == "m"
    assert b["p"].x.shape == (2, 2)
    with pytest.raises(ValueError, match="one batch size"):
        split_batch((torch.zeros(4), torch.zeros(3)))
    with pytest.raises(ValueError, match="no tensor with a leading batch dimension"):
        split_batch({"k": 1})


def test_split_batch_works_on_mtlbook_batches():
    from mtlbook.data import Batch

    batch = Batch(torch.randn(6, 3), {"t": torch.randn(6)}, {"t": torch.ones(6, dtype=torch.bool)})
    a, b = split_batch(batch)
    assert isinstance(a, Batch) and a.inputs.shape == (3, 3) and b.targets["t"].shape == (3,)


# --------------------------------------------------------------------------- the monitor


def test_gradient_monitor_in_a_training_loop(model):
    batches = make_batches(6)
    fn = loss_fn(model)
    monitor = mtlbook.GradientMonitor(model.trunk, ["reg", "cls"], every=3, task_losses=fn)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    measured = []
    for epoch in range(4):
        for batch in batches:
            losses = fn(batch)
            measured.append(monitor.step(losses, batch))
            sum(losses.values()).backward()  # the monitor left the graph intact
            opt.step()
            opt.zero_grad()
    assert sum(measured) == 8 and measured[0] and not measured[1]
    report = monitor.report()
    assert report.source == "monitor" and report.steps.tolist() == list(range(0, 24, 3))
    assert report.grad_norms.shape == (8, 2) and report.has_noise_baseline
    assert any(f.kind == "drift" for f in report.findings())


def test_gradient_monitor_matches_diagnose_at_the_same_weights(model):
    batches = make_batches(3)
    fn = loss_fn(model)
    monitor = mtlbook.GradientMonitor(model.trunk, ["reg", "cls"], every=1)
    for batch in batches:
        monitor.step([fn(batch)["reg"], fn(batch)["cls"]])  # a sequence in task_names order
    direct = mtlbook.diagnose(fn, batches, model.trunk, noise_baseline=False)
    np.testing.assert_allclose(monitor.report().grad_norms, direct.grad_norms)
    np.testing.assert_allclose(monitor.report().cosines, direct.cosines)


def test_gradient_monitor_bad_inputs_and_nonfinite_steps(model):
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        mtlbook.GradientMonitor(model.trunk, ["a"], every=0)
    with pytest.raises(ValueError, match="task_names must be"):
        mtlbook.GradientMonitor(model.trunk, "ab")
    monitor = mtlbook.GradientMonitor(model.trunk, ["reg", "cls"], every=1)
    losses = loss_fn(model)(make_batches(1)[0])
    with pytest.raises(ValueError, match="expected the same tasks"):
        monitor.step({"reg": losses["reg"]})
    assert monitor.step({"reg": losses["reg"] * float("inf"), "cls": losses["cls"]}) is False
    report = monitor.report()
    assert report.n_batches == 0 and report.skipped == {"a task loss was not finite": 1}
    with_fn = mtlbook.GradientMonitor(model.trunk, ["reg", "cls"], task_losses=loss_fn(model))
    with pytest.raises(ValueError, match="batch is required"):
        with_fn.step(losses)


# --------------------------------------------------------------------------- README


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it on your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 5
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), namespace)
    report = namespace["report"]
    assert isinstance(report, DiagnosisReport) and report.n_batches == 20
    assert any(f.kind == "imbalance" for f in report.findings())
