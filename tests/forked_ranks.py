"""Serve ``python -m megatron_helix.launch`` runs on N CPU ranks forked from one warm process.

torchrun starts every rank as a fresh interpreter, and each one imports torch, megatron-core
and ``megatron.training`` (about 10 s of CPU here), so on two cores a 4-rank launch spends most
of its time importing the same modules four times. One server per Megatron-LM tree imports
them once, for the whole test session; for each run it forks a launch process, which forks the
ranks. Each rank gets the environment torchrun gives a rank (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and
``TORCHELASTIC_USE_AGENT_STORE``: the launch process holds the store, as torchrun's agent
does) and from there runs ``megatron_helix.launch.main`` exactly as
``torchrun -m megatron_helix.launch`` would.

What the server imports is what cannot see the helix hooks: ``megatron.training``'s own modules
look the hooked names up at call time, while ``gpt_builders`` and the script, which bind the
hooked names when imported, are imported by each rank after ``install_hooks``. Only modules
are imported in the server (no computation, no threads), so every run starts clean.

    python tests/forked_ranks.py TREE

reads one JSON request per line on stdin (``nproc``, ``args`` for the launcher, ``cwd``,
``env``, ``stdout`` and ``stderr`` file paths, optional ``log_dir`` for one
``RANK/stdout.log`` and ``RANK/stderr.log`` per rank) and answers two JSON lines on stdout:
``{"pid": ...}`` when the run starts (its process group, for the client's timeout) and
``{"status": ...}``, the first failing rank's exit status, when it ends. The other ranks are
then stopped, as torchrun stops them. Everything dies with the server, and the server with the
client.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from typing import Dict, List, Optional

_PR_SET_PDEATHSIG = 1
_GRACE_S = 5.0  # for the other ranks to report their own error before they are stopped
#: Imported before any fork when the tree has them: what each rank imports anyway and does not
#: bind a hooked name (the tokenizer builder alone is ~2 s of CPU per rank here).
_WARM_MODULES = (
    "megatron.training.training",
    "megatron.core.tokenizers.text.utils.build_tokenizer",
    "megatron.core.datasets.blended_megatron_dataset_builder",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron_helix.launch",
    "megatron_helix.megatron_lm_cpu",
    "megatron_helix.specs",
)


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _warm_up(tree: str) -> None:
    """Import what every rank of ``tree`` imports first, from that tree."""
    import importlib

    sys.path.insert(0, tree)
    for name in _WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            if name.startswith(("megatron.training", "megatron_helix")):
                raise  # the tree or the plugin is broken: say so here


def _redirect(fd: int, path: str) -> None:
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(target, fd)
    os.close(target)


def _exit(status: int) -> None:
    """End a rank as a normal exit would, without tearing the interpreter down.

    The exit handlers run (multiprocessing's stops the processes the rank started, such as the
    checkpoint writer's workers) and the output is flushed; then the process ends. Skipped is
    only the interpreter's own finalization, which frees every module of megatron.training
    one by one: about 3 s of CPU per rank here, for memory the kernel frees anyway.
    """
    import atexit

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _rank(rank: int, nproc: int, port_pipe: int, launch_args: List[str],
          log_dir: Optional[str]) -> int:
    """One rank: torchrun's environment, then the launcher; returns the exit status.

    The port of the launch process's store arrives through ``port_pipe``.
    """
    _die_with_parent()
    with os.fdopen(port_pipe) as pipe:
        port = pipe.readline().strip()  # a line: later ranks hold this pipe's write end too
    if log_dir is not None:
        os.makedirs(os.path.join(log_dir, str(rank)), exist_ok=True)
        _redirect(1, os.path.join(log_dir, str(rank), "stdout.log"))
        _redirect(2, os.path.join(log_dir, str(rank), "stderr.log"))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port, TORCHELASTIC_USE_AGENT_STORE="True")
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


def _launch(request: Dict) -> None:
    """The launch process of one run (its own process group): fork the ranks, wait, exit."""
    _die_with_parent()
    os.setpgid(0, 0)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    _redirect(1, request["stdout"])
    _redirect(2, request["stderr"])
    children, port_pipes = [], []
    for rank in range(request["nproc"]):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(write)
            _exit(_rank(rank, request["nproc"], read, request["args"], request.get("log_dir")))
        os.close(read)
        children.append(pid)
        port_pipes.append(write)
    # The ranks' store, as torchrun's agent holds it: bound to a port of the kernel's choice
    # and held until the ranks end. A port merely found free and bound later by rank 0 can be
    # taken in between by another process. Made after the forks: the ranks do not inherit the
    # store's server thread.
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, request["nproc"], is_master=True, wait_for_workers=False)
    for pipe in port_pipes:
        os.write(pipe, f"{store.port}\n".encode())
        os.close(pipe)
    os._exit(_wait(children))


def serve(tree: str) -> None:
    _die_with_parent()
    _warm_up(tree)
    replies = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        replies.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _launch(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, code = os.waitpid(pid, 0)
        replies.write(json.dumps({"status": os.waitstatus_to_exitcode(code)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve(os.path.abspath(sys.argv[1]))
