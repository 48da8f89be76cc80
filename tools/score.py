#!/usr/bin/env python3
"""Score every unit of a built dataset with a checkpoint, without training.

    python tools/score.py --ckpt CKPT_OR_HF --data DATASET --out scores.jsonl
        [--units N] [--pack-tokens T] [--backend dense|flex|varlen] [--dtype auto|float32|bfloat16]
        [--no-progress]
    torchrun --nproc-per-node=N tools/score.py ...   (tensor parallel over the N processes)

``--ckpt``: one of our megatron checkpoints (a run dir with ``latest``, or an ``iter_*`` dir: training
output or ``tools/convert_hf_to_mcore.py``'s) or a Hugging Face folder (``config.json`` +
``*.safetensors``, converted to a temporary checkpoint with the project's converter). ``--data``: a
dataset directory written by ``tools/build_dataset.py``.

It runs the forward-only pass of the reference precompute (shared-prefix rows, megatron's schedule,
``training.step.logprob_collector``), so its values are the reference log-probs a DPO run starting from
``--ckpt`` would compute. One JSON line per unit, in unit order::

    {"unit": 0, "record": 12, "prompt_tokens": 160, "response_tokens": [412, 380],
     "preference_scores": [1.0, 0.0], "logps": [-903.1, -851.7]}

``logps``: summed log-prob of each response's tokens given the prompt (a language model checkpoint);
``rewards`` instead for a reward model checkpoint (the scalar head at each response's last token);
``record``: the source record of the unit (its index in the input files, as ``skipped.jsonl`` counts);
``preference_scores``: the dataset's labels (higher is better). Exit 0 on success, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHUNK_UNITS = 256  # units per forward chunk (bounded memory for the rows of one chunk)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="megatron checkpoint (run dir or iter_* dir) or HF folder")
    ap.add_argument("--data", required=True, help="a dataset directory written by tools/build_dataset.py")
    ap.add_argument("--out", required=True, help="JSON-lines file to write (one line per unit)")
    ap.add_argument("--units", type=int, default=0, help="score only the first N units (default: all)")
    ap.add_argument("--pack-tokens", type=int, default=0,
                    help="row length (default: the dataset's build pack_tokens, at least its longest unit)")
    ap.add_argument("--backend", default="dense", help="attention backend: dense, flex or varlen")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.units < 0 or args.pack_tokens < 0:
        ap.error("--units and --pack-tokens must be >= 0")
    return args


def score(args) -> int:
    """Load, score every unit, write ``args.out`` (rank 0). Raises ``ValueError`` on bad input."""
    from functools import partial

    import numpy as np
    import torch
    from tqdm import tqdm

    from megatron_prefix.attention.backends import AttentionConfig
    from megatron_prefix.data.dataset import PreferenceDataset
    from megatron_prefix.parallel import init_parallel, seed_everything
    from megatron_prefix.training.config import TrainConfig
    from megatron_prefix.training.image_checks import check_dataset_images
    from megatron_prefix.training.loader import eval_rows
    from megatron_prefix.training.setup import build_stage
    from megatron_prefix.training.step import (
        StepContext,
        logprob_collector,
        make_microbatches,
        response_positions,
        run_schedule,
    )
    from megatron_prefix.training.weights import load_weights, open_weights

    if not (Path(args.data) / "meta.json").is_file():
        raise ValueError(f"--data: {args.data} is not a dataset built by tools/build_dataset.py (no meta.json)")
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    info = init_parallel(tp, 1, 1)
    rank0 = info.rank == 0
    source = open_weights(args.ckpt, tp, flag="--ckpt", progress=not args.no_progress and rank0)
    ds = PreferenceDataset(args.data)
    n = min(args.units or len(ds), len(ds))
    check_vocab(ds, n, source.model.vocab_size, args)
    check_dataset_images(ds.meta, source.model.vision, args.data, args.ckpt)
    lengths = ds.pack_lengths()[:n]
    pack_tokens = args.pack_tokens or max(int(ds.meta.get("build", {}).get("pack_tokens", 0)),
                                          -(-int(lengths.max()) // 64) * 64)
    if int(lengths.max()) > pack_tokens:
        raise ValueError(f"--pack-tokens: {pack_tokens} is shorter than the longest unit ({int(lengths.max())})")

    cuda = torch.cuda.is_available()
    cfg = TrainConfig(task=source.task, model=source.model)
    cfg.parallel.tp = tp
    cfg.train.dtype = args.dtype
    cfg.attention = AttentionConfig(backend=args.backend, allow_cpu_reference=not cuda)
    cfg.data.pack_tokens = pack_tokens
    model, _ = build_stage(cfg, source.model, cuda, partial(seed_everything, 1234))
    load_weights(model, source.path)
    source.cleanup()
    model.eval()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ctx = StepContext(task=source.task, loss=cfg.loss, device=device, cp_size=1, cp_rank=0, needs_reference=False)

    offsets = np.asarray(ds.store.resp_offsets)
    values = np.full(int(offsets[n]), np.nan)
    bar = tqdm(total=n, desc="scoring", unit="unit", disable=args.no_progress or not rank0)
    for start in range(0, n, CHUNK_UNITS):
        ids = list(range(start, min(start + CHUNK_UNITS, n)))
        mbs = make_microbatches(eval_rows(ds, ids, pack_tokens, 0, 1), ctx)
        store: list[torch.Tensor] = []
        with torch.no_grad():
            run_schedule([model], mbs, partial(logprob_collector, ctx, store), pack_tokens, forward_only=True)
        for mb, vals in zip(mbs, store):
            idx = offsets[mb.resp_unit.cpu().numpy()] + response_positions(mb).numpy()
            values[idx] = vals.double().numpy()
        bar.update(len(ids))
    bar.close()
    assert not np.isnan(values).any(), "every response of the scored units has a value"
    if rank0:
        write_scores(args.out, ds, n, values, "rewards" if source.task == "rm" else "logps")
        print(f"score: wrote {n} units ({len(values)} responses) to {args.out} "
              f"({'rewards' if source.task == 'rm' else 'log-probs'} of {source.path})")
    return 0


def check_vocab(ds, n: int, vocab_size: int, args) -> None:
    """Refuse token ids the model cannot embed, naming the dataset and the checkpoint."""
    top = ds.max_token_id(n)
    if top >= vocab_size:
        raise ValueError(f"--data: {args.data} holds token id {top} but the model of {args.ckpt} has "
                         f"vocab_size {vocab_size}; build the dataset with the model's tokenizer")


def write_scores(path: str, ds, n: int, values, key: str) -> None:
    """One JSON line per unit (see the module docstring)."""
    import numpy as np

    offsets = np.asarray(ds.store.resp_offsets)
    records = np.asarray(ds.store.unit_records)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        for u in range(n):
            unit = ds.get_unit(u)
            line = {"unit": u, "record": int(records[u]), "prompt_tokens": int(unit.prompt_len),
                    "response_tokens": [int(x) for x in unit.response_lens],
                    "preference_scores": [float(x) for x in unit.scores],
                    key: [float(x) for x in values[offsets[u]:offsets[u + 1]]]}
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return score(args)
    except ValueError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"score: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
