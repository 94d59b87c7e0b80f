"""Run ``python -m megatron_helix.launch`` on N CPU ranks forked from one warm process.

torchrun starts every rank as a fresh interpreter, and each one imports torch, megatron-core
and ``megatron.training`` (about 10 s of CPU here), so on two cores a 4-rank launch spends most
of its time importing the same modules four times. This launcher imports them once, then forks
the ranks; each gets the environment torchrun gives a rank (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and from there runs
``megatron_helix.launch.main`` exactly as ``torchrun -m megatron_helix.launch`` would.

What is imported before the fork is what cannot see the helix hooks: ``megatron.training``'s
own modules look the hooked names up at call time, while ``gpt_builders`` and the script,
which bind ``core_transformer_config_from_args`` by name, are imported by each rank after
``install_hooks``. Only modules are imported before the fork (no computation, no threads).

    python tests/forked_ranks.py NPROC [--cpu] TREE/SCRIPT.py [script arguments...]

Exits with the first failing rank's status; the other ranks are then stopped, as torchrun
stops them, and every rank dies with this process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time
from typing import List

_PR_SET_PDEATHSIG = 1
_GRACE_S = 5.0  # for the other ranks to report their own error before they are stopped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warm_up(script: str) -> None:
    """Import what every rank of ``script``'s tree imports first, from that tree."""
    sys.path.insert(0, os.path.dirname(script))
    import megatron.training.training  # noqa: F401
    import megatron_helix.launch  # noqa: F401
    import megatron_helix.megatron_lm_cpu  # noqa: F401


def _rank(rank: int, nproc: int, port: int, launch_args: List[str]) -> int:
    """One rank: torchrun's environment, then the launcher; returns the exit status."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from megatron_helix.launch import main

    try:
        main(launch_args)
        return 0
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1


def _wait(children: List[int]) -> int:
    """Wait for every rank; after the first failure stop the rest. Returns the exit status."""
    status, failed_at = 0, None
    alive = set(children)
    while alive:
        pid, code = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if failed_at is not None and time.monotonic() - failed_at > _GRACE_S:
                for other in alive:
                    os.kill(other, signal.SIGKILL)
            time.sleep(0.05)
            continue
        alive.discard(pid)
        code = os.waitstatus_to_exitcode(code)
        if code != 0 and status == 0:
            status, failed_at = (code if code > 0 else 1), time.monotonic()
    return status


def main(argv: List[str]) -> int:
    nproc, launch_args = int(argv[0]), argv[1:]
    script = next(arg for arg in launch_args if arg.endswith(".py"))
    _warm_up(os.path.abspath(script))
    port = _free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    children = []
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            # A normal exit, as a torchrun rank's: multiprocessing's exit handler then stops
            # the processes the rank started (the checkpoint writer's workers).
            raise SystemExit(_rank(rank, nproc, port, launch_args))
        children.append(pid)
    return _wait(children)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
