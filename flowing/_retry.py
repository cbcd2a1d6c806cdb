"""Retry policies: which errors are retried, and how long to wait before the next attempt.

The delay after failed attempt ``k`` (1-based) is computed afresh from ``k`` alone,
so jitter never compounds across attempts:

    backoff  = min(retry_backoff_base_ms * 2 ** (k - 1), retry_max_backoff_ms)
    jittered = backoff * (1 - retry_jitter * u)      u uniform in [0, 1), new each time
    delay    = max(jittered, 1000 * error.retry_after)   when the error carries a hint

``retry_jitter`` is below 1, so jitter only ever shortens a delay by that fraction and
never turns the backoff off.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._exceptions import InvalidTaskError

if TYPE_CHECKING:
    from ._task import TaskDef

RetryOn = tuple[type[Exception], ...]


def check_retry_on(name: str, retry_on: Any) -> RetryOn | None:
    """``None`` (retry every error), one exception class, or a tuple of them."""
    if retry_on is None:
        return None
    classes = retry_on if isinstance(retry_on, tuple) else (retry_on,)
    if not classes:
        raise InvalidTaskError(
            f"retry_on of task {name!r} is empty; pass exception classes, or retry=0 "
            f"to never retry"
        )
    for cls in classes:
        if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, Exception):
            raise InvalidTaskError(
                f"retry_on of task {name!r} lists {cls.__name__}, which stops the run and "
                f"is never retried; retry_on takes Exception subclasses"
            )
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            hint = ""
            if isinstance(cls, (list, set, frozenset)) and all(isinstance(c, type) for c in cls):
                listed = ", ".join(c.__name__ for c in cls) + ("," if len(cls) == 1 else "")
                hint = f"; pass a tuple: retry_on=({listed})"
            raise InvalidTaskError(
                f"retry_on of task {name!r} must be an exception class or a tuple of "
                f"them, got {cls!r}{hint}"
            )
    return classes


def check_jitter(name: str, jitter: Any) -> float:
    """A fraction in [0, 1): how much of each backoff may be randomly taken off."""
    if (
        isinstance(jitter, bool)
        or not isinstance(jitter, (int, float))
        or math.isnan(jitter)
        or not 0 <= jitter < 1
    ):
        raise InvalidTaskError(
            f"retry_jitter of task {name!r} must be a number in [0, 1) (the fraction "
            f"of each backoff that may be taken off at random), got {jitter!r}"
        )
    return float(jitter)


def should_retry(task: TaskDef[..., Any], error: BaseException | None) -> bool:
    """Whether a failed attempt may be retried; a ``retry_until`` rejection (no error) may."""
    return error is None or task.retry_on is None or isinstance(error, task.retry_on)


def retry_delay_ms(
    task: TaskDef[..., Any],
    failed_attempt: int,
    error: BaseException | None,
    uniform: Callable[[], float] | None = None,
) -> float:
    """The delay before the attempt after ``failed_attempt``, per the module docstring.

    ``uniform`` draws the jitter fraction (default ``random.random``).
    """
    delay = task.backoff_ms(failed_attempt)
    if task.retry_jitter:
        if uniform is None:
            import random  # only jittered retries need it: keep import flowing light

            uniform = random.random
        delay *= 1 - task.retry_jitter * uniform()
    hint = retry_after_ms(task.name, error)
    return delay if hint is None else max(delay, hint)


def retry_after_ms(name: str, error: BaseException | None) -> float | None:
    """The error's ``retry_after`` hint in ms: seconds as a number, or a timedelta.

    A hint that is neither, or negative, or not finite, is ignored with a warning.
    """
    try:
        hint = getattr(error, "retry_after", None)
    except Exception as unreadable:  # a property or __getattr__ of the error's own
        from ._log import logger  # a rare path: keep import flowing light
        from ._results import describe_error

        logger.warning(
            "task %r: ignoring retry_after on %s: reading it raised %s",
            name,
            type(error).__name__,
            describe_error(unreadable),
        )
        return None
    if hint is None:
        return None
    import datetime  # a rare path: keep import flowing light

    if isinstance(hint, datetime.timedelta):
        hint = hint.total_seconds()
    if isinstance(hint, bool) or not isinstance(hint, (int, float)) or not 0 <= hint < math.inf:
        from ._log import logger  # a rare path: keep import flowing light

        logger.warning(
            "task %r: ignoring retry_after=%r on %s; it must be seconds >= 0 "
            "(a number or a timedelta)",
            name,
            hint,
            type(error).__name__,
        )
        return None
    return float(hint) * 1000
