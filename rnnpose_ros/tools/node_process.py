"""The real ``refine_node`` executable as a child process of a tool (demo, soak), DDS-safe.

Before anything imports rclpy, a tool calls :func:`dds_safe_environment` (discovery on this machine,
the project's Fast DDS profile, a private ``ROS_DOMAIN_ID``); the child inherits it. :class:`NodeProcess`
starts the node in its own session, makes it die with the tool (``PR_SET_PDEATHSIG``) and stops it in
order (SIGINT, then SIGTERM, then SIGKILL); :func:`remove_stale_shm` removes the Fast DDS
shared-memory files a killed child leaves behind. :func:`ros_context` gives the tool its own rclpy
context with Ctrl-C left to the tool, and :func:`signals_as_keyboard_interrupt` routes SIGINT, SIGTERM
and SIGHUP there too, so that every way of stopping a tool runs the same clean-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rnnpose_ros.package_files import package_config_file

NODE_NAME = "rnnpose_refiner"
NODE_EXECUTABLE = "refine_node"
STOP_TIMEOUT_S = (15.0, 5.0)  # SIGINT, then SIGTERM; then SIGKILL
SHM_DIR = Path("/dev/shm")
# RTPS well-known ports: 7400 + 250 · domain + offsets (Fast DDS names its shared-memory port queues by them).
DDS_PORT_BASE = 7400
DDS_DOMAIN_GAIN = 250
PR_SET_PDEATHSIG = 1


class NodeProcessError(RuntimeError):
    """The node cannot be started (a file of the package is missing)."""


def config_file(name: str) -> Path:
    """``config/<name>`` of the package (:func:`rnnpose_ros.package_files.package_config_file`)."""
    path = package_config_file(name)
    if path is None:
        raise NodeProcessError(f"config/{name} not found in the source tree or the package share directory")
    return path


def dds_safe_environment(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with discovery confined to this machine and a private domain (for us and the child).

    Always sets the localhost discovery range and the project's Fast DDS profile; keeps a
    ``ROS_DOMAIN_ID`` that is already set, else draws one in 100–199.
    """
    env = dict(environ)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(config_file("fastdds_localhost.xml"))
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    if not env.get("ROS_DOMAIN_ID"):
        env["ROS_DOMAIN_ID"] = str(random.randint(100, 199))
    env.setdefault("PYOPENGL_PLATFORM", "egl")
    return env


def node_command(
    params_file: Path, objects_file: Path, backend: str, extra_params: Sequence[str]
) -> list[str]:
    """The ``refine_node`` command line (:func:`node_executable`); the objects file is named explicitly
    so that the node and the scene player use the same."""
    params = ["-p", f"backend:={backend}", "-p", f"objects_file:={objects_file}"]
    for assignment in extra_params:
        params += ["-p", assignment]
    return [*node_executable(), "--ros-args", "--params-file", str(params_file), *params]


def node_executable() -> list[str]:
    """How to run ``refine_node``: the console script next to ``sys.executable`` or on PATH, else the
    module through this interpreter."""
    beside = Path(sys.executable).parent / NODE_EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    if found := shutil.which(NODE_EXECUTABLE):
        return [found]
    return [sys.executable, "-m", "rnnpose_ros.ros.node"]


def _die_with_parent() -> None:
    """Child pre-exec: get SIGTERM when the parent dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def fastdds_shm_files() -> set[str]:
    """Names of the Fast DDS shared-memory files (segments, port queues, their locks and semaphores)."""
    if not SHM_DIR.is_dir():
        return set()
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(("fastdds_", "sem.fastdds_"))}


def shm_files_in_use() -> set[str]:
    """Names of files in SHM_DIR that a process maps or holds open. Processes whose maps cannot be read
    (not dumpable, e.g. a container's init) are skipped: such a process is no ROS participant."""
    prefix = f"{SHM_DIR}/"
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                if prefix in line:
                    used.add(line.rsplit(prefix, 1)[1].split(" ")[0])
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(prefix):
                    used.add(target[len(prefix) :].split(" ")[0])
        except OSError:
            continue  # not readable, or the process (or a descriptor) ended meanwhile
    return used


def _segment_alive(segment: str) -> bool:
    """Fast DDS' own liveness test: a segment's owner holds an exclusive lock on ``<segment>_el``."""
    lock_path = SHM_DIR / f"{segment}_el"
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return True  # no lock file: cannot tell, keep it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the lock if it was taken
    return False


def remove_stale_shm(before: set[str], domain_id: int) -> list[str]:
    """Remove the Fast DDS files a killed participant of this run left behind; returns their names.

    Only files created since ``before`` (names from :func:`fastdds_shm_files`) are considered: segments
    whose owner is gone (Fast DDS' zombie test) and port queues of ``domain_id``'s port range (a private
    domain), and none that any process still maps or holds open.
    """
    ports = range(
        DDS_PORT_BASE + DDS_DOMAIN_GAIN * domain_id, DDS_PORT_BASE + DDS_DOMAIN_GAIN * (domain_id + 1)
    )
    stale = set()
    for name in fastdds_shm_files() - before:
        if port := re.fullmatch(r"(?:sem\.)?fastdds_port(\d+)(?:_el|_mutex)?", name):
            if int(port[1]) in ports:
                stale.add(name)
        elif (segment := re.fullmatch(r"(fastdds_[0-9a-f]+)(?:_el)?", name)) and not _segment_alive(
            segment[1]
        ):
            stale.add(name)
    removed = []
    for name in sorted(stale - shm_files_in_use()):
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / name).unlink()
            removed.append(name)
    return removed


class NodeProcess:
    """The ``refine_node`` child: started in its own session (Ctrl-C reaches the parent, which stops it
    in order), output to ``log_path``."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path):
        self.command = command
        self.log_path = log_path
        self.shm_before = fastdds_shm_files()
        self.killed = False
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def exit_code(self) -> int | None:
        return self.process.poll()

    def log_tail(self, lines: int = 25) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """SIGINT (clean rclpy shutdown), then SIGTERM, then SIGKILL the child's whole process group."""
        for sig, timeout in ((signal.SIGINT, STOP_TIMEOUT_S[0]), (signal.SIGTERM, STOP_TIMEOUT_S[1])):
            if self.process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.killed = True
        self._log.close()

    def stop_and_clean(self) -> str:
        """:meth:`stop`, then remove the Fast DDS files a killed child left behind; one line saying so."""
        self.stop()
        removed = remove_stale_shm(self.shm_before, int(os.environ["ROS_DOMAIN_ID"])) if self.killed else []
        cleaned = f"; removed {len(removed)} stale Fast DDS shm files" if removed else ""
        return f"refine_node stopped (exit {self.exit_code}{cleaned})"


@contextlib.contextmanager
def signals_as_keyboard_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt inside the block (SIGINT explicitly: a shell
    starts background jobs with it ignored, and Python then keeps it ignored)."""
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def ros_context() -> Iterator[Any]:
    """A private rclpy context without rclpy's signal handlers (Ctrl-C stays a KeyboardInterrupt)."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    context = rclpy.Context()
    rclpy.init(args=[], context=context, signal_handler_options=SignalHandlerOptions.NO)
    try:
        yield context
    finally:
        context.try_shutdown()
