"""Tests for mtlbook.viz.adatt_plots: the pipeline decomposition must equal the module's own
transfer weights, and the diagnostics must measure what they claim."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mtlbook.adatt import AdaptiveTaskTransfer  # noqa: E402
from mtlbook.viz import adatt_plots  # noqa: E402
from mtlbook.viz.frames import figure_to_png, new_figure  # noqa: E402

NAMES = ("a", "b", "c", "d", "e")
GROUPS = {"g0": ["a", "b"], "g1": ["c", "d", "e"]}


def random_affinity(seed: int, n: int = len(NAMES)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    raw = torch.rand(n, n, generator=generator) * 2 - 1
    sym = (raw + raw.T) / 2
    sym.fill_diagonal_(1.0)
    return sym


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("blocking", ["exact", "zero_logit"])
@pytest.mark.parametrize("with_prior", [False, True])
def test_pipeline_equals_module_weights(seed, blocking, with_prior):
    affinity = random_affinity(seed)
    logits = torch.randn(len(NAMES), len(NAMES), generator=torch.Generator().manual_seed(100 + seed)) * 0.3
    present = torch.tensor([True, True, seed % 2 == 0, True, seed % 3 != 0])
    module = adatt_plots.transfer_module(
        NAMES, affinity, logits, epoch=3, blocking=blocking, temperature=0.7,
        task_groups=GROUPS if with_prior else None,
    )
    stages = adatt_plots.transfer_pipeline(module, present)
    expected = module.transfer_weights(present).detach()
    torch.testing.assert_close(stages.weights, expected, rtol=0, atol=1e-7)
    assert stages.blend_ratio == pytest.approx(module.blend_ratio)
    # absent tasks: their row and column are zero
    absent = ~present
    assert torch.all(stages.weights[absent] == 0) and torch.all(stages.weights[:, absent] == 0)


def test_transfer_module_sets_state_and_epoch():
    affinity = random_affinity(1)
    module = adatt_plots.transfer_module(NAMES, affinity * 3, warmup_epochs=1, freeze_epoch=4)
    assert module.epoch == 1 and module.phase == "dynamic"
    assert module.affinity.abs().max() <= 1.0  # clamped like the EMA
    with pytest.raises(ValueError, match="affinity"):
        adatt_plots.transfer_module(NAMES, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="logits"):
        adatt_plots.transfer_module(NAMES, affinity, torch.full((5, 5), float("nan")))


@pytest.mark.parametrize("seed", range(5))
def test_exact_blocking_has_no_mass_on_blocked_and_rows_sum_to_one(seed):
    module = adatt_plots.transfer_module(NAMES, random_affinity(seed), negative_threshold=-0.2)
    stages = adatt_plots.transfer_pipeline(module)
    assert torch.all(adatt_plots.blocked_mass(stages.weights, stages.blocked) == 0)
    open_rows = ~stages.blocked.all(dim=1)
    torch.testing.assert_close(stages.weights.sum(dim=1)[open_rows], torch.ones(int(open_rows.sum())))
    assert torch.all(stages.weights[~open_rows] == 0)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
def test_zero_logit_leak_matches_closed_form(temperature):
    affinity = random_affinity(7)
    module = adatt_plots.transfer_module(NAMES, affinity, blocking="zero_logit", temperature=temperature)
    stages = adatt_plots.transfer_pipeline(module)
    leak = adatt_plots.blocked_mass(stages.weights, stages.blocked)
    # every blocked entry has logit 0 -> weight 1/Z; the row's leak is m / (m + sum_open exp(R/T))
    m = stages.blocked.sum(dim=1).double()
    open_sum = (torch.exp(stages.blended.double() / temperature) * (~stages.blocked).double()).sum(dim=1)
    torch.testing.assert_close(leak.double(), m / (m + open_sum), rtol=1e-5, atol=1e-6)
    assert torch.all(leak > 0)  # the diagonal alone is always blocked, so something always leaks
    peers_only = adatt_plots.blocked_mass(stages.weights, stages.blocked, include_diagonal=False)
    assert torch.all(peers_only <= leak) and torch.all(peers_only >= 0)


def test_blocked_mass_validates():
    with pytest.raises(ValueError):
        adatt_plots.blocked_mass(torch.zeros(3, 3), torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError):
        adatt_plots.blocked_mass(torch.zeros(3, 3), torch.zeros(3, 3))


def test_effective_peers_limits():
    one_hot = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    uniform = torch.tensor([[0.0, 1 / 3, 1 / 3, 1 / 3]])
    scaled = 0.4 * uniform  # a masked row that sums to less than 1 is renormalised first
    empty = torch.zeros(1, 4)
    out = adatt_plots.effective_peers(torch.cat([one_hot, uniform, scaled, empty]))
    torch.testing.assert_close(out, torch.tensor([1.0, 3.0, 3.0, 0.0]))
    with pytest.raises(ValueError):
        adatt_plots.effective_peers(-torch.ones(2, 2))


def test_effective_peers_grow_with_temperature():
    affinity = random_affinity(3)
    previous = None
    for temperature in (0.1, 0.5, 1.0, 2.0, 8.0):
        module = adatt_plots.transfer_module(NAMES, affinity, temperature=temperature, negative_threshold=-1.0)
        peers = adatt_plots.effective_peers(adatt_plots.transfer_pipeline(module).weights)
        if previous is not None:
            assert torch.all(peers >= previous - 1e-5)
        previous = peers
    assert torch.all(previous <= len(NAMES) - 1 + 1e-5)


def test_plot_matrix_marks_blocked_cells():
    fig, ax = new_figure()
    blocked = torch.eye(4, dtype=torch.bool)
    blocked[0, 2] = True
    count = adatt_plots.plot_matrix(ax, torch.rand(4, 4), list("wxyz"), blocked=blocked)
    crosses = [t for t in ax.texts if t.get_text() == "×"]
    assert count == 5 and len(crosses) == 5
    assert len(ax.texts) == 16
    with pytest.raises(ValueError):
        adatt_plots.plot_matrix(ax, torch.rand(3, 3), list("wxyz"))
    figure_to_png(fig)


def test_transfer_frame_size_and_title():
    fig = adatt_plots.transfer_frame(NAMES, random_affinity(2), 0.5, 0.0, task_groups=GROUPS)
    assert isinstance(fig, Figure)
    width, height = fig.get_size_inches() * fig.dpi
    assert (round(width), round(height)) == (480, 300)
    titles = [ax.get_title() for ax in fig.axes]
    assert any("T=0.5" in t and "τ=0" in t for t in titles)
    png = figure_to_png(fig, colors=64)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_phase_timeline_draws_one_row_per_activity():
    module = AdaptiveTaskTransfer(NAMES, warmup_epochs=2, freeze_epoch=5)
    epochs = list(range(8))
    phases = [module.phase_at(e) for e in epochs]
    activity = {"measure": [p != "frozen" for p in phases], "transfer": [p != "warmup" for p in phases]}
    fig, ax = new_figure()
    adatt_plots.plot_phase_timeline(ax, epochs, activity, phases)
    bars = ax.collections
    assert len(bars) == 2
    assert [label.get_text() for label in ax.get_yticklabels()] == ["measure", "transfer"]
    assert sorted(t.get_text() for t in ax.texts) == ["dynamic", "frozen", "warmup"]
    with pytest.raises(ValueError):
        adatt_plots.plot_phase_timeline(ax, epochs, {"x": [True]}, phases)
    figure_to_png(fig)
    assert np.isfinite(ax.get_xlim()).all()


def test_pipeline_rejects_bad_input():
    with pytest.raises(TypeError):
        adatt_plots.transfer_pipeline(object())
    module = adatt_plots.transfer_module(NAMES, random_affinity(0))
    with pytest.raises(ValueError):
        adatt_plots.transfer_pipeline(module, [True, False])
