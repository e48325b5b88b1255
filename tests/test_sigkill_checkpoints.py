"""A training process SIGKILLed while it writes checkpoints, over and over.

Each round forks a child that resumes from ``last.pt`` (if any) and trains on; its
``torch.save`` is slowed into chunks, it reports every write it starts, and the parent
kills it with SIGKILL at a random moment inside (or just after) the n-th write. After every
kill ``last.pt`` must load; after all rounds the run is completed from the last
``last.pt`` and must equal an uninterrupted run bit for bit, and no temporary file of the
killed writes may be left once the next save has run.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import random
import signal
import time

import torch

from mtlbook.models import PLE
from mtlbook.train import Trainer, TrainerConfig
from mtlbook.train.checkpoint import load_file

from _tiny import SPECS, make_dataset

KILLS = 24
EPOCHS = (30, 4)  # phase 1, phase 2

def make_trainer(folder) -> Trainer:
    torch.manual_seed(0)
    model = PLE(5, SPECS, n_levels=1, n_shared_experts=2, expert_hidden=(8,), expert_dim=6, tower_hidden=(6,),
                dropout=0.1)  # fmt: skip
    cfg = TrainerConfig(phase1_epochs=EPOCHS[0], phase2_epochs=EPOCHS[1], batch_size=16, lr=5e-3, warmup_epochs=1,
                        phase2_warmup_epochs=0, progress=False, patience=None, seed=5,
                        checkpoint_dir=None if folder is None else str(folder))  # fmt: skip
    return Trainer(model, cfg)


def _child(folder, pipe) -> None:
    """Resume (if there is a checkpoint) and train; report each write; write slowly."""
    real_save = torch.save

    def slow_save(obj, handle, *args, **kwargs):
        pipe.send("write")
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        step = max(1, len(data) // 8)
        for start in range(0, len(data), step):
            handle.write(data[start : start + step])
            handle.flush()
            time.sleep(0.001)

    torch.save = slow_save
    try:
        last = folder / "last.pt"
        make_trainer(folder).fit(make_dataset(32), resume_from=last if last.exists() else None)
        pipe.send("done")
    finally:
        os._exit(0)  # never run the parent's (pytest's) exit handlers in the fork


def test_sigkill_during_checkpoint_writes_always_leaves_a_loadable_checkpoint_and_an_exact_resume(tmp_path):
    reference = make_trainer(None)
    expected_history = reference.fit(make_dataset(32)).to_dict(drop_timing=True)
    expected_state = {k: v.clone() for k, v in reference.model.state_dict().items()}

    folder = tmp_path / "run"
    rng = random.Random(0)
    context = multiprocessing.get_context("fork")
    kills, epochs_seen, torn_writes = 0, [], 0
    while kills < KILLS:
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_child, args=(folder, sender))
        child.start()
        sender.close()
        nth_write, finished = rng.randint(1, 2), False
        for _ in range(nth_write):
            if not receiver.poll(60):
                break
            if receiver.recv() == "done":
                finished = True
                break
        assert not finished, "the run finished before the kills were done; raise EPOCHS"
        time.sleep(rng.uniform(0.0, 0.012))  # somewhere inside the chunked write, the fsync or the rename
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        receiver.close()
        assert child.exitcode == -signal.SIGKILL
        kills += 1
        torn_writes += any(p.name.endswith(".tmp") for p in folder.iterdir())  # killed inside a write
        if (folder / "last.pt").exists():
            state = load_file(folder / "last.pt")  # never torn
            epochs_seen.append(int(state["trainer"]["epoch"]))

    assert len(epochs_seen) >= KILLS - 2 and epochs_seen == sorted(epochs_seen)
    assert torn_writes >= KILLS // 4  # the kills really landed inside writes, not only between them
    assert epochs_seen[-1] < sum(EPOCHS)  # still unfinished: the resume below has work to do
    finisher = make_trainer(folder)
    history = finisher.fit(make_dataset(32), resume_from=folder / "last.pt")
    assert history.to_dict(drop_timing=True) == expected_history
    for name, value in expected_state.items():
        assert torch.equal(finisher.model.state_dict()[name], value), name
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]  # the killed writes' temporaries are gone
