"""What a checkpoint records about helix, and the refusal of checkpoints no layout can read.

Helix attention saves its QKV rows and projection columns as pieces of the *standard* tensors
(``checkpoint.standard_layout_factory``), so a torch_dist checkpoint written at helix (m, n)
loads at any layout. megatron_helix releases before that saved the rank's helix-ordered rows as
ordinary tensor-parallel shards: such a checkpoint looks exactly like a TP checkpoint of the
same size and loads without any error, scrambled, at every layout, its own included.

So every checkpoint written with helix records the layout of its attention tensors:
Megatron-LM's saved ``args`` carry ``helix_checkpoint_layout = "standard"`` beside ``helix_m``
and ``helix_n`` (``mark_standard_layout``), the plugin trainer's common state the same three
keys. A checkpoint that says it was written at ``--helix-m`` > 1 without that record is in the
old helix order and is refused, before any process group exists, naming both layouts. (At
``m = 1`` the helix order is the standard one: nothing to refuse.)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from megatron_helix.parallel_dims import HelixConfigError

STANDARD_LAYOUT = "standard"
LAYOUT_KEY = "helix_checkpoint_layout"
#: Megatron-LM's tracker file: the newest complete checkpoint of a ``--save`` directory.
TRACKER = "latest_checkpointed_iteration.txt"


def mark_standard_layout(args: argparse.Namespace) -> None:
    """Record in ``args`` (which Megatron-LM saves in every checkpoint) that this run writes its
    attention tensors in the standard layout."""
    setattr(args, LAYOUT_KEY, STANDARD_LAYOUT)


def layout_record(helix_m: int, helix_n: int) -> dict:
    """The trainer's record of a run at helix (``helix_m``, ``helix_n``)."""
    return {"helix_m": helix_m, "helix_n": helix_n, LAYOUT_KEY: STANDARD_LAYOUT}


def _read(recorded: Any, key: str) -> Any:
    """``recorded[key]`` of a record that is a dict (trainer) or a Namespace (Megatron-LM)."""
    return recorded.get(key) if isinstance(recorded, dict) else getattr(recorded, key, None)


def unreadable_reason(recorded: Any, where: str) -> Optional[str]:
    """Why no layout can read a checkpoint whose record (saved Megatron-LM ``args``, or the
    trainer's layout dict) is ``recorded``; None when its attention tensors are standard.
    ``where`` names the checkpoint in the message."""
    m, n = _read(recorded, "helix_m") or 1, _read(recorded, "helix_n") or 1
    layout = _read(recorded, LAYOUT_KEY)
    if layout not in (None, STANDARD_LAYOUT):
        return (f"{where} records its attention tensors in the {layout!r} layout, which this "
                f"megatron_helix cannot map (it reads {STANDARD_LAYOUT!r})")
    if layout is None and m > 1:
        return (f"{where} was written at --helix-m {m} --helix-n {n} by a megatron_helix that "
                f"saved attention weights in helix order; loaded at any layout, helix ({m},{n}) "
                f"included, its QKV and projection tensors would come back scrambled. Load it "
                f"with the megatron_helix release that wrote it; checkpoints written since are "
                f"in the standard layout and load anywhere")
    return None


def checkpoint_dir(load_dir: str, step: Optional[int] = None) -> Optional[Path]:
    """The checkpoint Megatron-LM (and the plugin trainer) would load from ``load_dir``: the
    iteration its tracker file names (or ``step``), or None when there is none."""
    load_dir = Path(load_dir)
    if step is None:
        tracker = load_dir / TRACKER
        if not tracker.is_file():
            return None
        text = tracker.read_text().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}"
    else:
        name = f"iter_{step:07d}"
    path = load_dir / name
    return path if path.is_dir() else None


def saved_record(load_dir: str, step: Optional[int] = None) -> Any:
    """What the checkpoint that would load from ``load_dir`` says about its layout: Megatron-LM's
    saved ``args`` or the plugin trainer's ``layout`` dict, read from torch_dist's
    ``common.pt`` or, for the legacy format, the first rank's file (memory-mapped); None when
    there is no checkpoint or no record."""
    import torch

    path = checkpoint_dir(load_dir, step)
    if path is None:
        return None
    files = [path / "common.pt"] if (path / "common.pt").is_file() else sorted(
        path.glob("mp_rank_*/model_optim_rng.pt"))
    if not files:
        return None
    # Megatron-LM's own reader unpickles these files the same way: they hold an argparse
    # Namespace, so weights_only cannot load them.
    state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    if not isinstance(state, dict):
        return None
    return state.get("args", state.get("layout"))


def check_checkpoint_to_load(args: argparse.Namespace) -> None:
    """Raise ``HelixConfigError`` when ``--load`` or ``--pretrained-checkpoint`` names a
    checkpoint no layout can read; call at argument time, on every run, helix or not.

    A readable checkpoint saved at another helix layout is said on rank 0: the layout is the
    command line's (``--use-checkpoint-args`` restores the model shape, not parallel sizes).
    """
    for flag in ("load", "pretrained_checkpoint"):
        directory = getattr(args, flag, None)
        if not directory:
            continue
        step = getattr(args, "ckpt_step", None) if flag == "load" else None
        recorded = saved_record(directory, step)
        if recorded is None:
            continue
        where = f"the checkpoint in --{flag.replace('_', '-')} {directory}"
        reason = unreadable_reason(recorded, where)
        if reason:
            raise HelixConfigError(f"refusing to load: {reason}")
        saved = (_read(recorded, "helix_m") or 1, _read(recorded, "helix_n") or 1)
        run = (getattr(args, "helix_m", 1), getattr(args, "helix_n", 1))
        if saved != (1, 1) and saved != run and getattr(args, "rank", 0) == 0:
            print(f"megatron_helix: {where} was saved at helix ({saved[0]},{saved[1]}) with its "
                  f"attention tensors in the standard layout; this run reads them at helix "
                  f"({run[0]},{run[1]})", flush=True)
