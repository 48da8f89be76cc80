"""The unshared reference: each ``[prompt + response]`` run alone through a stock causal model.

Used by ``tools/verify_sharing.py`` and the exactness tests to compare the shared row's log-probs with
what the ordinary duplicated layout gives.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_prefix.data.unit import Unit


def unshared_logps(ref_model: torch.nn.Module, units: Sequence[Unit], tp_group=None) -> torch.Tensor:
    """[R] summed log-prob of every response of ``units`` (unit order, response order), each run alone
    with positions ``0..L-1`` and a plain causal mask. ``ref_model`` returns logits [b, s, V/tp] (megatron's
    stock ``GPTModel``); with ``tp_group`` the vocabulary shards are gathered (a test-size reference)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    device = next(ref_model.parameters()).device
    out = []
    for u in units:
        p = u.prompt_len
        for i in range(u.k):
            seq = torch.from_numpy(u.unshared_sequence(i)).long().to(device)[None]
            n = seq.shape[1]
            causal_mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), 1)[None, None]  # True = masked
            logits_bsv = ref_model(seq, torch.arange(n, device=device)[None], causal_mask)
            if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
                logits_bsv = gather_from_tensor_model_parallel_region(logits_bsv, group=tp_group)
            logp = torch.log_softmax(logits_bsv[0].float(), dim=-1)
            out.append(logp[p - 1 : n - 1].gather(1, seq[0, p:, None]).sum())
    return torch.stack(out)
