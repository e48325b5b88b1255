"""The structured extraction of per-task gradients: exact, and only the shared experts run per task.

``extraction="structured"`` (:func:`mtlbook.gradients.structured_gradients`) takes one ordinary
backward to the task-private features and one backward through the shared experts batched
over the tasks. These tests check that it gives the loop's ``G`` (within 1e-6 of the largest
entry) on every mixture model in both forms, with balancer weights and absent tasks; that it
falls back to the cut wherever its premise does not hold (no mixture record, three PLE levels,
block attention, a loss that mixes tasks); that a task's tower runs once, not once per task;
that chunking over tasks changes nothing; bad attachment; and that adaTT trains with it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlbook.adatt import TaskAffinityComputer
from mtlbook.balancing import UncertaintyBalancer
from mtlbook.gradients import losses_are_task_separable, stacked_gradients, structured_gradients
from mtlbook.losses import present_tasks, task_losses
from mtlbook.models import PLE, build_model, to_bank

from _tiny import NAMES, SPECS, make_dataset, train_adatt


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float rounding: every entry within 1e-6 of the largest entry of ``b``."""
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())


def make(kind: str, seed: int = 0, bank: bool = False, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(kind, 5, SPECS, experts="modules", **kwargs)
    return to_bank(model) if bank else model


def measure(model: nn.Module, mode: str, weighted: bool = True, present=None, mix: float = 0.0) -> torch.Tensor:
    """``G`` of one batch; losses reweighted by uncertainty weighting; ``mix`` adds a share of
    task 1's loss to task 0's (a loss that is not task-separable)."""
    batch = make_dataset(48, seed=1).collate(range(48))
    computer = TaskAffinityComputer(NAMES, extraction=mode).attach(model)
    raw = task_losses(model(batch.inputs), batch, SPECS)
    if weighted:
        balancer = UncertaintyBalancer(len(NAMES))
        with torch.no_grad():
            next(balancer.parameters()).copy_(torch.tensor([0.3, -0.2, 0.1]))
        raw = balancer.weight_losses(raw, present_tasks(batch, NAMES))
    if mix:
        raw = torch.stack([raw[0] + mix * raw[1], raw[1], raw[2]])
    return computer.extract_gradients(raw, present=present)


@pytest.mark.parametrize("kind", ["mmoe", "cgc", "ple"])
@pytest.mark.parametrize("bank", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_structured_gives_the_loops_gradients(kind, bank, weighted):
    model = make(kind, bank=bank)
    structured = measure(model, "structured", weighted)
    assert model.mixture_levels is not None  # the structured path ran, not a fallback
    assert structured.abs().sum() > 0
    assert_same(structured, measure(make(kind, bank=bank), "loop", weighted))


def test_unequal_expert_counts_and_absent_tasks():
    kwargs = dict(n_task_experts={"click": 2, "value": 0, "kind": 1})
    present = torch.tensor([True, False, True])
    structured = measure(make("ple", **kwargs), "structured", present=present)
    assert torch.count_nonzero(structured[1]) == 0 and torch.count_nonzero(structured[0]) > 0
    assert_same(structured, measure(make("ple", **kwargs), "loop", present=present))


@pytest.mark.parametrize(
    "kind,kwargs",
    [("shared_bottom", {}), ("ple", {"n_levels": 3}), ("block_cgc", {"shared_expert_dims": (4, 10)})],
    ids=["shared_bottom", "ple3", "block"],
)
def test_models_without_a_two_level_mixture_record_fall_back(kind, kwargs):
    """Shared-Bottom has no gates; from three PLE levels on, task experts below the last two
    levels reach every tower through the shared gates; block attention is not a weighted sum."""
    model = make(kind, **kwargs)
    structured = measure(model, "structured")
    assert model.mixture_levels is None
    assert_same(structured, measure(make(kind, **kwargs), "loop"))


def test_three_levels_would_break_the_premise():
    """Why PLE with three levels records no mixture: fed its levels anyway, the structured pass
    misses the paths through the middle shared gate, and the result is wrong."""
    torch.manual_seed(0)
    model = PLE(5, SPECS, n_levels=3)
    batch = make_dataset(48, seed=1).collate(range(48))
    model.n_levels = 2  # record the levels as a two-level model would
    roots = list(task_losses(model(batch.inputs), batch, SPECS).unbind(0))
    model.n_levels = 3
    by_level = model.shared_parameters_by_level()
    flat = [p for level in by_level for p in level]
    loop = stacked_gradients(roots, [0, 1, 2], flat, "loop")
    wrong = [g for level in structured_gradients(roots, [0, 1, 2], model.mixture_levels, by_level) for g in level]
    assert any(float((a - b).abs().max()) > 1e-4 * float(b.abs().max()) for a, b in zip(wrong, loop))


def test_a_loss_that_mixes_tasks_is_detected_and_cut():
    model = make("ple")
    mixed = measure(model, "structured", mix=0.5)
    assert_same(mixed, measure(make("ple"), "loop", mix=0.5))
    batch = make_dataset(32, seed=2).collate(range(32))
    out = model(batch.inputs)
    raw = task_losses(out, batch, SPECS)
    outputs = list(out.values())
    assert losses_are_task_separable(list(raw.unbind(0)), [0, 1, 2], outputs)
    assert not losses_are_task_separable([raw[0] + raw[2], raw[1], raw[2]], [0, 1, 2], outputs)


def test_each_tower_runs_once_not_once_per_task():
    """The loop's backward from L_k runs every tower; the structured pass runs every tower in
    one ordinary backward (after the first measurement, which checks the losses once)."""
    model = make("ple")
    computer = TaskAffinityComputer(NAMES, extraction="structured").attach(model)
    batch = make_dataset(32, seed=4).collate(range(32))
    computer.extract_gradients(task_losses(model(batch.inputs), batch, SPECS))  # first: the check
    calls = {name: 0 for name in NAMES}
    out = model(batch.inputs)
    for name in NAMES:
        out[name].register_hook(lambda grad, name=name: calls.__setitem__(name, calls[name] + 1))
    computer.extract_gradients(task_losses(out, batch, SPECS))
    assert calls == {name: 1 for name in NAMES}


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_chunks_of_tasks_give_the_same_gradients(chunk_size):
    model = make("ple", bank=True)
    batch = make_dataset(32, seed=5).collate(range(32))
    roots = list(task_losses(model(batch.inputs), batch, SPECS).unbind(0))
    by_level = model.shared_parameters_by_level()
    whole = structured_gradients(roots, [0, 1, 2], model.mixture_levels, by_level)
    chunked = structured_gradients(roots, [0, 1, 2], model.mixture_levels, by_level, chunk_size=chunk_size)
    for a_level, b_level in zip(whole, chunked):
        for a, b in zip(a_level, b_level):
            assert a.shape[0] == 3 and torch.allclose(a, b, rtol=0, atol=1e-7)


def test_the_computer_and_adatt_take_a_chunk_size(monkeypatch):
    """``chunk_size`` reaches :func:`structured_gradients` through the public classes: the
    same ``G`` as all tasks at once, and a clear error for a bad value or another mode."""
    from mtlbook.adatt import AdaptiveTaskTransfer

    model = make("ple", bank=True)
    batch = make_dataset(32, seed=5).collate(range(32))
    at_once = TaskAffinityComputer(NAMES, extraction="structured").attach(model)
    computer = TaskAffinityComputer(NAMES, extraction="structured", chunk_size=2).attach(model)
    assert "chunk_size=2" in repr(computer)
    losses = task_losses(model(batch.inputs), batch, SPECS)  # after attach: both see this forward
    whole = at_once.extract_gradients(losses)
    import mtlbook.adatt.affinity as affinity_module

    seen = []

    def spy(*args, chunk_size=None, **kwargs):
        seen.append(chunk_size)
        return structured_gradients(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(affinity_module, "structured_gradients", spy)
    assert_same(computer.extract_gradients(losses), whole)
    assert seen == [2]
    adatt = AdaptiveTaskTransfer(NAMES, extraction="structured", chunk_size=1)
    assert adatt.affinity_computer.chunk_size == 1
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1"):
            TaskAffinityComputer(NAMES, extraction="structured", chunk_size=bad)
    with pytest.raises(ValueError, match=r'chunk_size applies to extraction="structured" \(or "auto"\) only'):
        AdaptiveTaskTransfer(NAMES, extraction="batched", chunk_size=2)
    assert TaskAffinityComputer(NAMES, chunk_size=2).chunk_size == 2  # "auto" may pick structured


def test_bad_attachment_is_a_clear_error():
    with pytest.raises(TypeError, match='extraction="structured" needs an mtlbook mixture model'):
        TaskAffinityComputer(["a"], extraction="structured").attach(_SharedOnly())
    with pytest.raises(ValueError, match="needs the model's task order"):
        TaskAffinityComputer(list(reversed(NAMES)), extraction="structured").attach(make("ple"))


class _SharedOnly(nn.Module):
    """A model with shared parameters but no mixture record."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(2, 2)

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())


def test_adatt_trains_with_the_structured_extraction():
    structured, loop = train_adatt("structured"), train_adatt("loop")
    assert structured.affinity_computer.extraction == "structured"
    assert int(structured.affinity_computer.n_updates) == int(loop.affinity_computer.n_updates) > 0
    a, b = structured.affinity_computer.affinity, loop.affinity_computer.affinity
    assert not torch.equal(b, torch.eye(len(NAMES)))
    assert float((a - b).abs().max()) < 1e-4


# ------------------------------------------------------------------------------ the default: "auto"
@pytest.mark.parametrize("kind, kwargs, parameter_set, reverse, mode", [
    ("ple", {}, "all", False, "structured"),
    ("mmoe", {}, "weights", False, "structured"),
    ("cgc", {}, "all", True, "cut"),  # another task order than the model's: the structured pass cannot map tasks
    ("ple", {}, "last_layer", False, "cut"),
    # Shared-Bottom has the mixture API but records no mixture: the structured mode takes the cut itself
    ("shared_bottom", {}, "all", False, "structured"),
])  # fmt: skip
def test_auto_picks_the_cheapest_exact_mode_and_gives_the_same_gradients(kind, kwargs, parameter_set, reverse, mode):
    names = list(reversed(NAMES)) if reverse else NAMES
    computer = TaskAffinityComputer(names, parameter_set=parameter_set)
    assert computer.extraction == "auto" and computer.mode == "batched"  # before attach: nothing captured
    for bank in (False, True):
        model = make(kind, bank=bank, **kwargs)
        computer.attach(model)
        assert computer.mode == mode and f"(mode {mode!r})" in repr(computer)
        reference = TaskAffinityComputer(names, extraction="loop", parameter_set=parameter_set).attach(model)
        batch = make_dataset(40, seed=2).collate(range(40))
        losses = task_losses(model(batch.inputs), batch, SPECS)
        if reverse:
            losses = losses.flip(0)
        assert_same(computer.extract_gradients(losses), reference.extract_gradients(losses))


def test_auto_takes_the_cut_for_a_model_without_the_mixture_api():
    from mtlbook.adatt.affinity import auto_extraction

    assert auto_extraction(_SharedOnly(), "all", ["a"]) == "cut"
    assert auto_extraction(make("ple"), "all", NAMES) == "structured"


def test_adatt_and_the_trainer_default_to_auto():
    from mtlbook.adatt import COMPUTER_EXTRACTIONS, AdaptiveTaskTransfer

    assert COMPUTER_EXTRACTIONS[0] == "auto"
    assert AdaptiveTaskTransfer(NAMES).affinity_computer.extraction == "auto"
    with pytest.raises(ValueError, match=r"extraction must be one of \('auto', 'batched'"):
        AdaptiveTaskTransfer(NAMES, extraction="fastest")
    trained = train_adatt(None)  # the library default
    assert trained.affinity_computer.mode == "structured"
    loop = train_adatt("loop")
    assert float((trained.affinity_computer.affinity - loop.affinity_computer.affinity).abs().max()) < 1e-4
