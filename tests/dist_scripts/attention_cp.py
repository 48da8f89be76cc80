"""CP=2 on gloo: every rank's local outputs and q/k/v gradients equal the single-process computation.

Run by ``tests/test_attention.py::test_context_parallel_matches_single_process`` via torchrun (2 ranks).
Backends: dense (forward+backward), varlen CPU reference (forward+backward), flex (forward only on CPU).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from megatron_prefix.attention.context_parallel import split_for_cp
from megatron_prefix.attention.params import SharedPrefixParams
from tests.dist_scripts.attention_common import make_layer, random_qkv, random_rows

TOL = 1e-5
T, B = 48, 2


def init(cp: int) -> None:
    """gloo + megatron parallel state with context_parallel_size=cp (parallel.py may not exist yet)."""
    dist.init_process_group("gloo")
    try:
        from megatron_prefix.parallel import init_parallel  # type: ignore

        init_parallel(tp=1, pp=1, cp=cp, seed=1234)
    except ImportError:
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(context_parallel_size=cp)


def check(backend: str, cp: int, rank: int) -> None:
    cfg = {
        "dense": None,
        "flex": {"backend": "flex", "allow_cpu_reference": True, "flex_block_size": 16},
        "varlen": {"backend": "varlen", "allow_cpu_reference": True},
    }[backend]
    rows = random_rows(20, B, T)
    q, k, v = random_qkv(T, B, seed=21)
    w = torch.randn(T, B, 32, generator=torch.Generator().manual_seed(22))
    grad_on = backend != "flex"
    ref_layer = make_layer(None if backend == "flex" else cfg)  # flex is checked against dense
    with torch.set_grad_enabled(grad_on):
        full = ref_layer(q, k, v, None, packed_seq_params=SharedPrefixParams.from_rows(rows))
    local = [split_for_cp(x.detach(), cp, rank, seq_dim=0).requires_grad_(grad_on) for x in (q, k, v)]
    layer = make_layer(cfg, cp=cp)
    with torch.set_grad_enabled(grad_on):
        out = layer(*local, None, packed_seq_params=SharedPrefixParams.from_rows(rows))
    err = (out - split_for_cp(full, cp, rank, seq_dim=0)).abs().max().item()
    assert err <= TOL, f"{backend} rank {rank}: forward max abs err {err}"
    if grad_on:
        full_grads = torch.autograd.grad((full * w).sum(), (q, k, v))
        (out * split_for_cp(w, cp, rank, seq_dim=0)).sum().backward()
        for name, x, g in zip("qkv", local, full_grads):
            gerr = (x.grad - split_for_cp(g, cp, rank, seq_dim=0)).abs().max().item()
            assert gerr <= TOL, f"{backend} rank {rank}: d{name} max abs err {gerr}"
    print(f"OK {backend} rank {rank}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="dense,flex,varlen")
    args = parser.parse_args()
    cp = int(os.environ["WORLD_SIZE"])
    init(cp)
    rank = dist.get_rank()
    for backend in args.backends.split(","):
        check(backend, cp, rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
