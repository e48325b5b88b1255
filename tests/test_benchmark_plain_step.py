"""benchmarks/plain_step.py: each form steps as the trainer runs it, from the same weights.

No timing is asserted (the machine is shared); what is checked is that the three steppers
compute the step they are labelled with, so the table compares like with like.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mtlbook.losses import task_losses
from mtlbook.losses_grouped import grouped_task_losses
from mtlbook.models import to_bank

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "plain_step.py"


@pytest.fixture(scope="module")
def ps():
    spec = importlib.util.spec_from_file_location("plain_step_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_each_stepper_takes_its_forms_loss_and_optimizer_path(ps):
    problem = ps.make_problem(4, batch_size=32, n_batches=2, expert_hidden=(8,), expert_dim=4)
    assert problem.model.experts_mode == "modules"  # the reference the benchmark converts
    initial = copy.deepcopy(problem.model)
    bank = to_bank(problem.model)
    steppers = {
        "module": ps.Stepper(problem.model, problem.batches, problem.task_specs),
        "bank": ps.Stepper(bank, problem.batches, problem.task_specs, fast_path=True),
        "bank_per_task": ps.Stepper(copy.deepcopy(bank), problem.batches, problem.task_specs),
    }
    assert steppers["bank"].losses is grouped_task_losses and steppers["module"].losses is task_losses
    assert steppers["bank"].optimizer.defaults["fused"] and not steppers["bank"].optimizer.defaults["foreach"]
    for name in ("module", "bank_per_task"):
        assert steppers[name].optimizer.defaults["foreach"] and not steppers[name].optimizer.defaults["fused"]
    for stepper in steppers.values():
        for _ in range(3):
            stepper.step()
    # the same three steps from the same weights: the forms differ by float rounding only
    reference = steppers["module"].model(problem.batches[0].inputs)
    for name in ("bank", "bank_per_task"):
        outputs = steppers[name].model(problem.batches[0].inputs)
        for task, value in reference.items():
            torch.testing.assert_close(outputs[task], value, rtol=1e-4, atol=1e-5)
    before = initial(problem.batches[0].inputs)
    assert any(not torch.allclose(before[task], value) for task, value in reference.items())  # the steps moved it


def test_quick_run_prints_every_column_and_writes_nothing(ps, tmp_path, capsys):
    out = tmp_path / "plain_step.csv"
    assert ps.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 tasks:" in printed and "with per-task losses and foreach AdamW" in printed
    assert not out.exists()


def test_matmul_replay_keeps_the_steps_matmuls_and_their_layouts(ps):
    """The replayed matmuls are the step's own: same ops, shapes and strides (level 0's experts
    read one broadcast input, a stride-0 batch dimension, and the replay keeps it)."""
    problem = ps.make_problem(4, batch_size=32, n_batches=2, expert_hidden=(8,), expert_dim=4)
    stepper = ps.Stepper(to_bank(problem.model), problem.batches, problem.task_specs, fast_path=True)
    recorder = ps._MatmulRecorder()
    with recorder:
        stepper.forward_backward()
    run, n_matmuls = ps.matmul_replay(stepper)
    assert n_matmuls == len(recorder.calls) > 0
    layouts = [a for _, args in recorder.calls for a in args if isinstance(a, tuple)]
    assert any(0 in stride for _, stride, _ in layouts)
    for layout in layouts:
        rebuilt = ps._like(layout)
        assert (tuple(rebuilt.shape), rebuilt.stride()) == (tuple(layout[0]), layout[1])
    run()  # runs on its own, without the model


def test_a_batch_of_two_runs_the_same_ops_as_the_full_batch(ps):
    """``bank_fixed_ms`` is the step's fixed cost only if its batch of two launches the same ops
    (a batch of one does not: autograd then skips the bias gradients' sums over the batch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpNames(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    names = []
    for batch_size in (2, 64):
        problem = ps.make_problem(4, batch_size=batch_size, n_batches=2)
        stepper = ps.Stepper(to_bank(problem.model), problem.batches, problem.task_specs, fast_path=True)
        stepper.step()  # the optimizer's state exists from here on
        with OpNames() as recorder:
            stepper.step()
        names.append(recorder.names)
    assert len(names[0]) > 100
    assert names[0] == names[1]
