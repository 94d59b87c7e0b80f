"""Start real gloo ranks for a test and collect what each rank returns.

Ranks are forked from a fork server that imported torch, megatron-core and the plugin once for
the whole session (``set_forkserver_preload``), instead of each rank importing them afresh
(several seconds per rank on two cores); the server holds no threads and no process group, so
every world starts clean. Tests still run many checks inside one world. A rank that raises
fails the whole call with that rank's traceback; a world that outlives its timeout is killed,
never left hanging.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from typing import Any, Callable, List

import torch.distributed as dist
import torch.multiprocessing as mp

mp.set_forkserver_preload(["megatron.core", "megatron_helix.trainer", "tests.distributed"])


def _rank_main(rank: int, world_size: int, port: int, out_dir: str):
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")  # megatron-core's "no TE/apex" notices, once per rank

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), TORCHELASTIC_USE_AGENT_STORE="True",
    )
    torch.set_num_threads(1)
    result: Any
    try:
        with open(os.path.join(out_dir, "call.pkl"), "rb") as f:
            fn, args = pickle.load(f)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # reported to the parent, which re-raises
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if result[0] == "error":
        os._exit(1)  # do not wait in destroy_process_group for ranks that will never come
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 300) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each result.

    ``fn`` must be a module-level function (it is pickled into the ranks by reference).
    """
    # The ranks' store lives here, as torchrun's agent holds it: bound to a port of the
    # kernel's choice for as long as the world runs. A port merely found free and bound later
    # by rank 0 can be taken in between (the suites of both environments run side by side).
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    port = store.port
    with tempfile.TemporaryDirectory() as out_dir:
        # Through a file, by value: multiprocessing would hand every tensor of ``args`` over as
        # a shared-memory file descriptor, more than a fork server accepts at once.
        with open(os.path.join(out_dir, "call.pkl"), "wb") as f:
            pickle.dump((fn, args), f)
        ctx = mp.start_processes(
            _rank_main, args=(world_size, port, out_dir), nprocs=world_size,
            join=False, start_method="forkserver",
        )
        import time

        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size}-rank world did not finish in {timeout} s")
        except mp.ProcessRaisedException:
            pass
        except mp.ProcessExitedException:
            pass
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        errors = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {rank} died without a result")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            results.append(value)
        if errors:
            raise AssertionError("\n".join(errors))
        return results
