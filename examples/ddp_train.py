"""Train a PLE + adaTT on a synthetic task suite with several processes (DDP).

Run on one machine with two CPU processes (gloo) or one process per GPU (nccl)::

    .venv/bin/torchrun --nproc_per_node=2 examples/ddp_train.py --adatt-sync exact

On two machines, the same command on each with ``--nnodes=2 --node_rank=0|1
--rdzv_endpoint=HOST:29500``. Without ``torchrun`` the script trains in one process.

``--comm-table`` prints, without training, the bytes each adaTT measurement all-reduces
for the book's PLE at 4, 8 and 16 tasks (the table of the appendix page).
"""

from __future__ import annotations

import argparse
import os

import torch

from mtlbook.data import make_task_suite
from mtlbook.models import PLE
from mtlbook.train import Trainer, TrainerConfig
from mtlbook.train.distributed import adatt_sync_bytes


def book_ple(n_features: int, task_specs) -> PLE:
    """The PLE of the book's "full" study size: 2 levels, 2 shared experts, widths 32 -> 16."""
    return PLE(n_features, task_specs, n_levels=2, n_shared_experts=2, n_task_experts=1, expert_hidden=(32,),
               expert_dim=16, tower_hidden=(16,))  # fmt: skip


def comm_table(n_features: int) -> str:
    lines = [
        "| tasks n | shared params d | exact: 4 n (d + 1) bytes | cheap: 4 * 2 n^2 bytes | exact / cheap |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n_tasks in (4, 8, 16):
        dataset, _ = make_task_suite(64, n_tasks=n_tasks, n_groups=2, dim=n_features, seed=0)
        model = book_ple(dataset.n_features, dataset.task_specs)
        d = sum(p.numel() for p in model.shared_parameters())
        exact, cheap = adatt_sync_bytes("exact", n_tasks, d), adatt_sync_bytes("cheap", n_tasks, d)
        lines.append(f"| {n_tasks} | {d:,} | {exact:,} | {cheap:,} | {exact / cheap:,.0f} |")
    default_d = sum(p.numel() for p in PLE(n_features, dataset.task_specs).shared_parameters())
    lines.append(f"\n(PLE with its constructor defaults, widths 64 -> 32: d = {default_d:,}.)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128, help="per process")
    parser.add_argument("--phase1-epochs", type=int, default=4)
    parser.add_argument("--phase2-epochs", type=int, default=2)
    parser.add_argument("--adatt-sync", choices=("exact", "cheap"), default="exact")
    parser.add_argument("--checkpoint-dir", default=None, help="folder for last.pt (rank 0 writes it)")
    parser.add_argument("--resume", action="store_true", help="continue from CHECKPOINT_DIR/last.pt")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="collective timeout (TrainerConfig.ddp_timeout_s)")
    parser.add_argument("--comm-table", action="store_true", help="print the adaTT communication table and exit")
    args = parser.parse_args()
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir (the folder holding last.pt)")
    if args.comm_table:
        print(comm_table(args.features))
        return

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    # every rank builds the same data and model; the trainer shards the data itself
    dataset, _ = make_task_suite(args.rows, n_tasks=args.tasks, n_groups=2, dim=args.features, seed=0)
    n_val = args.rows // 5
    train = dataset.subset(torch.arange(n_val, args.rows))
    val = dataset.subset(torch.arange(n_val))
    torch.manual_seed(0)
    model = book_ple(dataset.n_features, dataset.task_specs)
    config = TrainerConfig(
        phase1_epochs=args.phase1_epochs,
        phase2_epochs=args.phase2_epochs,
        batch_size=args.batch_size,
        lr=3e-3,
        warmup_epochs=1,
        adatt={"warmup_epochs": 1, "freeze_epoch": max(2, args.phase1_epochs - 1), "grad_interval": 5},
        adatt_sync=args.adatt_sync,
        checkpoint_dir=args.checkpoint_dir,
        ddp_timeout_s=args.timeout_s,
        progress=False,
    )
    trainer = Trainer(model, config)  # joins the torchrun process group, if there is one
    resume = os.path.join(args.checkpoint_dir, "last.pt") if args.resume else None
    history = trainer.fit(train, val, resume_from=resume)
    if trainer.is_main_process:
        for record in history.records:
            print(f"epoch {record['epoch']} phase {record['phase']} train loss {record['train']['loss']:.4f} "
                  f"val loss {record['val']['loss']:.4f}")  # fmt: skip
        print(f"world size {trainer.world_size}, steps {trainer.step}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
