"""Megatron-LM's own source for the tests: the vendored release, unpacked, patched and run.

``../shared/vendor/`` (beside the repository; ``MEGATRON_LM_VENDOR`` names another folder)
holds Megatron-LM exactly as ``git archive`` wrote it at each release tag. Tests unpack a tree
into a temporary directory, optionally apply ``patches/apply.sh``, and run its
``pretrain_gpt.py`` on CPU gloo ranks through ``python -m megatron_helix.launch --cpu``. A
missing archive is an error, never a skip: these tests are what shows the real path works.

``TAG`` is the tag that matches the installed megatron-core (0.16.x: core_v0.16.1 on Python
3.11; 0.19.x: core_v0.19.0 on Python 3.12; anything else is an error), so the same tests run
the tree the environment's plugin code is built for. The tree's own ``megatron/core`` is the
one its scripts import; the installed one only chooses the tree.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_helix.compat import MEGATRON_LM_TAGS, megatron_lm_tag
from megatron_helix.megatron_lm_cpu import dataset_helpers_make_command

ROOT = Path(__file__).resolve().parents[1]
APPLY = ROOT / "patches" / "apply.sh"
VENDOR = Path(os.environ.get("MEGATRON_LM_VENDOR", ROOT.parent / "shared" / "vendor"))
#: Every tag ``patches/`` supports (``apply.sh``'s table), and the one under test here.
TAGS = tuple(MEGATRON_LM_TAGS.values())
TAG = megatron_lm_tag()

#: ``examples/tiny_gpt.args``: a GPT that trains in well under a second per step on one CPU
#: core (fp32, local layers, mock data). Its vocabulary (127 + the null tokenizer's
#: end-of-document = 128) pads to 128 at every TP size up to 4, so every layout trains the same
#: output layer.
TINY_GPT = (ROOT / "examples" / "tiny_gpt.args").read_text().split()

_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.E+-]+) \|")


def unpack(destination: Path, tag: str = TAG) -> Path:
    """Unpack the vendored Megatron-LM at ``tag`` under ``destination``; returns the tree."""
    archive = VENDOR / f"megatron-lm-{tag}.tar.gz"
    if not archive.is_file():
        raise FileNotFoundError(
            f"{archive} is missing: the Megatron-LM tests need the vendored source "
            f"(set MEGATRON_LM_VENDOR to the folder holding megatron-lm-{tag}.tar.gz)"
        )
    with tarfile.open(archive) as tar:
        tar.extractall(destination, filter="tar")
    return destination / f"Megatron-LM-{tag}"


#: tag -> the dataset helpers library built for it in this session
_built_helpers: Dict[str, Path] = {}


def _build_dataset_helpers(tree: Path) -> None:
    """Give ``tree`` (an ``unpack``ed tree about to train) Megatron's compiled dataset index
    helpers, built once per tag per session.

    Every run compiles them (``make`` in ``megatron/core/datasets``, about 12 s of ``g++ -O3``
    here) unless the library is newer than ``helpers.cpp``; a copy of the library the same
    command built from the same source in an earlier tree makes that ``make`` a no-op.
    """
    tag = tree.name.removeprefix("Megatron-LM-")
    datasets = tree / "megatron" / "core" / "datasets"
    if tag in _built_helpers:
        shutil.copy(_built_helpers[tag], datasets)  # a fresh mtime: newer than helpers.cpp
        return
    subprocess.run(dataset_helpers_make_command(str(datasets)), check=True,
                   capture_output=True)
    _built_helpers[tag] = next(datasets.glob("helpers_cpp*"))


def patch(tree: Path) -> Path:
    """Apply ``patches/apply.sh`` to ``tree``; returns it."""
    proc = subprocess.run(["bash", str(APPLY), str(tree)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"apply.sh failed:\n{proc.stderr}")
    return tree


#: Megatron-LM core_v0.19.0's own ``--help`` raises ``ValueError: unsupported format character
#: ')'``, with or without the plugin: the help of ``--moe-paged-stash-buffer-size-factor-cuda``,
#: taken from a ``TransformerConfig`` field's docstring, ends in "10%)", which argparse expands
#: as a %-format. (file, text, text with the % escaped)
_UNESCAPED_HELP = (("megatron/core/transformer/transformer_config.py", "(e.g. 1.10 = 10%).",
                    "(e.g. 1.10 = 10%%)."),)


def mend_help(tree: Path) -> Path:
    """Escape Megatron-LM's stray ``%`` in ``tree`` (``_UNESCAPED_HELP``) so ``--help`` prints;
    for the tests that read the help, after ``apply.sh``. A no-op where it is not there
    (core_v0.16.1)."""
    for name, text, escaped in _UNESCAPED_HELP:
        path = tree / name
        source = path.read_text()
        if text in source:
            path.write_text(source.replace(text, escaped))
    return tree


def environment(**extra: str) -> dict:
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def pretrain(
    tree: Path,
    nproc: int,
    flags: Sequence[str],
    *,
    iterations: int = 5,
    log_dir: Optional[Path] = None,
    timeout: int = 300,
    script: str = "pretrain_gpt.py",
) -> subprocess.CompletedProcess:
    """``megatron_helix.launch --cpu TREE/SCRIPT TINY_GPT FLAGS`` on ``nproc`` ranks.

    Later flags win, so ``flags`` may override ``TINY_GPT``."""
    launch_args = ["--cpu", str(tree / script), *TINY_GPT, "--train-iters", str(iterations),
                   *flags]
    return launch(tree, nproc, launch_args, log_dir=log_dir, timeout=timeout)


#: tree -> its rank server (tests/forked_ranks.py), started on first use
_servers: Dict[Path, subprocess.Popen] = {}


def _server(tree: Path) -> subprocess.Popen:
    server = _servers.get(tree)
    if server is None or server.poll() is not None:
        _build_dataset_helpers(tree)
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "forked_ranks.py"), str(tree)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=environment(),
            cwd=tree,
        )
        _servers[tree] = server
    return server


@atexit.register
def _stop_servers() -> None:
    for server in _servers.values():
        server.kill()
        server.wait()


def launch(
    tree: Path,
    nproc: int,
    launch_args: Sequence[str],
    *,
    env: Optional[dict] = None,
    log_dir: Optional[Path] = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node NPROC -m megatron_helix.launch LAUNCH_ARGS`` in ``tree``.

    The ranks are forked from a server that imported Megatron once per tree and session
    (``tests/forked_ranks.py``), with torchrun's rank environment. With ``log_dir`` every rank
    also writes its output to ``log_dir/RANK/{stdout,stderr}.log``, as ``torchrun --log-dir``
    does; the returned output is then all ranks' in rank order. A run past ``timeout`` seconds
    is killed and raises ``subprocess.TimeoutExpired``.
    """
    server = _server(tree)
    with tempfile.TemporaryDirectory() as scratch:
        out, err = Path(scratch, "stdout"), Path(scratch, "stderr")
        request = dict(nproc=nproc, args=list(launch_args), cwd=str(tree),
                       env=env or environment(), stdout=str(out), stderr=str(err),
                       log_dir=None if log_dir is None else str(log_dir))
        server.stdin.write((json.dumps(request) + "\n").encode())
        pid = _reply(server, "pid", timeout=60)
        try:
            status = _reply(server, "status", timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pid, signal.SIGKILL)
            _reply(server, "status", timeout=60)
            raise
        stdout, stderr = out.read_text(), err.read_text()
    if log_dir is not None:
        for rank in range(nproc):
            stdout += (log_dir / str(rank) / "stdout.log").read_text()
            stderr += (log_dir / str(rank) / "stderr.log").read_text()
    return subprocess.CompletedProcess(["megatron_helix.launch", *launch_args], status,
                                       stdout, stderr)


def _reply(server: subprocess.Popen, key: str, timeout: float) -> int:
    """The server's next answer line, ``key``'s value; raises if it does not come in time.

    Read byte by byte from the unbuffered pipe, so no answer waits in a buffer ``select``
    cannot see."""
    deadline, line = time.monotonic() + timeout, b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([server.stdout], [], [], max(0, deadline - time.monotonic()))
        if not ready:
            raise subprocess.TimeoutExpired(server.args, timeout)
        byte = os.read(server.stdout.fileno(), 1)
        if not byte:
            raise RuntimeError(f"the rank server of {server.args[-1]} died "
                               f"(exit {server.wait()}); its error is in the test's stderr")
        line += byte
    return json.loads(line)[key]


def losses(proc: subprocess.CompletedProcess) -> List[float]:
    """The loss of every iteration of the run, in order, from Megatron-LM's ``lm loss`` log
    (``--log-interval 1``).

    Megatron-LM (core_v0.16.1 and core_v0.19.0 alike) logs the first iteration of a run without
    resetting its loss accumulator (``should_reset = not is_first_iteration`` in
    ``training_log``), so the second logged value of every run, fresh or resumed, is the mean
    of the run's first two iterations. That mean is undone here, so a resumed run's losses
    compare with an uninterrupted run's iteration by iteration.
    """
    found = {int(it): float(loss) for it, loss in _LOSS.findall(proc.stdout + proc.stderr)}
    if proc.returncode != 0 or not found:
        raise AssertionError(
            f"pretrain_gpt.py exited {proc.returncode} with {len(found)} logged iterations:\n"
            f"{(proc.stdout + proc.stderr)[-4000:]}"
        )
    logged = [found[i] for i in sorted(found)]
    if len(logged) > 1:
        logged[1] = 2 * logged[1] - logged[0]
    return logged


def assert_same_curve(got: List[float], want: List[float], rtol: float = 1e-5) -> None:
    assert len(got) == len(want), (got, want)
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    assert worst <= rtol, f"loss curves differ by {worst:.2e} relative:\n{got}\n{want}"
