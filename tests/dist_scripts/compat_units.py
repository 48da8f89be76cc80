"""One check per CPU accommodation, on a TP=2 gloo world (run with 2 processes). Prints ``OK <name>``.

Checks: rng (tracker fork deterministic and restoring), recompute (activation recompute with dropout
reproduces the same gradients), schedules (forward_backward_no_pipelining step), clip (grad norm + clip
vs torch), rope (RotaryEmbedding.get_emb), mappings (TP gather), membuf (GlobalMemoryBuffer), l2norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist_scripts import compat_common as cc


def check_rng(info) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def draws():
        model_parallel_cuda_manual_seed(321)
        outside_before = torch.get_rng_state()
        with get_cuda_rng_tracker().fork():
            a = torch.randn(4)
        assert torch.equal(outside_before, torch.get_rng_state()), "fork did not restore the default state"
        with get_cuda_rng_tracker().fork():
            b = torch.randn(4)
        return a, b, torch.randn(4)

    a1, b1, c1 = draws()
    a2, b2, c2 = draws()
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and torch.equal(c1, c2), "tracker not deterministic"
    assert not torch.equal(a1, b1), "the forked state did not advance"
    gathered = [torch.empty(4) for _ in range(info.tp_size)]
    dist.all_gather(gathered, a1)
    assert not torch.equal(gathered[0], gathered[1]), "TP ranks must draw different model-parallel streams"


def check_recompute(info) -> None:
    def grads(recompute: bool):
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
        model = cc.build_gpt(info, seed=5, hidden_dropout=0.3, attention_dropout=0.2, **extra)
        model_parallel_cuda_manual_seed(77)
        b = cc.batch(0)
        loss = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"]).float().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    l1, g1 = grads(False)
    l2, g2 = grads(True)
    assert torch.equal(l1, l2), "recompute changed the loss"
    assert all(torch.equal(a, b) for a, b in zip(g1, g2)), "recompute replayed different dropout masks"


def check_schedules(info) -> None:
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    model = cc.build_gpt(info)
    out = forward_backward_no_pipelining(
        forward_step_func=cc.forward_step_fn(), data_iterator=iter([cc.batch(0)]), model=[model],
        num_microbatches=1, seq_length=cc.SEQ, micro_batch_size=cc.MBS, forward_only=False,
    )
    assert len(out) == 1 and torch.isfinite(out[0]["loss"])
    assert all(p.grad is not None for p in model.parameters())


def check_clip(info) -> None:
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    for r, p in zip(ref, params):
        r.grad = p.grad.clone()
    group = dist.new_group([info.rank])  # norm of this rank's grads only
    norm = get_grad_norm_fp32([p.grad for p in params], grad_stats_parallel_group=group)
    clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm=1.0)
    assert abs(norm - float(ref_norm)) < 1e-5, (norm, float(ref_norm))
    for r, p in zip(ref, params):
        torch.testing.assert_close(p.grad, r.grad)
        assert p.grad.type() == "torch.FloatTensor", "the CUDA type name leaked out of the call"


def check_rope(info) -> None:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=False)
    emb = rope(8)
    assert emb.device.type == "cpu" and emb.shape[0] == 8


def check_mappings(info) -> None:
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    x = torch.full((2, 3), float(info.tp_rank))
    y = gather_from_sequence_parallel_region(x)
    assert y.shape == (2 * info.tp_size, 3) and float(y[-1, 0]) == info.tp_size - 1


def check_membuf(info) -> None:
    from megatron.core.utils import GlobalMemoryBuffer

    t = GlobalMemoryBuffer().get_tensor((4, 2), torch.float32, "x")
    assert t.device.type == "cpu" and t.shape == (4, 2)


def check_l2norm(info) -> None:
    from megatron.core.utils import local_multi_tensor_l2_norm

    norm, _ = local_multi_tensor_l2_norm(0, None, [[torch.ones(4), torch.ones(5)]], False)
    assert norm.device.type == "cpu" and abs(float(norm) - 3.0) < 1e-6


CHECKS = [check_rng, check_recompute, check_schedules, check_clip, check_rope, check_mappings, check_membuf, check_l2norm]


def main() -> None:
    args = cc.parse_args()
    info = cc.setup(args.tp, args.pp, args.seed)
    for check in CHECKS:
        check(info)
        dist.barrier()
        if info.rank == 0:
            print(f"OK {check.__name__[len('check_'):]}", flush=True)
    from megatron_prefix.parallel import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()
