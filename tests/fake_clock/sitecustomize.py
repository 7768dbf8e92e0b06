"""A wall clock that is off, for tests: with this folder on ``PYTHONPATH`` and
``$GPUPOOL_TEST_CLOCK_SKEW_S`` set, ``time.time()`` and ``time.time_ns()`` of this process (an agent)
and of the Python processes it starts with its environment (its workers) are that many seconds
off, as on a machine whose clock is wrong. The monotonic clock, and the file times the kernel
stamps, stay true (as they do on such a machine).

Not libfaketime: Debian 12's (0.9.10) cannot run Python 3.11 as an agent: with its monotonic clock
faked, ``threading.Event.wait(timeout)`` never wakes (``sem_clockwait``, upstream issue #390); with
``FAKETIME_DONT_FAKE_MONOTONIC=1``, ``time.sleep`` fails with EINVAL (upstream issue #426)."""
import os
import time

_skew = float(os.environ.get("GPUPOOL_TEST_CLOCK_SKEW_S") or 0)
if _skew:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _skew
    time.time_ns = lambda: _time_ns() + int(_skew * 1e9)
