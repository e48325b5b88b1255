"""Multi-task data: the batch format, synthetic generators and real-data loaders."""

from mtlbook.data.batch import Batch, MultiTaskDataset, TaskSpec, check_task_specs, iterate_batches, make_loader

__all__ = ["Batch", "MultiTaskDataset", "TaskSpec", "check_task_specs", "iterate_batches", "make_loader"]
