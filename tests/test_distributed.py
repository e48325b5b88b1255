"""Distributed training: two gloo processes on 127.0.0.1 against one process on the same data.

One spawn of two ranks runs every multi-process check (process start-up dominates the
cost); the ranks save what they saw and the assertions run here, in the parent.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data.distributed import DistributedSampler

from mtlbook.adatt import AdaptiveTaskTransfer, TaskAffinityComputer, cosine_matrix
from mtlbook.data.batch import Batch, MultiTaskDataset, TaskSpec
from mtlbook.models import PLE
from mtlbook.train import Trainer, TrainerConfig
from mtlbook.train.callbacks import Callback
from mtlbook.train.distributed import ShardSampler, adatt_sync_bytes, init_distributed

SPECS = (TaskSpec("click", "binary"), TaskSpec("value", "regression"), TaskSpec("kind", "multiclass", 3))
NAMES = tuple(s.name for s in SPECS)
WORLD = 2


def make_dataset(n: int, seed: int) -> MultiTaskDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    targets = {
        "click": (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).float(),
        "value": x[:, 1] - x[:, 0] + 0.1 * torch.randn(n, generator=g),
        "kind": torch.bucketize(x[:, 2].contiguous(), torch.tensor([-0.5, 0.5])),
    }
    present = {"value": torch.rand(n, generator=g) > 0.3}
    return MultiTaskDataset(x, targets, SPECS, present)


def make_model(seed: int = 0) -> PLE:
    torch.manual_seed(seed)
    return PLE(5, SPECS, n_levels=2, n_shared_experts=2, n_task_experts=1, expert_hidden=(8,),
               expert_dim=6, tower_hidden=(6,))  # fmt: skip


def make_config(checkpoint_dir: Path | None, **overrides) -> TrainerConfig:
    base = dict(phase1_epochs=3, phase2_epochs=2, batch_size=8, lr=5e-3, warmup_epochs=1, phase2_warmup_epochs=1,
                accumulation_steps=2, progress=False, patience=None, restore_best=False,
                checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
                adatt={"warmup_epochs": 1, "freeze_epoch": 2, "grad_interval": 1})  # fmt: skip
    base.update(overrides)
    return TrainerConfig(**base)


def affinity_batches() -> tuple[Batch, list[Batch]]:
    """A global batch of 24 rows split unevenly (10 / 14); "value" has no target on rank 1."""
    data = make_dataset(24, seed=5)
    full = data.full_batch()
    full.present["value"][10:] = False
    full.present["value"][:3] = True
    parts = [slice(0, 10), slice(10, 24)]
    shards = [Batch(full.inputs[s], {t: v[s] for t, v in full.targets.items()},
                    {t: v[s] for t, v in full.present.items()}) for s in parts]  # fmt: skip
    return full, shards


def state_vector(trainer: Trainer) -> torch.Tensor:
    tensors = list(trainer.model.state_dict().values()) + list(trainer.balancer.state_dict().values())
    if trainer.adatt is not None:
        tensors += list(trainer.adatt.state_dict().values())
    return torch.cat([t.detach().double().reshape(-1) for t in tensors if isinstance(t, torch.Tensor)])


class _Recording(Callback):
    """Keeps, after every epoch, the model, balancer, adaTT and optimizer state as one vector
    (before a DDP rebuild at the next epoch could re-broadcast rank 0's state and hide a drift)."""

    def __init__(self) -> None:
        self.epoch_states: list[torch.Tensor] = []

    def on_epoch_end(self, trainer, record):
        moments = [t for s in trainer.optimizer.state_dict()["state"].values() for t in s.values()]
        optimizer_state = torch.cat([t.double().reshape(-1) for t in moments]) if moments else torch.zeros(0)
        self.epoch_states.append(torch.cat([state_vector(trainer), optimizer_state]))


class _Interrupted(Exception):
    pass


class _StopAfter(Callback):
    """Raises after ``stop_epoch`` epochs, i.e. right after that epoch's checkpoint."""

    stop_epoch = 2

    def on_epoch_end(self, trainer, record):
        if trainer.epoch == self.stop_epoch:
            raise _Interrupted


# ---------------------------------------------------------------------------- the two ranks
def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    context = init_distributed(device="cpu", timeout_s=60)  # the torchrun path: from the environment
    assert context is not None and context.backend == "gloo" and context.world_size == WORLD
    out: dict = {"rank": context.rank}
    import mtlbook.train.trainer as trainer_module
    from mtlbook.balancing import UncertaintyBalancer
    from mtlbook.losses import task_losses
    from mtlbook.train.distributed import measure_affinity

    # 1. one measurement: exact and cheap, through a DDP-wrapped model, then a DDP backward
    full, shards = affinity_batches()
    local = shards[rank]
    for mode in ("exact", "cheap"):
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        adatt = AdaptiveTaskTransfer(NAMES).attach(model)
        balancer = UncertaintyBalancer(len(NAMES))
        weighted = balancer.weight_losses(task_losses(ddp(local.inputs), local, SPECS), local.present_tasks(NAMES))
        rows = torch.stack([local.present[t].sum() for t in NAMES])
        out[f"{mode}_affinity"] = measure_affinity(adatt, weighted, rows, context, mode)
        out[f"{mode}_observed"] = adatt.affinity_computer.pair_observed.clone()
        weighted.sum().backward()  # DDP's reducer after autograd.grad(retain_graph=True)
        out[f"{mode}_grads"] = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        if mode == "cheap":  # this rank's own cosine, for the parent to average
            local_computer = TaskAffinityComputer(NAMES).attach(model)
            outputs = model(local.inputs)
            local_weighted = balancer.weight_losses(task_losses(outputs, local, SPECS), local.present_tasks(NAMES))
            local_present = local.present_tasks(NAMES)
            out["local_gradients"] = local_computer.extract_gradients(local_weighted, present=local_present)
        del ddp

    # 2. a full two-phase run (adaTT, gate co-freeze, phase 2, accumulation with a trailing window)
    writes: list[str] = []
    real_save = trainer_module.atomic_save

    def spy(obj, path):
        writes.append(str(path))
        return real_save(obj, path)

    trainer_module.atomic_save = spy
    epochs_set: list[int] = []
    real_set_epoch = DistributedSampler.set_epoch

    def spy_set_epoch(sampler, epoch):
        epochs_set.append(epoch)
        real_set_epoch(sampler, epoch)

    DistributedSampler.set_epoch = spy_set_epoch
    train, val = make_dataset(72, seed=1), make_dataset(21, seed=2)
    root = Path(folder)
    recorder = _Recording()
    full_run = Trainer(make_model(), make_config(root / "full"), callbacks=[recorder])
    history = full_run.fit(train, val)
    out["full_state"] = state_vector(full_run)
    out["full_epoch_states"] = recorder.epoch_states
    out["writes"] = list(writes)
    out["history"] = [(r["epoch"], r["phase"], r["train"]["loss"], r["val"]["loss"], r["val"]["click/auc"])
                      for r in history.records]  # fmt: skip
    out["val_metrics"] = full_run.evaluate(val)
    out["steps"] = full_run.step
    out["epochs_set"] = list(epochs_set)

    # 3. interrupted after epoch 2, resumed on two processes from rank 0's checkpoint
    interrupted = Trainer(make_model(), make_config(root / "part"))
    try:
        interrupted.fit(train, val, callbacks=[_StopAfter()])
    except _Interrupted:
        pass
    resumed = Trainer(make_model(seed=7), make_config(root / "part"))  # other init: the checkpoint must win
    resumed_history = resumed.fit(train, val, resume_from=root / "part" / "last.pt")
    out["resumed_state"] = state_vector(resumed)
    out["resumed_epochs"] = [r["epoch"] for r in resumed_history.records]
    trainer_module.atomic_save = real_save
    DistributedSampler.set_epoch = real_set_epoch

    # 4. balancers that rewrite gradients (PCGrad) or learn from local norms (GradNorm), cheap adaTT sync
    for balancing in ("pcgrad", "gradnorm"):
        recorder = _Recording()
        run = Trainer(make_model(), make_config(None, balancing=balancing, adatt_sync="cheap", phase1_epochs=3,
                                                phase2_epochs=1, accumulation_steps=1), callbacks=[recorder])  # fmt: skip
        run.fit(train)
        out[f"{balancing}_states"] = recorder.epoch_states

    # 5. a non-finite loss on one rank only: every rank skips that batch (else DDP would hang)
    poisoned = make_dataset(72, seed=1)
    poisoned.targets["value"][3] = float("nan")
    poisoned.present["value"][3] = True
    run = Trainer(make_model(), make_config(None, phase1_epochs=2, phase2_epochs=0, adatt=None, accumulation_steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank 0's TrainingWarning about the skipped batches
        history = run.fit(poisoned)
    out["nan_skips"] = [r["skipped_nan"] for r in history.records]
    out["nan_state"] = state_vector(run)
    torch.save(out, root / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, dict, Path]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(folder)), nprocs=WORLD, join=True)
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return results[0], results[1], folder


# ---------------------------------------------------------------------------- multi-process
def test_exact_affinity_equals_one_process_on_the_global_batch(two_ranks):
    rank0, rank1, _ = two_ranks
    full, _ = affinity_batches()
    model = make_model()
    from mtlbook.balancing import UncertaintyBalancer
    from mtlbook.losses import task_losses

    reference = AdaptiveTaskTransfer(NAMES).attach(model)
    weighted = UncertaintyBalancer(len(NAMES)).weight_losses(task_losses(model(full.inputs), full, SPECS),
                                                             full.present_tasks(NAMES))  # fmt: skip
    expected = reference.measure(weighted, full.present_tasks(NAMES))
    assert torch.equal(rank0["exact_affinity"], rank1["exact_affinity"])
    torch.testing.assert_close(rank0["exact_affinity"], expected, atol=1e-5, rtol=0)
    # "value" has rows on rank 0 only, yet every pair was observed, as in one process
    assert torch.equal(rank0["exact_observed"], reference.affinity_computer.pair_observed)
    assert bool(rank0["exact_observed"].all())
    # DDP averaged the model gradients of the backward that followed autograd.grad
    torch.testing.assert_close(rank0["exact_grads"], rank1["exact_grads"], atol=0, rtol=0)


def test_cheap_affinity_is_the_pairwise_mean_of_local_cosines(two_ranks):
    rank0, rank1, _ = two_ranks
    assert torch.equal(rank0["cheap_affinity"], rank1["cheap_affinity"])
    c0, c1 = (cosine_matrix(r["local_gradients"]) for r in (rank0, rank1))
    value = NAMES.index("value")
    others = [i for i in range(len(NAMES)) if i != value]
    both = torch.tensor(others)
    # pairs seen on both ranks: the plain mean; pairs with "value": rank 0's cosine alone
    mean_both = ((c0 + c1) / 2)[both][:, both]
    torch.testing.assert_close(rank0["cheap_affinity"][both][:, both], mean_both, atol=1e-6, rtol=0)
    torch.testing.assert_close(rank0["cheap_affinity"][value, others], c0[value, others], atol=1e-6, rtol=0)
    assert not torch.allclose(rank0["cheap_affinity"], rank0["exact_affinity"], atol=1e-4)


def test_training_keeps_every_rank_identical_and_only_rank0_writes(two_ranks):
    rank0, rank1, folder = two_ranks
    assert torch.equal(rank0["full_state"], rank1["full_state"])  # parameters and buffers, bit for bit
    for epoch, (a, b) in enumerate(zip(rank0["full_epoch_states"], rank1["full_epoch_states"])):
        assert torch.equal(a, b), f"ranks differ after epoch {epoch}"  # optimizer moments included
    assert rank0["history"] == rank1["history"]
    assert [h[:2] for h in rank0["history"]] == [(0, 1), (1, 1), (2, 1), (3, 2), (4, 2)]
    assert rank0["val_metrics"] == rank1["val_metrics"]
    assert rank0["epochs_set"] == [0, 1, 2, 3, 4]  # a fresh shuffle per epoch
    assert rank0["steps"] == 3 * 5  # 36 rows per rank, 5 batches, windows of 2: 3 steps per epoch
    assert rank1["writes"] == [] and len(rank0["writes"]) == 5
    assert {Path(w).name for w in rank0["writes"]} == {"last.pt"}
    assert (folder / "full" / "last.pt").is_file()


@pytest.mark.parametrize("balancing", ["pcgrad", "gradnorm"])
def test_gradient_rewriting_balancers_stay_identical_across_ranks(two_ranks, balancing):
    rank0, rank1, _ = two_ranks
    states0, states1 = rank0[f"{balancing}_states"], rank1[f"{balancing}_states"]
    assert len(states0) == len(states1) == 4
    for epoch, (a, b) in enumerate(zip(states0, states1)):
        assert torch.equal(a, b), f"ranks differ after epoch {epoch}"
        assert torch.isfinite(a).all()


def test_a_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(two_ranks):
    rank0, rank1, _ = two_ranks
    assert rank0["nan_skips"] == rank1["nan_skips"] == [1, 1]  # the poisoned row sits on one rank per epoch
    assert torch.equal(rank0["nan_state"], rank1["nan_state"]) and torch.isfinite(rank0["nan_state"]).all()


def test_distributed_validation_metrics_are_those_of_the_whole_set(two_ranks):
    rank0, _, _ = two_ranks
    from mtlbook.train.metrics import binary_auc

    checkpoint = torch.load(two_ranks[2] / "full" / "last.pt", weights_only=True)
    model = make_model()
    model.load_state_dict(checkpoint["model"])
    model.eval()
    val = make_dataset(21, seed=2)
    with torch.no_grad():
        outputs = model(val.inputs)
    auc = binary_auc(outputs["click"], val.targets["click"])
    present = val.present["value"]
    value_mse = float(((outputs["value"] - val.targets["value"])[present] ** 2).mean())
    metrics = rank0["val_metrics"]
    assert metrics["click/auc"] == pytest.approx(auc, abs=1e-9)
    assert metrics["value/loss"] == pytest.approx(value_mse, rel=1e-5)
    assert metrics["value/rmse"] == pytest.approx(value_mse**0.5, rel=1e-5)


def test_resuming_on_two_processes_continues_the_run(two_ranks):
    rank0, rank1, _ = two_ranks
    assert rank0["resumed_epochs"] == [0, 1, 2, 3, 4]
    assert torch.equal(rank0["resumed_state"], rank1["resumed_state"])
    assert torch.equal(rank0["resumed_state"], rank0["full_state"])  # as if never interrupted


# ---------------------------------------------------------------------------- single process
def test_single_process_has_no_distributed_context(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed() is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1: nothing to join
    trainer = Trainer(make_model(), make_config(tmp_path))
    assert trainer.distributed is None and trainer.is_main_process and trainer.world_size == 1


def test_shard_sampler_partitions_rows_without_padding():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            shards = [list(ShardSampler(n, r, world)) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(n))
            assert [len(ShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(5, 2, 2)


def test_sync_bytes_follow_the_formulas():
    assert adatt_sync_bytes("exact", 4, 1000) == 4 * 4 * 1001
    assert adatt_sync_bytes("cheap", 16, 10**6) == 4 * 2 * 16 * 16
    with pytest.raises(ValueError, match="mode"):
        adatt_sync_bytes("fast", 4, 10)
    with pytest.raises(ValueError, match="n_tasks"):
        adatt_sync_bytes("exact", 0, 10)


def test_config_validates_the_distributed_fields():
    assert TrainerConfig().adatt_sync == "exact"
    with pytest.raises(ValueError, match="adatt_sync"):
        TrainerConfig(adatt_sync="approximate")
    with pytest.raises(ValueError, match="ddp_find_unused_parameters"):
        TrainerConfig(ddp_find_unused_parameters="yes")


def test_update_restricted_to_observed_pairs():
    computer = TaskAffinityComputer(("a", "b", "c"))
    cosine = torch.full((3, 3), 0.5).fill_diagonal_(1.0)
    pairs = torch.eye(3, dtype=torch.bool)
    pairs[0, 1] = pairs[1, 0] = True
    computer.update(cosine=cosine, observed_pairs=pairs)
    assert computer.affinity[0, 1] == 0.5 and computer.affinity[0, 2] == 0.0
    assert not bool(computer.pair_observed[1, 2])
    with pytest.raises(ValueError, match="observed_pairs"):
        computer.update(cosine=cosine, observed_pairs=torch.ones(2, 2, dtype=torch.bool))


def test_checkpoint_from_before_the_distributed_fields_still_loads(tmp_path):
    trainer = Trainer(make_model(), make_config(tmp_path, phase1_epochs=1, phase2_epochs=0, adatt=None))
    trainer.fit(make_dataset(16, seed=0))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    for name in ("adatt_sync", "ddp_find_unused_parameters"):
        del state["fingerprint"]["config"][name]
    fresh = Trainer(make_model(), make_config(tmp_path, phase1_epochs=1, phase2_epochs=0, adatt=None))
    fresh.load_state_dict(state)  # an old checkpoint implies the defaults
    assert fresh.epoch == 1
    other_config = make_config(tmp_path, phase1_epochs=1, phase2_epochs=0, adatt=None, adatt_sync="cheap")
    other = Trainer(make_model(), other_config)
    with pytest.raises(ValueError, match="adatt_sync"):
        other.load_state_dict(state)
