"""Crash points for the crash tests: a process told to dies there, once, with SIGKILL.

Off unless `GPUPROXY_TEST_CRASH_AT` names a checkpoint. `GPUPROXY_TEST_CRASH_MARK` names a
file made just before dying, so the restarted process (same environment) runs through.
SIGKILL rather than an exception: nothing in the process gets to clean up, as in a real crash.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

CRASH_AT = "GPUPROXY_TEST_CRASH_AT"
CRASH_MARK = "GPUPROXY_TEST_CRASH_MARK"

_AT = os.environ.get(CRASH_AT, "")
_MARK = os.environ.get(CRASH_MARK, "")


def checkpoint(name: str) -> None:
    if not _AT or name != _AT:
        return
    if _MARK:
        mark = Path(_MARK)
        if mark.exists():
            return
        mark.write_text(name)
    os.kill(os.getpid(), signal.SIGKILL)
