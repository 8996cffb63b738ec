"""Several processes (`accelerate launch`, `torchrun`): their variables checked before a process group waits on them,
and the group closed before the interpreter exits.

A launcher tells each process its place through `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR` and
`MASTER_PORT`. A rank outside the world waits forever for peers that never come, so the variables are checked first
(`check_launch_environment`) and the group's rendezvous is bounded (`PROCESS_GROUP_TIMEOUT`). A group left open at
exit is torn down by gloo's destructors while their threads still run, which aborts a finished run
(`terminate called without an active exception`); `release_process_group` closes it while every process is still
there.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import torch


#: How long processes wait for each other (the rendezvous and every collective) before giving up with an error.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)
_INTEGERS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def check_launch_environment(environ: Mapping[str, str]) -> None:
    """Refuses launcher variables that cannot describe one process of a group, before anything waits on them.

    Args:
        environ: the process's environment (`os.environ`).

    Raises:
        ValueError: a variable that is not a whole number, a rank outside its world, or a world of several
            processes without the address its processes meet at; the message names the variables and the fix.
    """
    values = {}
    for name in _INTEGERS:
        if environ.get(name, "") != "":
            try:
                values[name] = int(environ[name])
            except ValueError:
                raise ValueError(f"{name}={environ[name]!r} is not a whole number: unset it or launch with "
                                 "accelerate launch / torchrun, which set it.") from None  # fmt: skip
    world = values.get("WORLD_SIZE")
    if world is not None and world < 1:
        raise ValueError(f"WORLD_SIZE={world}: a world holds at least one process.")
    for rank_name, size_name in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        rank, size = values.get(rank_name), values.get(size_name)
        if rank is not None and (rank < 0 or (size is not None and rank >= size)):
            limit = f" (ranks 0 to {size - 1})" if size is not None else ""
            raise ValueError(
                f"{rank_name}={rank} is outside {size_name}={size}{limit}: this process would wait forever for its "
                "peers. Launch with accelerate launch or torchrun, or unset the variables to run one process."
            )
    if world is not None and world > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
                "the processes have nowhere to meet. Launch with accelerate launch or torchrun."
            )


def release_process_group(state, clean: bool) -> None:
    """Closes the process group of accelerate's `state`, if there is one, before the interpreter exits.

    Args:
        state: the `PartialState` the work ran in.
        clean: the work ended without an error in this process: wait for the others first, so that none is left
            waiting on a group that is gone. After an error the group is only closed (the others may never come).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if clean:
        state.wait_for_everyone()
    torch.distributed.destroy_process_group()
