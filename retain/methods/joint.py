"""Joint training: the upper bound."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from retain.method import Memory, Method, register
from retain.scenarios import TaskData


@register("joint")
@dataclass
class Joint(Method):
    """Joint (cumulative) training: at task t, train on the data of every task 0..t — the upper bound.

    Hooks: ``task_data``. Stores all past data, so it is a reference point, not a continual learner; it needs task
    boundaries to know what "seen so far" is. With ``iterations`` per task, each task's budget is spent on the
    union (van de Ven's "joint" baseline trains offline on everything; the final row matches it).
    """

    needs_boundaries = True

    def task_data(self, ctx: Any, data: TaskData) -> TaskData:
        return ctx.scenario.task_data(range(ctx.task + 1))

    def memory(self, scenario: Any) -> Memory:
        """Every training row is kept for later tasks (read in place, by index: no copies, so 0 bytes extra)."""
        return Memory(sum(len(t.train_idx) for t in scenario.tasks), 0)
