"""Evaluation task kinds: importing this package registers every built-in one (`base.get(kind)` finds them)."""

from . import bias, choice, contains, exact_match, generation, offensive, perplexity, robustness  # noqa: F401
from .base import Result, Task, TaskConfig, TaskSpec, all_metrics, get, make_task_spec, names, register

__all__ = ["Result", "Task", "TaskConfig", "TaskSpec", "all_metrics", "get", "make_task_spec", "names", "register"]
