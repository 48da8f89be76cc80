"""dist_checkpointing (torch_dist) on CPU/gloo: reshard TP=2 -> TP=1, and a bitwise resume of Adam.

``--mode save --dir D`` (any TP): train one step, ``dist_checkpointing.save`` the model, and write each
rank's local tensors as a reference. ``--mode load --dir D`` (TP=1): load into a differently initialised
model and check it equals the TP shards concatenated along their partition dims. ``--mode resume --dir D
--dist_opt 0|1``: 4 uninterrupted steps vs 2 steps + save (model + optimizer) + load into a fresh model and
optimizer + 2 steps: losses and weights must be bitwise identical and every parameter must own its Adam
``step`` (== 4). Prints ``OK`` on rank 0.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from tests.dist_scripts import compat_common as cc

OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "distrib_optim_fully_reshardable_mem_efficient": True}


def _save_model(ddp, directory: str) -> None:
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(ddp.module.sharded_state_dict(), directory)


def mode_save(args, info) -> None:
    model = cc.build_gpt(info, seed=args.seed)
    ddp = cc.wrap_ddp(model)
    opt = cc.make_optimizer(ddp)
    cc.train_step(ddp, opt, info, 0)
    _save_model(ddp, os.path.join(args.dir, "model"))
    ref = {n: (p.detach().clone(), getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else -1)
           for n, p in ddp.module.named_parameters()}
    torch.save(ref, os.path.join(args.dir, f"ref_tp{info.tp_rank}.pt"))


def mode_load(args, info) -> None:
    from megatron.core import dist_checkpointing

    assert info.tp_size == 1 and info.world_size == 1
    model = cc.build_gpt(info, seed=args.seed + 1)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(args.dir, "model"))
    model.load_state_dict(loaded)
    refs = [torch.load(os.path.join(args.dir, f"ref_tp{r}.pt")) for r in range(args.saved_tp)]
    for name, p in model.named_parameters():
        pieces = [r[name][0] for r in refs]
        dim = refs[0][name][1]
        expected = torch.cat(pieces, dim=dim) if dim >= 0 else pieces[0]
        assert torch.equal(p.detach(), expected), f"{name} differs after TP={args.saved_tp} -> TP=1 reshard"


def _build(info, seed: int, dist_opt: bool):
    ddp = cc.wrap_ddp(cc.build_gpt(info, seed=seed), dist_opt)
    return ddp, cc.make_optimizer(ddp, dist_opt)


def _inner_optimizers(opt):
    return [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]


def mode_resume(args, info) -> None:
    from megatron.core import dist_checkpointing

    dist_opt = bool(args.dist_opt)
    ddp, opt = _build(info, args.seed, dist_opt)
    straight = [cc.train_step(ddp, opt, info, s) for s in range(4)]
    final = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}

    ddp, opt = _build(info, args.seed, dist_opt)
    first = [cc.train_step(ddp, opt, info, s) for s in range(2)]
    directory = os.path.join(args.dir, f"resume_{int(dist_opt)}")
    if info.rank == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    model_sd = ddp.module.sharded_state_dict()
    state = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, metadata=OPT_METADATA)}
    dist_checkpointing.save(state, directory)

    ddp, opt = _build(info, args.seed + 7, dist_opt)  # different init: everything must come from the checkpoint
    model_sd = ddp.module.sharded_state_dict()
    template = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True, metadata=OPT_METADATA)}
    loaded = dist_checkpointing.load(template, directory)
    ddp.module.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    rest = [cc.train_step(ddp, opt, info, s) for s in range(2, 4)]

    assert first + rest == straight, f"losses differ after resume: {first + rest} vs {straight}"
    for n, p in ddp.module.named_parameters():
        assert torch.equal(p.detach(), final[n]), f"{n} differs after resume"
    for inner in _inner_optimizers(opt):
        steps = [s["step"] for s in inner.state.values()]
        assert steps and len({id(s) for s in steps}) == len(steps), "parameters share one Adam step tensor"
        assert all(float(s) == 4.0 for s in steps), f"Adam steps after resume: {sorted({float(s) for s in steps})}"


def main() -> None:
    args = cc.parse_args({"mode": "save", "dir": "", "dist_opt": 0, "saved_tp": 2})
    info = cc.setup(args.tp, args.pp, args.seed)
    {"save": mode_save, "load": mode_load, "resume": mode_resume}[args.mode](args, info)
    dist.barrier()
    from megatron_prefix.parallel import destroy_parallel

    destroy_parallel()
    if info.rank == 0:
        print("OK", flush=True)


if __name__ == "__main__":
    main()
