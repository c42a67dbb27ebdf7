"""Continuous-batching policy over plain Python data. Never imports torch."""

from scheduler.block_manager import BlockManager
from scheduler.config import SchedulerConfig
from scheduler.scheduler import ScheduledBatch, Scheduler
from scheduler.sequence import Sequence, SequenceStatus

__all__ = [
    "BlockManager",
    "ScheduledBatch",
    "Scheduler",
    "SchedulerConfig",
    "Sequence",
    "SequenceStatus",
]
