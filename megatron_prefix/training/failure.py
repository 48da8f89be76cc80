"""An error in a multi-process run: printed once, and it ends every rank (no rank left in a collective).

Before the process groups exist every rank runs the same checks on the same recipe, so rank 0 alone
prints (``RANK`` from the launcher). After, an error may be local to one rank (its data shard, its
checkpoint files) while the others wait in a collective that will never complete. So the failing rank
posts its message in the launcher's key-value store (no collective needed), prints it unless rank 0
posted the same one (the common case: every rank hit the same error), and leaves with ``os._exit``: no
``destroy_process_group`` that would wait for the others, no Python traceback for a user's mistake. A rank
that then fails in a collective because a peer left finds the peer's message in the store and leaves
quietly; under torchrun the agent also stops the remaining ranks as soon as one exits non-zero.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import torch.distributed as dist

KEY = "megatron_prefix/error"
WAIT_FOR_RANK0_S = 3.0  # how long another rank waits for rank 0's message before printing its own


def launcher_rank() -> int:
    """This process's global rank (``RANK`` as torchrun / SLURM set it; 0 for a single process)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 (no default group, or a torch without the helper: every rank prints)
        return None


def _get(store, key: str) -> str | None:
    try:
        if store.check([key]):
            return store.get(key).decode()
    except Exception:  # noqa: BLE001, S110 (a store gone with rank 0: as if nothing was posted)
        pass
    return None


def fail(message: str, code: int, *, user_error: bool) -> int:
    """Report ``message`` once for the whole job and return ``code``; after process groups exist this
    does not return: the process leaves with ``os._exit(code)``.

    ``user_error``: the message is the whole story (a config, data or checkpoint mistake); otherwise the
    caller put the traceback in ``message``."""
    rank = launcher_rank()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if rank == 0:
            print(message, file=sys.stderr, flush=True)
        return code
    store = _store()
    peers = {}
    if store is not None:
        for r in range(dist.get_world_size()):
            text = _get(store, f"{KEY}/{r}")
            if text is not None and r != rank:
                peers[r] = text
    if peers and not user_error:
        # most likely a collective broken because a peer left: the peer's message says why
        _leave(code)
    if store is not None:
        try:
            store.set(f"{KEY}/{rank}", message)
        except Exception:  # noqa: BLE001
            store = None
    if rank == 0:
        print(message, file=sys.stderr, flush=True)
        _leave(code)
    deadline = time.monotonic() + WAIT_FOR_RANK0_S
    same = False
    while store is not None and time.monotonic() < deadline:
        text = _get(store, f"{KEY}/0")
        if text is not None:
            same = text == message
            break
        time.sleep(0.05)
    if not same and not any(text == message for r, text in peers.items() if r < rank):
        print(f"[rank {rank}] {message}", file=sys.stderr, flush=True)
    _leave(code)
    return code  # not reached


def _leave(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def user_message(task: str, err: BaseException) -> str:
    """A user's mistake (``ValueError``, ``ConfigError``: one line per error) as the launcher prints it."""
    lines = str(err).splitlines() or [repr(err)]
    head = "config error" if len(lines) == 1 else f"{len(lines)} config errors"
    return "\n".join([f"train_{task}: {head}:", *(f"  {line}" for line in lines)])


def describe(err: BaseException) -> str:
    """A non-user error: its traceback (a bug to report), as text."""
    return "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip()
