"""Pure schedule code: the action IR, builders, validator and grid printer. No process group, no Lightning."""

from lightning_tawpipe.schedule.actions import Action, Op, format_program, parse_action, parse_program
from lightning_tawpipe.schedule.grid import compute_ticks, format_grid
from lightning_tawpipe.schedule.program import Schedule
from lightning_tawpipe.schedule.tawpipe import build_tawpipe
from lightning_tawpipe.schedule.validate import ScheduleError, validate, with_user_barriers

__all__ = [
    "Action",
    "Op",
    "Schedule",
    "ScheduleError",
    "build_tawpipe",
    "compute_ticks",
    "format_grid",
    "format_program",
    "parse_action",
    "parse_program",
    "validate",
    "with_user_barriers",
]
