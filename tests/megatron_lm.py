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

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import List, Optional, Sequence

from megatron_helix.compat import MEGATRON_LM_TAGS, megatron_lm_tag

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

    Later flags win, so ``flags`` may override ``TINY_GPT``. The ranks are forked from one
    process that imported Megatron once (``tests/forked_ranks.py``); with ``log_dir`` they are
    started by torchrun instead, which keeps every rank's output under
    ``log_dir/<attempt>/<rank>/``.
    """
    launch = ["--cpu", str(tree / script), *TINY_GPT, "--train-iters", str(iterations), *flags]
    if log_dir is None:
        command = [sys.executable, str(ROOT / "tests" / "forked_ranks.py"), str(nproc), *launch]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(nproc), "--log-dir", str(log_dir), "--tee", "3",
                   "-m", "megatron_helix.launch", *launch]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=environment(), cwd=tree)


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
