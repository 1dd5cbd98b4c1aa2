"""Subprocess pipelines (tools/dist_train.sh, dist_test.sh, ...) that run in a background thread, one at a time,
while the rest of the session runs in the pytest process.

A test that launches tools spends most of its time in other processes: each launch starts interpreters that import
torch and the OpenMMLab libraries (about 13 s of CPU per launch of 2 processes), and the in-process tests use one
intra-op thread. Started together at the beginning of the session (``background_launches`` in conftest.py), the two
keep both cores busy. A test marked ``@pytest.mark.launches(pipeline=...)`` gets its pipeline started in the background;
the test itself waits for it with :meth:`BackgroundLaunches.result`, which raises what the pipeline raised. The
quick suite's tests of the tools' command lines run this way too (a tool's interpreter starts in 7-10 s).

A pipeline runs in a thread of the pytest process while the other tests run: besides starting commands, it may write
files, but must not draw from torch's global random generator, which the tests in the process seed and use (it builds
models on the meta device and saves tensors of constants).
"""
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

LAUNCH_TIMEOUT = 900  # seconds per command; a full-size T model's run takes a few minutes on 2 cores


def free_port() -> int:
    """A free port for a run's rendezvous (the launchers default to 29500, which a run in parallel may hold)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class BackgroundLaunches:
    """Runs the submitted pipelines one after another in a background thread; their commands go through :meth:`run`
    (from ``cwd``)."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix='launches')
        self._futures: Dict[str, Future] = {}
        self._lock = threading.Lock()
        self._process: Optional[subprocess.Popen] = None
        self._closed = False

    def submit(self, key: str, pipeline: Callable, *args, **kwargs) -> None:
        """Queue ``pipeline(self, *args, **kwargs)``; its result or exception is kept under ``key``."""
        self._futures[key] = self._executor.submit(pipeline, self, *args, **kwargs)

    def result(self, key: str):
        """Wait for the pipeline queued under ``key``; return its result or raise its exception."""
        return self._futures[key].result()

    def run(self, args: List[str], log: Path, env: Optional[Dict[str, str]] = None) -> str:
        """Run a command from ``cwd``; keep its output in ``log`` and fail with its tail. ``env``: the command's
        environment (default: this process's, with ``PYTHON`` and a free ``PORT``)."""
        returncode, out, _ = self._communicate(args, self.cwd, env, stderr=subprocess.STDOUT, timeout=LAUNCH_TIMEOUT)
        log.write_text(out)
        assert returncode == 0, f'{" ".join(map(str, args))} failed (rc {returncode}):\n{out[-4000:]}'
        return out

    def call(self, args: List[str], cwd: Optional[Path] = None, env: Optional[Dict[str, str]] = None,
             timeout: int = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
        """Run a command (from ``cwd``, by default this object's) and return its exit status, stdout and stderr
        apart, whatever the status: for the tests of a tool's errors. ``env`` as for :meth:`run`."""
        returncode, out, err = self._communicate(args, cwd or self.cwd, env, stderr=subprocess.PIPE, timeout=timeout)
        return subprocess.CompletedProcess(args, returncode, out, err)

    def _communicate(self, args: List[str], cwd: Path, env: Optional[Dict[str, str]], stderr: int,
                     timeout: int) -> Tuple[int, str, Optional[str]]:
        """Start the command in a process group of its own, so that stopping it also stops the processes it started
        (torchrun's workers); wait for it and return its exit status, stdout and stderr (None when merged)."""
        if env is None:
            env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()))
        with self._lock:
            if self._closed:
                raise RuntimeError('the session ended before this command started')
            process = self._process = subprocess.Popen([str(a) for a in args], cwd=cwd, env=env,
                                                       stdout=subprocess.PIPE, stderr=stderr, text=True,
                                                       start_new_session=True)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._stop(process)
            out, err = process.communicate()
            raise AssertionError(f'{" ".join(map(str, args))} ran past {timeout} s:\n{(out + (err or ""))[-4000:]}')
        return process.returncode, out, err

    @staticmethod
    def _stop(process: subprocess.Popen) -> None:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the group this class created for the command
            except ProcessLookupError:  # it ended in between
                pass

    def close(self) -> None:
        """End of the session: drop the pipelines not started yet and stop the command that is running."""
        with self._lock:
            self._closed = True
            for future in self._futures.values():
                future.cancel()
            if self._process is not None:
                self._stop(self._process)
        self._executor.shutdown(wait=True)
