#!/usr/bin/env python3
"""Check that prefix sharing is exact for a model: shared rows vs each ``[prompt + response]`` alone.

    python tools/verify_sharing.py --model CONFIG.yaml|HF_DIR|CKPT_DIR [--data BUILT_DATASET_DIR | --synthetic N]
        [--units N] [--backend dense|flex|varlen] [--tp N] [--tolerance X] [--rtol R] [--token-tol T]
        [--dtype float32] [--pack-tokens T] [--seed S] [--control none|positions|mask]

For every response of the first ``--units`` units it computes the summed log-prob twice:

- *shared*: units packed ``[prompt, r1, ..., rK]`` into rows (``megatron_prefix.data.row.pack_row``),
  ``SharedPrefixGPTModel`` with the chosen attention backend, ``model.logprobs.response_logprobs``;
- *alone*: megatron's stock ``GPTModel`` (same weights, stock causal attention, stock RoPE over
  ``0..L-1``) on ``prompt + response`` by itself, ``log_softmax`` over the full vocabulary;
  for a vision-language model (``--model HF_LLAVA_DIR``, an image dataset): transformers'
  ``LlavaForConditionalGeneration`` itself (fp32, eager attention) on ``[prompt with its images +
  response]`` alone, its own image processor output as stored in the dataset (``Unit.images``);
  the shared side is ``SharedPrefixLLaVAModel`` (the converted weights) on the packed rows, every image
  encoded once per unit;

and prints the max absolute, relative and per-token differences and PASS/FAIL (exit code 1 on FAIL; 2 on
a usage error). A response agrees when any of these holds: ``|shared - alone| <= --tolerance`` (absolute),
``<= --rtol * |alone|`` (relative: summed log-probs in the thousands differ by ~1e-3 in fp32 from the
accumulation order alone), or ``|shared - alone| / tokens <= --token-tol`` (mean per token); each
defaults by ``--dtype``, and 0 turns a criterion off. PASS when every response agrees.
In bfloat16 the defaults are loose (they absorb bf16 rounding of summed log-probs), loose enough that a
negative control can PASS on a small model (measured: ``--control mask`` 7.9e-3, ``--control image``
0.17 under the 0.25 absolute tolerance): prove exactness in float32; use bf16 to bound the bf16 error.

Weights: ``--model`` a megatron checkpoint (a run dir with ``latest`` or an ``iter_*`` dir, as
``tools/convert_hf_to_mcore.py`` or training write them) or a Hugging Face folder with ``*.safetensors``
(converted to a temporary checkpoint with the project's converter) loads those real weights; a model
config (YAML, ``config.json``, an HF folder without weights) gets random weights (seeded, megatron's init
with ``init_method_std``; the vocabulary is widened to cover the data). ``--tp N`` > 1 relaunches itself under ``torchrun`` with N processes. ``--control``
breaks the shared side on purpose (stock positions 0..T-1, responses seeing each other, or ``image``:
every unit's images given to the next unit that has images, rotated over the checked units) to show the
check detects it (expect FAIL). On CPU the flex/varlen backends run their forward-only reference paths.

Vision-language models: ``--model`` an HF LLaVA folder (``model_type: llava``) compares with transformers
itself; a megatron checkpoint of a LLaVA is exported to a temporary HF folder first (in the launching
process, ``tools/convert_mcore_to_hf.py``'s converter). fp32 tolerance: the text defaults (relative 1e-5
of the summed log-prob, or 1e-5 per token, or 1e-4 absolute). Measured on the tiny test LLaVA (24 units,
25 images, 48 responses, summed log-probs up to 126): at most 1.9e-7 relative (1.9e-5 absolute) at TP=1,
1.4e-7 at TP=2; ``--control mask`` moves them by up to 4e-3 relative and ``--control image`` by 6e-3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prefix.model.llava_alone import (  # the LLaVA side of the check
    export_for_alone,
    hf_alone_logps,
    is_hf_llava,
    mcore_llava,
    require_transformers,
    rotate_images,
)

DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.05}
DEFAULT_RTOL = {"float32": 1e-5, "bfloat16": 2e-4, "float16": 1e-4}
DEFAULT_TOKEN_TOL = {"float32": 1e-5, "bfloat16": 1e-3, "float16": 5e-4}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="real weights: a megatron checkpoint dir or a HF folder with *.safetensors; "
                         "random weights: a ModelConfig YAML or a HF config.json")
    ap.add_argument("--data", help="a dataset directory written by tools/build_dataset.py")
    ap.add_argument("--synthetic", type=int, default=0, help="use N random units instead of --data")
    ap.add_argument("--units", type=int, default=16, help="how many units to check (default 16)")
    ap.add_argument("--backend", default="dense", help="attention backend: dense, flex or varlen")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size (relaunches under torchrun)")
    ap.add_argument("--tolerance", type=float, default=None, help="max abs log-prob difference for PASS")
    ap.add_argument("--rtol", type=float, default=None,
                    help="or max relative difference |shared - alone| / |alone| (default by --dtype; 0: off)")
    ap.add_argument("--token-tol", type=float, default=None,
                    help="or max mean abs difference per response token (default by --dtype; 0: off)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DEFAULT_TOLERANCE))
    ap.add_argument("--pack-tokens", type=int, default=0, help="row length (default: fits the longest unit)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--hf-alone", default=None, help=argparse.SUPPRESS)  # set by the --tp relaunch (see main)
    ap.add_argument("--control", default="none", choices=("none", "positions", "mask", "image"),
                    help="break the shared side on purpose (expect FAIL): stock positions, responses seeing "
                         "each other, or images given to the wrong unit")
    args = ap.parse_args(argv)
    if not args.data and args.synthetic <= 0:
        ap.error("give --data DIR or --synthetic N")
    if args.units <= 0 or args.tp <= 0:
        ap.error("--units and --tp must be positive")
    if args.tolerance is None:
        args.tolerance = DEFAULT_TOLERANCE[args.dtype]
    if args.rtol is None:
        args.rtol = DEFAULT_RTOL[args.dtype]
    if args.token_tol is None:
        args.token_tol = DEFAULT_TOKEN_TOL[args.dtype]
    if min(args.tolerance, args.rtol, args.token_tol) < 0:
        ap.error("--tolerance, --rtol and --token-tol must be >= 0")
    return args


def _relaunch_under_torchrun(tp: int, argv: list[str]) -> int:
    """Run this script with ``tp`` processes (torch.distributed.run) and return its exit code."""
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={port}", str(Path(__file__).resolve()), *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(cmd, env=env, check=False).returncode


def check_tp(args) -> None:
    """Refuse a ``--tp`` the model's shape cannot split (``ValueError`` naming the field), before relaunching.

    Only where the config reads without weights (a YAML, an HF folder); a megatron checkpoint is checked
    by every rank after the relaunch."""
    from megatron_prefix.model.config import ModelConfig

    try:
        cfg = ModelConfig.load(args.model)
    except (ValueError, OSError, KeyError, TypeError):
        return
    try:
        cfg.validate(tp=args.tp)
    except ValueError as err:
        raise ValueError(f"--tp {args.tp}: {err}") from err


def load_units(args, vocab_size: int):
    """(units, pad_id, vocab needed) from --data or --synthetic."""
    import numpy as np

    from megatron_prefix.data.unit import Unit

    if args.data:
        from megatron_prefix.data.dataset import PreferenceDataset

        ds = PreferenceDataset(args.data)
        n = min(args.units, len(ds))
        units = ds.units(range(n))
        return units, ds.pad_id, int(ds.tokenizer_info["vocab_size"])
    rng = np.random.default_rng(args.seed)
    units = []
    for i in range(min(args.units, args.synthetic)):
        k = int(rng.integers(2, 5))
        units.append(Unit(rng.integers(1, vocab_size, rng.integers(4, 24)),
                          [rng.integers(1, vocab_size, rng.integers(1, 16)) for _ in range(k)],
                          np.zeros(k), unit_id=i))
    return units, 0, vocab_size


def pack_greedy(units, pack_tokens: int, pad_id: int):
    """Rows of consecutive units, each row filled until the next unit does not fit."""
    from megatron_prefix.data.row import pack_row

    rows, current, used = [], [], 0
    for u in units:
        if current and used + u.shared_len > pack_tokens:
            rows.append(pack_row(current, pack_tokens, pad_id))
            current, used = [], 0
        current.append(u)
        used += u.shared_len
    if current:
        rows.append(pack_row(current, pack_tokens, pad_id))
    return rows


def shared_logps(model, rows, control: str, tp_group):
    """Per-response log-probs from the shared rows (one row per forward), in unit/response order."""
    import torch

    from megatron_prefix.model.batch import MicroBatch
    from megatron_prefix.model.logprobs import response_logprobs

    out = []
    for row in rows:
        mb = MicroBatch.for_this_rank([row])
        if control == "positions":
            mb.position_ids = torch.arange(row.pack_tokens, device=mb.tokens.device)[None]
        elif control == "mask":
            seg = mb.params.segment_ids
            mb.params.segment_ids = torch.where(seg > 0, torch.ones_like(seg), seg)
        logits_sbv = mb.forward(model)
        out.append(response_logprobs(logits_sbv, mb.index, tp_group=tp_group).logps)
    return torch.cat(out)


def alone_folder(args, source) -> Path | None:
    """The HF LLaVA folder of the alone side; None for a text model (megatron's stock GPTModel)."""
    if source is None or getattr(source.model, "vision", None) is None:
        return None
    if args.hf_alone:
        return Path(args.hf_alone)
    if is_hf_llava(args.model):
        return Path(args.model)
    raise ValueError(f"--model: {args.model} is a vision-language checkpoint; run without torchrun (the tool "
                     "exports it to HF for the alone side itself)")


def judge(shared, alone, num_tokens, args) -> tuple[bool, dict]:
    """PASS when every response agrees by one of the tolerances; also the worst differences."""
    abs_diff = (shared - alone).abs()
    rel_diff = abs_diff / alone.abs().clamp(min=1e-6)
    tok_diff = abs_diff / num_tokens.clamp(min=1).to(abs_diff.dtype)
    agree = abs_diff <= args.tolerance
    if args.rtol > 0:
        agree |= rel_diff <= args.rtol
    if args.token_tol > 0:
        agree |= tok_diff <= args.token_tol
    return bool(agree.all()), {"abs": abs_diff, "rel": rel_diff, "tok": tok_diff, "failing": int((~agree).sum())}


def run(args) -> int:
    """Load the model and the units, compare shared with alone, print the verdict; exit code."""
    from megatron_prefix.model.config import ModelConfig
    from megatron_prefix.parallel import init_parallel
    from megatron_prefix.training.weights import is_hf_folder

    info = init_parallel(args.tp, 1, 1, seed=args.seed)
    if args.data and is_hf_folder(args.model):  # the dataset/model image check before a long conversion
        check_images(args, ModelConfig.load(args.model))
    sources: list = []
    try:
        return _run(args, info, sources)
    finally:  # a conversion made for this run never outlives it, even on an error
        for source in sources:
            if source.temp_dir is not None and info.rank == 0:
                shutil.rmtree(source.temp_dir, ignore_errors=True)


def check_images(args, cfg) -> None:
    """Refuse an image dataset the model cannot read (``training.image_checks``), naming both."""
    if getattr(cfg, "vision", None) is None:
        return
    from megatron_prefix.data.dataset import PreferenceDataset
    from megatron_prefix.training.image_checks import check_dataset_images

    check_dataset_images(PreferenceDataset(args.data).meta, cfg.vision, args.data, f"--model {args.model}")


def _run(args, info, sources: list) -> int:
    """The check itself (``run``); appends the weights it opens to ``sources`` for their cleanup."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_prefix.attention.backends import AttentionConfig
    from megatron_prefix.model.config import ModelConfig
    from megatron_prefix.model.spec import build_model, build_reference_model
    from megatron_prefix.model.unshared import unshared_logps
    from megatron_prefix.training.weights import is_hf_folder, load_weights, open_weights, resolve

    say = print if info.rank == 0 else (lambda *a, **k: None)
    source = None
    if Path(args.model).is_dir() and (resolve(args.model) is not None or is_hf_folder(args.model)):
        source = open_weights(args.model, args.tp, flag="--model")
        sources.append(source)
        if source.task == "rm":
            raise ValueError(f"--model: {source.path} is a reward model (scalar head); verify_sharing compares "
                             "log-probs of a language model")
        cfg = source.model
    else:
        cfg = ModelConfig.load(args.model)
    units, pad_id, data_vocab = load_units(args, cfg.vocab_size)
    if not units:
        say("verify_sharing: no units to check")
        return 2
    n_images = sum(len(u.images) for u in units if getattr(u, "images", None) is not None)
    if n_images and getattr(cfg, "vision", None) is None:
        raise ValueError(f"--data: {args.data} holds images but --model {args.model} is a text model (no vision "
                         "encoder); give the HF LLaVA folder the dataset was built for")
    if args.data:
        check_images(args, cfg)
    if args.control == "image" and getattr(cfg, "vision", None) is None:
        raise ValueError("--control image: needs a vision-language --model and an image --data")
    shared_units = rotate_images(units) if args.control == "image" else units
    if source is None and data_vocab > cfg.vocab_size:  # random weights: widen the vocabulary to cover the data
        step = 8 * args.tp
        cfg.vocab_size = -(-data_vocab // step) * step
    top = max(int(max(u.tokens().max() for u in units)), pad_id)
    if top >= cfg.vocab_size:
        say(f"verify_sharing: token id {top} of {args.data or 'the data'} >= model.vocab_size {cfg.vocab_size} "
            f"of {args.model}; build the dataset with the model's tokenizer")
        return 2
    pack_tokens = args.pack_tokens or -(-max(u.shared_len for u in units) // 64) * 64
    rows = pack_greedy(shared_units, pack_tokens, pad_id)

    attention = AttentionConfig(backend=args.backend, allow_cpu_reference=not torch.cuda.is_available())
    model = build_model(cfg, attention, dtype=args.dtype).eval()
    hf_dir = alone_folder(args, source)
    if source is not None:
        load_weights(model, source.path)
        source.cleanup()
    tp_group = ps.get_tensor_model_parallel_group()
    with torch.no_grad():
        shared = shared_logps(model, rows, args.control, tp_group).cpu().double()
        if hf_dir is not None:  # a vision-language model: transformers' own LLaVA is the alone side
            from transformers import LlavaForConditionalGeneration

            hf = LlavaForConditionalGeneration.from_pretrained(str(hf_dir), dtype=getattr(torch, args.dtype),
                                                               attn_implementation="eager").eval()
            alone = hf_alone_logps(hf, units).cpu().double()
            alone_what = f"transformers {type(hf).__name__} ({n_images} images)"
        else:
            ref = build_reference_model(cfg, dtype=args.dtype).eval()
            ref.load_state_dict(model.state_dict())
            alone = unshared_logps(ref, units, tp_group).cpu().double()
            alone_what = "megatron GPTModel"
    num_tokens = torch.tensor([len(r) for u in units for r in u.response_ids])
    ok, d = judge(shared, alone, num_tokens, args)
    weights = f"weights {source.path}" if source is not None else "random weights"
    say(f"verify_sharing: model={args.model} ({cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}, {weights}) backend={args.backend} tp={args.tp} dtype={args.dtype} "
        f"control={args.control}")
    say(f"  {len(units)} units, {len(alone)} responses ({int(num_tokens.sum())} tokens), {len(rows)} rows x "
        f"{pack_tokens} tokens; alone: {alone_what}; |logp_alone| up to {alone.abs().max():.1f}")
    worst = int(d["abs"].argmax())
    say(f"  max |logp_shared - logp_alone| = {d['abs'].max():.3e} (response {worst}: shared {shared[worst]:.6f}, "
        f"alone {alone[worst]:.6f})")
    say(f"  max relative difference        = {d['rel'].max():.3e}")
    say(f"  max mean difference per token  = {d['tok'].max():.3e}")
    verdict = "PASS" if ok else f"FAIL ({d['failing']} of {len(alone)} responses outside every tolerance)"
    say(f"{verdict} (tolerance {args.tolerance:g}, rtol {args.rtol:g}, token-tol {args.token_tol:g})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    temp = None
    try:
        if is_hf_llava(args.model) or mcore_llava(args.model) is not None:
            require_transformers()
        if "WORLD_SIZE" not in os.environ and not args.hf_alone and (ckpt := mcore_llava(args.model)) is not None:
            temp = export_for_alone(ckpt)  # a megatron LLaVA: transformers needs an HF folder (one process)
            argv, args.hf_alone = [*argv, "--hf-alone", str(temp)], str(temp)
        if args.tp > 1 and "WORLD_SIZE" not in os.environ:
            check_tp(args)  # once, here, rather than once per rank under torchrun
            return _relaunch_under_torchrun(args.tp, argv)
        return run(args)
    except ValueError as err:
        print(f"verify_sharing: error: {err}", file=sys.stderr)
        return 2
    finally:
        if temp is not None:
            import shutil

            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
