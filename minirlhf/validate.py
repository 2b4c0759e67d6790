"""The checks every config and entry point makes of its numbers, with one message per kind of mistake: a
count that is not a whole number >= its minimum, a number that is NaN, infinite or out of its range, a switch
that is not True or False, a batch whose activations would not fit in memory. A bad value is refused where it
is given, with a ValueError that names the field, before any work is done."""
import math
import os

import numpy as np


def count(owner, name, value, minimum=1):
    """value as an int, or ValueError unless it is a whole number >= minimum (bools are not counts)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def number(owner, name, value, low=None, high=None, low_open=False, high_open=False):
    """value as a float, or ValueError unless it is a finite real in [low, high] (open where asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        right = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{owner}.{name} must be {' and '.join(p for p in (left, right) if p)}, got {value!r}")
    return float(value)


def boolean(owner, name, value):
    """value, or ValueError unless it is True or False (a truthy string or number is not a switch)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}.{name} must be True or False, got {value!r}")
    return bool(value)


def finite_array(name, x):
    """ValueError unless every entry of x is finite; returns it as an array."""
    x = np.asarray(x)
    if not np.all(np.isfinite(x)):
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0]) if x.ndim else ()
        raise ValueError(f"{name} holds a NaN or inf (at {where})")
    return x


def available_memory():
    """Bytes of memory the system can give without swapping (Linux: MemAvailable of /proc/meminfo; else
    physical memory), or None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fits_in_memory(owner, nbytes, what):
    """ValueError if nbytes (an estimate of what `what` needs) exceeds the memory available: refused before
    the work starts, not killed by the system half-way through it."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise ValueError(f"{owner}: {what} needs about {nbytes / 2 ** 30:.3g} GiB of memory, more than the "
                         f"{free / 2 ** 30:.3g} GiB available; use a smaller batch")
