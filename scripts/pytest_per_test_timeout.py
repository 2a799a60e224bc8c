"""A pytest plugin: `-p pytest_per_test_timeout --per-test-timeout SECONDS` fails a test whose
body runs longer than SECONDS, for machines without pytest-timeout (the GPU machine has none).

The body gets a SIGALRM at SECONDS, raised as a test failure once Python runs again; a test
stuck inside one C call (a hung kernel) cannot be interrupted that way, so at 2 x SECONDS + 30
faulthandler prints every thread's stack and ends the process: the session's log then names
the test, and the stage ends instead of holding the machine. Unix only (SIGALRM).
"""
import faulthandler
import signal
import sys

import pytest


def pytest_addoption(parser):
    parser.addoption("--per-test-timeout", type=float, default=0.0, metavar="SECONDS",
                     help="fail a test whose body runs longer than this (0: no limit)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    seconds = item.config.getoption("--per-test-timeout")
    if not seconds > 0:
        yield
        return

    def expire(signum, frame):
        pytest.fail(f"ran past --per-test-timeout {seconds:g} s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(2 * seconds + 30, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
