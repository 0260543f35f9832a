"""What to run: actions, the schedule contract, plans and their checks, the simulator. No torch.

Schedule plug-ins import only this package, so a schedule, the simulator and
``pipesched schedule show`` load without torch, anyio or structlog.
"""

from pipesched.plan.action import Action, Plan
from pipesched.plan.lowering import Edge, Lowering, Transfer
from pipesched.plan.record import TaskRecord
from pipesched.plan.registry import get_schedule, list_schedules, register_schedule
from pipesched.plan.replay import Deadlock
from pipesched.plan.schedule import Schedule, validate_plan
from pipesched.plan.simulate import LowerBound, SimResult, lower_bound, simulate

__all__ = [
    "Action", "Deadlock", "Edge", "LowerBound", "Lowering", "Plan", "Schedule", "SimResult",
    "TaskRecord", "Transfer", "get_schedule", "list_schedules", "lower_bound", "register_schedule",
    "simulate", "validate_plan",
]
