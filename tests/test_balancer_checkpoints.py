"""Every registered balancer survives a checkpoint: write, crash, resume bit-identically.

Regression for PCGrad, whose order generator lives in ``get_extra_state`` (a dict, not a
tensor) and used to break the checkpoint fingerprint on the first write.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mtlbook.adatt import AdaptiveTaskTransfer
from mtlbook.balancing import BALANCERS
from mtlbook.models import PLE
from mtlbook.train.callbacks import Callback
from mtlbook.train import Trainer, TrainerConfig

from _tiny import NAMES, SPECS, make_dataset


class Crash(Exception):
    pass


def make_trainer(folder, balancing: str, model_seed: int = 0) -> Trainer:
    torch.manual_seed(model_seed)
    model = PLE(5, SPECS, n_levels=1, n_shared_experts=2, expert_hidden=(8,), expert_dim=6, tower_hidden=(6,),
                dropout=0.1)  # fmt: skip
    cfg = TrainerConfig(phase1_epochs=2, phase2_epochs=1, batch_size=16, lr=5e-3, warmup_epochs=1,
                        phase2_warmup_epochs=0, progress=False, patience=None, checkpoint_dir=str(folder), seed=3,
                        balancing=balancing)  # fmt: skip
    adatt = AdaptiveTaskTransfer(NAMES, warmup_epochs=1, freeze_epoch=2, grad_interval=2)
    return Trainer(model, cfg, adatt=adatt)


def state_of(trainer: Trainer) -> dict[str, object]:
    out: dict[str, object] = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update({f"adatt.{k}": v for k, v in trainer.adatt.state_dict().items()})
    out.update({f"balancer.{k}": v for k, v in trainer.balancer.state_dict().items()})
    return out


def assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[name]), name
        else:  # extra state, e.g. {"generator_state": tensor}
            assert value.keys() == b[name].keys(), name
            for key in value:
                assert torch.equal(value[key], b[name][key]), f"{name}.{key}"


@pytest.mark.parametrize("balancing", sorted(BALANCERS))
def test_every_balancer_checkpoints_and_resumes_bit_identically(tmp_path, balancing):
    train, val = make_dataset(64), make_dataset(32, seed=1)
    full = make_trainer(tmp_path / "full", balancing)
    expected = full.fit(train, val).to_dict(drop_timing=True)
    expected_state = state_of(full)

    class Crashing(Callback):  # a power cut as the epoch starts: the previous epoch's checkpoint is the last
        def on_epoch_start(self, trainer):
            if trainer.epoch == 1:
                raise Crash("killed in epoch 1")

    with pytest.raises(Crash):
        make_trainer(tmp_path / "run", balancing).fit(train, val, callbacks=[Crashing()])
    assert (tmp_path / "run" / "last.pt").is_file()

    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    resumed = make_trainer(tmp_path / "run", balancing, model_seed=42)
    history = resumed.fit(train, val, resume_from=tmp_path / "run" / "last.pt")
    assert history.to_dict(drop_timing=True) == expected
    assert_same(state_of(resumed), expected_state)
