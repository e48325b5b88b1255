"""``TrainerConfig(compile_forward=True)``: the forward pass and the losses compiled by torch.compile.

The same arithmetic in fused ops: a compiled run ends at the eager run's weights to float
rounding (not bit for bit). The combinations it does not support are refused with an error
that names the setting. The compilation itself (Inductor, C++ on the CPU) takes tens of
seconds the first time, so these tests train one tiny model a few steps.
"""

from __future__ import annotations

import pytest
import torch

from _tiny import NAMES, SPECS, make_dataset
from torch._dynamo.testing import CompileCounterWithBackend

from mtlbook._data_checks import defer, deferred_checks
from mtlbook.adatt import AdaptiveTaskTransfer
from mtlbook.balancing import build_balancer
from mtlbook.losses_grouped import grouped_task_losses
from mtlbook.models import build_model
from mtlbook.train import Callback, Trainer, TrainerConfig
from mtlbook.train.compiled import check_compile, forward_and_losses


def _fit(compile_forward: bool) -> tuple[torch.nn.Module, Trainer]:
    torch.manual_seed(0)
    model = build_model("ple", 5, SPECS, experts="bank")
    # 100 rows in batches of 32: a shorter last batch (a second shape); phase 2 freezes the
    # shared experts and gates (other parameters require grad): both recompile
    config = TrainerConfig(phase1_epochs=2, phase2_epochs=1, batch_size=32, lr=5e-3, warmup_epochs=1,
                           progress=False, patience=None, compile_forward=compile_forward)  # fmt: skip
    trainer = Trainer(model, config)
    trainer.fit(make_dataset(100), make_dataset(40, seed=1))
    return model, trainer


def test_compiled_training_ends_at_the_eager_weights_to_float_rounding():
    eager, eager_trainer = _fit(False)
    compiled, compiled_trainer = _fit(True)
    moved = build_model("ple", 5, SPECS, experts="bank")
    for (name, a), b, c in zip(eager.state_dict().items(), compiled.state_dict().values(),
                               moved.state_dict().values()):  # fmt: skip
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    # training moved the weights (so agreeing is not trivial)
    assert any(not torch.allclose(a, c) for a, c in zip(eager.state_dict().values(), moved.state_dict().values())
               if a.is_floating_point())  # fmt: skip
    eager_losses = eager_trainer.history.records[-1]["val"]
    compiled_losses = compiled_trainer.history.records[-1]["val"]
    for key, value in eager_losses.items():
        assert compiled_losses[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert compiled_trainer.history.records[-1]["steps"] == eager_trainer.history.records[-1]["steps"] > 0


def test_compiled_stage_one_gives_the_eager_outputs_and_losses():
    torch.manual_seed(1)
    model = build_model("ple", 5, SPECS, experts="bank")
    batch = make_dataset(24).collate(list(range(24)))

    def losses(outputs, b):
        return grouped_task_losses(outputs, b, SPECS)

    eager_out, eager_raw = forward_and_losses(losses, False)(model, batch)
    out, raw = forward_and_losses(losses, True)(model, batch)
    torch.testing.assert_close(raw, eager_raw, rtol=1e-5, atol=1e-6)
    for task in NAMES:
        torch.testing.assert_close(out[task], eager_out[task], rtol=1e-5, atol=1e-6)
    # gradients through the compiled graph equal the eager ones
    params = [p for p in model.parameters() if p.requires_grad]
    eager_grads = torch.autograd.grad(eager_raw.sum(), params)
    grads = torch.autograd.grad(raw.sum(), params)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def _stage_one(compile_forward: bool):
    return forward_and_losses(lambda outputs, b: grouped_task_losses(outputs, b, SPECS), compile_forward)


@pytest.mark.parametrize("spoil, message", [
    (lambda data: data.inputs.__setitem__((3, 1), float("nan")), "NaN or inf"),
    (lambda data: data.targets["click"].__setitem__(2, 3.0), r"labels in \[0, 1\]"),
    (lambda data: data.targets["kind"].__setitem__(5, 7), r"class indices in \[0, 3\)"),
])  # fmt: skip
def test_the_data_checks_raise_their_own_errors_under_compile(spoil, message):
    model = build_model("ple", 5, SPECS, experts="bank")
    good = make_dataset(16, missing=False)
    _stage_one(True)(model, good.collate(list(range(16))))  # compiled on clean data first
    bad = make_dataset(16, missing=False)
    spoil(bad)
    for compile_forward in (False, True):
        with pytest.raises(ValueError, match=message):
            _stage_one(compile_forward)(model, bad.collate(list(range(16))))


def test_the_checks_do_not_split_the_compiled_graph():
    """Stage 1 of a bank PLE is one graph: the three data checks (finite inputs, binary labels,
    class indices) hand their flags over instead of breaking it (without that: one graph per
    stretch between checks)."""
    model = build_model("ple", 5, SPECS, experts="bank")
    batch = make_dataset(24).collate(list(range(24)))

    def run(m, b):
        outputs = m(b.inputs)
        return outputs, grouped_task_losses(outputs, b, SPECS)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    with deferred_checks() as flags:
        torch.compile(run, backend=counter)(model, batch)
    assert counter.frame_count == 1
    assert len(flags) == 3 and not any(bool(f) for f in flags)
    torch._dynamo.reset()
    split = CompileCounterWithBackend("inductor")
    torch.compile(run, backend=split)(model, batch)  # the checks decide at once: graph breaks
    assert split.frame_count > 1


def test_checks_defer_only_inside_the_block():
    flag = torch.tensor(True)
    assert defer(flag) is False  # outside: the caller checks now
    with deferred_checks() as flags:
        assert defer(flag) is True
        with pytest.raises(RuntimeError, match="do not nest"):
            with deferred_checks():
                pass
    assert flags == [flag]
    assert defer(flag) is False


def test_with_adatt_the_measuring_steps_run_eagerly_and_the_run_matches():
    """adaTT measures every second step: those steps take the eager stage 1 (the measurement
    reads the forward pass's features), the others the compiled one; the affinity, the transfer
    weights and the model end where the eager run ends, to float rounding."""

    def fit(compile_forward: bool) -> Trainer:
        torch.manual_seed(0)
        model = build_model("ple", 5, SPECS, experts="bank")
        adatt = AdaptiveTaskTransfer(NAMES, warmup_epochs=1, freeze_epoch=3, grad_interval=2)
        config = TrainerConfig(phase1_epochs=2, phase2_epochs=0, batch_size=16, lr=5e-3, warmup_epochs=1,
                               progress=False, patience=None, compile_forward=compile_forward)  # fmt: skip
        trainer = Trainer(model, config, adatt=adatt)
        calls = {"eager": 0, "compiled": 0}
        for name, attribute in (("eager", "forward_losses_eager"), ("compiled", "forward_losses")):
            inner = getattr(trainer, attribute)

            def counted(m, b, inner=inner, name=name):
                calls[name] += 1
                return inner(m, b)

            setattr(trainer, attribute, counted)
        trainer.fit(make_dataset(96))
        trainer.calls = calls
        return trainer

    eager, compiled = fit(False), fit(True)
    # 6 batches an epoch, 2 epochs: adaTT measures at steps 0, 2, 4, ... (6 of 12)
    assert compiled.calls == {"eager": 6, "compiled": 6}
    assert eager.calls == {"eager": 6, "compiled": 6}  # the same split; both functions eager there
    assert compiled.adatt.affinity_computer.n_updates == eager.adatt.affinity_computer.n_updates == 6
    torch.testing.assert_close(compiled.adatt.affinity, eager.adatt.affinity, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.adatt.transfer_weights(), eager.adatt.transfer_weights(), rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("extraction", ["structured", "cut", "loop"])
def test_measuring_on_a_compiled_forward_is_refused(extraction):
    """By hand (not the trainer's way): per-task gradients through a compiled graph are not
    reliable, so the computer refuses them, naming the way out."""
    from mtlbook.adatt import TaskAffinityComputer

    model = build_model("ple", 5, SPECS, experts="bank")
    batch = make_dataset(32).collate(list(range(32)))
    computer = TaskAffinityComputer(NAMES, extraction=extraction).attach(model)
    _, raw = _stage_one(False)(model, batch)
    assert computer.extract_gradients(raw).shape[0] == len(NAMES)  # eager: measured
    _, raw = _stage_one(True)(model, batch)
    with pytest.raises(ValueError, match="last forward pass ran compiled"):
        computer.extract_gradients(raw)
    with pytest.raises(ValueError, match="last forward pass ran compiled"):
        computer.measure_in_backward(raw)


@pytest.mark.parametrize("balancing", ["gradnorm", "pcgrad"])
def test_balancers_with_per_task_gradients_are_refused(balancing):
    model = build_model("ple", 5, SPECS, experts="bank")
    with pytest.raises(ValueError, match="compile_forward=True needs a balancer whose backward is one plain"):
        Trainer(model, TrainerConfig(progress=False, balancing=balancing, compile_forward=True))
    Trainer(model, TrainerConfig(progress=False, balancing=balancing))  # eager: fine


def test_torchrun_is_refused_by_name():
    with pytest.raises(ValueError, match="compile_forward=True is for a single process"):
        check_compile(True, distributed=True)
    check_compile(False, distributed=True)  # the default never refuses
    check_compile(True, distributed=False)
    check_compile(True, distributed=False, balancer=build_balancer("uncertainty", 3))


def test_a_run_resumes_with_the_other_setting(tmp_path):
    """``compile_forward`` says how a step is computed, not what: a checkpoint of an eager run
    resumes compiled (and the other way round) and ends at the uninterrupted run's weights."""

    def trainer(phase1_epochs: int, compile_forward: bool, folder) -> Trainer:
        torch.manual_seed(0)
        config = TrainerConfig(phase1_epochs=phase1_epochs, phase2_epochs=0, batch_size=32, lr=5e-3, warmup_epochs=1,
                               progress=False, patience=None, checkpoint_dir=str(folder), seed=3,
                               compile_forward=compile_forward)  # fmt: skip
        return Trainer(build_model("ple", 5, SPECS, experts="bank"), config)

    reference = trainer(3, False, tmp_path / "full")
    reference.fit(make_dataset(96))

    class Stop(Exception):
        pass

    class StopAfterTwoEpochs(Callback):
        def on_epoch_start(self, t):
            if t.epoch == 2:
                raise Stop

    with pytest.raises(Stop):
        trainer(3, False, tmp_path / "cut").fit(make_dataset(96), callbacks=[StopAfterTwoEpochs()])
    resumed = trainer(3, True, tmp_path / "cut")
    resumed.fit(make_dataset(96), resume_from=tmp_path / "cut" / "last.pt")
    assert resumed.step == reference.step
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
