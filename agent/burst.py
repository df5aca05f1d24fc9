"""When a chat's turn starts: a message in a quiet chat is answered at once, a burst still
becomes one turn.

A turn waits while messages keep arriving: until ``settle`` seconds have passed without a new
one, and never more than ``debounce`` seconds after the turn loop woke. Messages pasted,
forwarded or delivered together after the phone was offline arrive milliseconds apart and are
answered together; a lone message waits only ``settle``, not the whole ``debounce``. Messages a
person types one by one are seconds apart: those that arrive during a turn are answered
together by the next one (as before).
"""

from __future__ import annotations


def turn_delay(now: float, woke: float, last_arrival: float | None, *, settle: float,
               debounce: float) -> float:
    """Seconds still to wait before the chat's turn starts (0: start now). ``woke``: when the
    turn loop started waiting; ``last_arrival``: when the chat's latest message arrived."""
    deadline = woke + debounce
    if last_arrival is not None:  # (messages that came during the last turn: at once)
        deadline = min(deadline, last_arrival + settle)
    return max(0.0, deadline - now)
