"""One trainer per output directory, and no trainer outliving the server that started it.

- The trainer holds an exclusive `flock` on `OUTPUT/.trainer.lock` for as long as it runs; the
  kernel drops it when the process dies, however it dies. A second trainer on the same
  directory refuses to start (`OutputBusy`).
- A job's trainer is told its parent's pid (`PARENT_PID_ENV`). It asks Linux to send it SIGTERM
  when the parent dies (`PR_SET_PDEATHSIG`) and, everywhere, watches its parent pid from a
  thread, so a server killed with SIGKILL does not leave it training on.
- The job manager records each trainer's pid and start time (`write_process_record`); a
  restarted manager ends a trainer still holding a job's lock (`end_orphan`) before the job
  runs again, and never signals a pid the system has since given to another process.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

LOCK_NAME = ".trainer.lock"
PARENT_PID_ENV = "QUIVER_TRAINER_PARENT_PID"
_PR_SET_PDEATHSIG = 1
_WATCH_INTERVAL_S = 0.5
_ORPHAN_GRACE_S = 5.0

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the watchdog still applies
    fcntl = None  # type: ignore[assignment]


class OutputBusy(RuntimeError):
    """Another live trainer holds the output directory."""


@contextlib.contextmanager
def hold_output(output: Path) -> Iterator[None]:
    """Hold `output`'s trainer lock for the body (creating the directory); OutputBusy if taken."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    handle = _try_lock(output)
    if handle is None:
        holder = _read_int(output / LOCK_NAME)
        who = f" (process {holder})" if holder is not None else ""
        raise OutputBusy(f"--output {str(output)!r} is in use by another training run{who}")
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def is_held(output: Path) -> bool:
    """Whether a live process holds `output`'s trainer lock."""
    if not (Path(output) / LOCK_NAME).exists():
        return False
    handle = _try_lock(Path(output))
    if handle is None:
        return True
    handle.close()
    return False


def _try_lock(output: Path) -> IO[str] | None:
    handle = open(output / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 (the caller closes it)
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


# ---------------------------------------------------------------------- the child dies with its parent
def die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when `parent_pid` is no longer its parent (at once if it already is not)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_WATCH_INTERVAL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def die_with_parent_from_env() -> None:
    """`die_with_parent` for the pid the job manager put in the environment, if any."""
    raw = os.environ.get(PARENT_PID_ENV, "")
    if raw.isdigit():
        die_with_parent(int(raw))


# ---------------------------------------------------------------------- orphans of a previous server
def write_process_record(path: Path, pid: int) -> None:
    """Remember which process trains in a job directory (pid and start time, against pid reuse)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"pid": pid, "start_time": _start_time(pid)}) + "\n")
    os.replace(tmp, path)


def end_orphan(record: Path, output: Path) -> int | None:
    """End the trainer `record` names if it still holds `output`'s lock; its pid, or None if none was running.

    Its whole process group gets SIGTERM, then SIGKILL after a grace period; returns once the
    lock is free (or the wait gave up, which the next trainer will then report).
    """
    pid = _recorded_pid(record)
    record.unlink(missing_ok=True)
    if pid is None or not is_held(output):
        return None
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + _ORPHAN_GRACE_S
    while is_held(output) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_held(output):
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + _ORPHAN_GRACE_S
        while is_held(output) and time.monotonic() < deadline:
            time.sleep(0.05)
    return pid


def _recorded_pid(record: Path) -> int | None:
    """The recorded pid if that process still runs (the same one: its start time matches)."""
    try:
        data = json.loads(record.read_text())
        pid, started = int(data["pid"]), data.get("start_time")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid <= 1 or pid == os.getpid():
        return None
    now = _start_time(pid)
    if now is None and not _alive(pid):
        return None
    if started is not None and now != started:
        return None  # the pid now belongs to another process
    return pid


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if hasattr(os, "killpg") and os.getpgid(pid) == pid:  # a trainer leads its own process group
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
