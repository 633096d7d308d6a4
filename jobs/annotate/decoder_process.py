"""Decoding in a child process, so a decoder that crashes or hangs costs one row instead of the job.

Pillow's codecs are C: a hostile file can crash the process that decodes it (SIGSEGV) or keep it
busy forever. In the decode task's own process a crash kills the Ray worker; Ray retries the
task, which crashes again on the same object, so the job fails (bounded retries) or never ends
(Ray Data's default), and every re-run stops at the same object.

How the job uses this (:func:`jobs.annotate.decoding.prepare_images`): a block's first attempt
decodes in its own process, at no extra cost - the path nearly every block takes. Ray retries a
block whose worker died (a bounded ``max_retries``, :mod:`jobs.annotate.pipeline`), and a retried
block decodes each object in a :class:`DecoderProcess`: the object that kills the child gets the
error row ``decoder crashed (SIGSEGV)``, one that takes longer than ``timeout_s`` is killed
(``decoder timed out after 60 s``), and a fresh child decodes the rest. The first attempt names
nothing, the retry finds the object itself: no breadcrumbs, no call to a central actor per object.

Chosen over decoding every object in a child (a copy of every resized image through a pipe:
benchmarks/RESULTS.md measures what that costs) and over failing the job with the object's name
(the archive could never be finished without editing it).

Test hook: when the environment variable ``DETR_RAY_TEST_KILL_DECODER`` is set, a process about
to decode an object whose URI contains its value kills itself with SIGKILL (see
:func:`kill_if_test_hook_matches`); the tests use it to crash a real decoder on one object.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from detr.image_decoding import ImageDecodeError

TEST_HOOK_VARIABLE = "DETR_RAY_TEST_KILL_DECODER"
# A decode of the largest image we accept (the decompression-bomb limit, ~89 megapixels) takes a
# few seconds on a busy core; a decoder still busy after this is stuck in a loop.
DECODE_TIMEOUT_S = 60.0
# Starting a child imports torch and Pillow: seconds on a loaded node.
START_TIMEOUT_S = 300.0


def kill_if_test_hook_matches(uri: str) -> None:
    """Test hook: SIGKILL this process if ``$DETR_RAY_TEST_KILL_DECODER`` is set and in ``uri``."""
    needle = os.environ.get(TEST_HOOK_VARIABLE)
    if needle and needle in uri:
        os.kill(os.getpid(), signal.SIGKILL)


class DecoderProcess:
    """A child process that runs ``decode(uri, data, settings)`` on one object at a time.

    Args:
        decode: a module-level function (imported by name in the child) that returns a picklable
            result or raises :class:`ImageDecodeError`.
        settings: its third argument, sent to the child once.
        timeout_s: a decode that takes longer is killed and becomes ``decoder timed out``.
    """

    def __init__(self, decode: Callable[[str, bytes, Any], Any], settings: Any, timeout_s: float = DECODE_TIMEOUT_S):
        self._target = (decode.__module__, decode.__qualname__)
        self.settings = settings
        self.timeout_s = timeout_s
        self._child: subprocess.Popen | None = None
        self.crashes = 0

    def decode(self, uri: str, data: bytes) -> Any:
        """The child's result for one object.

        Raises:
            ImageDecodeError: the decoder's own reason, ``decoder crashed (SIGSEGV)`` when the
                child died on this object, or ``decoder timed out after N s``.
        """
        child = self._started()
        try:
            pickle.dump((uri, data), child.stdin)
            child.stdin.flush()
            if not select.select([child.stdout], [], [], self.timeout_s)[0]:
                self.close()
                raise ImageDecodeError(f"decoder timed out after {self.timeout_s:g} s")
            status, value = pickle.load(child.stdout)
        except (OSError, EOFError, pickle.UnpicklingError):  # the pipe broke: the child is gone
            self.crashes += 1
            raise ImageDecodeError(f"decoder crashed ({self._reap()})") from None
        if status == "error":
            raise ImageDecodeError(value)
        return value

    @property
    def pid(self) -> int:
        """The child's process id (started if it is not running)."""
        return self._started().pid

    def close(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            self._child = None

    def __enter__(self) -> DecoderProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _started(self) -> subprocess.Popen:
        if self._child is not None:
            return self._child
        # The child imports what this process can: the Ray worker's sys.path (runtime_env
        # working_dir, py_modules), not only what the installed environment has.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        env.setdefault("OMP_NUM_THREADS", "1")  # one image at a time, like the 1-CPU task that starts it
        child = subprocess.Popen(
            [sys.executable, "-c", f"from {__name__} import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._child = child
        try:
            pickle.dump((self._target, self.settings), child.stdin)
            child.stdin.flush()
            if not select.select([child.stdout], [], [], START_TIMEOUT_S)[0]:
                raise EOFError
            pickle.load(child.stdout)  # "ready": imports done
        except (OSError, EOFError, pickle.UnpicklingError):
            raise RuntimeError(f"the decoder process did not start ({self._reap()})") from None
        return child

    def _reap(self) -> str:
        """Wait for the dead child; how it ended, e.g. ``SIGSEGV`` or ``exit code 1``."""
        child, self._child = self._child, None
        if child is None:
            return "not running"
        child.kill()  # no-op when it is dead already; ends a child that closed its pipe and lives on
        code = child.wait()
        if code < 0:
            try:
                return signal.Signals(-code).name
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"


def _serve() -> None:
    """The child: load the decode function, say ready, then answer one object at a time until EOF."""
    inbox = sys.stdin.buffer
    outbox = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to the log, not the protocol
    (module_name, function_name), settings = pickle.load(inbox)
    import importlib

    decode = getattr(importlib.import_module(module_name), function_name)
    pickle.dump(("ready", None), outbox)
    outbox.flush()
    while True:
        try:
            uri, data = pickle.load(inbox)
        except EOFError:  # the parent closed the pipe or died
            return
        try:
            reply = ("ok", decode(uri, data, settings))
        except ImageDecodeError as error:
            reply = ("error", error.reason)
        pickle.dump(reply, outbox)
        outbox.flush()


if __name__ == "__main__":
    _serve()
