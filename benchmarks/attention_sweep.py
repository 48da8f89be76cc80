#!/usr/bin/env python3
"""Attention sweep: each shared-prefix backend against plain causal attention on the duplicated layout.

    python3 benchmarks/attention_sweep.py --out DIR              # GPU: bf16, fwd+bwd, 4k/16k/32k tokens
    python3 benchmarks/attention_sweep.py --rehearse --out DIR   # the same code path on CPU, tiny, fp32

Shapes (prompt P, completion C, DPO units of one prompt and 2 completions): the six datasets of the
prefix-sharing paper (median length L and prompt:completion ratio r, read as P = L*r/(1+r),
C = L/(1+r)) and every file in ../shared/data (median prompt and response lengths of its units, byte
tokenizer; missing files are skipped). For each row size T, the units that fill one shared row of T
tokens are timed (forward + backward where the backend can) with every backend the registry allows on
this device/dtype (``attention.registry.check``), and the *same* units in the duplicated layout
``[prompt + r_i]`` with plain causal attention (``torch.nn.attention.varlen`` / flash-attn varlen on
CUDA in bf16, else batched causal SDPA; all duplicated sequences have one length). Each measured
``time_ratio`` = unshared time / shared time is printed beside ``ideal_pair_ratio`` = unshared / shared
attention pairs counted by ``megatron_prefix.sharing``. Writes ``DIR/attention_sweep.json`` and
``DIR/attention_sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_prefix import sharing
from megatron_prefix.attention import registry
from megatron_prefix.attention.backends import AttentionConfig
from megatron_prefix.attention.params import SharedPrefixParams
from megatron_prefix.data.row import pack_row
from megatron_prefix.data.unit import Unit

# name: (median length, prompt:completion ratio), from the prefix-sharing paper's dataset table
PAPER = {
    "Capybara": (1160, 1.59),
    "HH": (186, 2.15),
    "MetaMath": (872, 3.91),
    "TLDR": (416, 11.14),
    "Tulu-Helpsteer": (775, 6.34),
    "UltraFeedback": (409, 0.42),
}
import os

# ../shared/data beside the checkout (as tests/conftest.py), or $MEGATRON_PREFIX_SHARED_DATA, or ./shared/data
DATA_CANDIDATES = [Path(p) for p in (os.environ.get("MEGATRON_PREFIX_SHARED_DATA"),) if p] + [
    ROOT.parent / "shared" / "data", ROOT / "shared" / "data"]
GPU = {"tokens": [4096, 16384, 32768], "heads": 32, "groups": 8, "head_dim": 64, "warmup": 3, "reps": 10}
REHEARSE = {"tokens": [256], "heads": 4, "groups": 2, "head_dim": 16, "warmup": 1, "reps": 1}
REF_TOKENS = 4096  # lengths are scaled by tokens / REF_TOKENS in rehearsal so that units still fit


def paper_shapes() -> list[dict]:
    """P and C of the paper's datasets."""
    out = []
    for name, (length, ratio) in PAPER.items():
        c = length / (1 + ratio)
        out.append({"dataset": name, "source": "paper", "median_len": length, "prompt_completion_ratio": ratio,
                    "prompt_len": round(length - c), "completion_len": max(1, round(c))})
    return out


def file_shapes(folder: Path, max_records: int = 400) -> list[dict]:
    """Median prompt / response lengths (byte tokenizer) of the files in ``folder``; absent files skipped."""
    from megatron_prefix.data.readers import open_records
    from megatron_prefix.data.records import PreferenceRecord, SkipRecord
    from megatron_prefix.data.tokenizers import ByteTokenizer
    from megatron_prefix.data.units import UnitBuilder

    out = []
    for path in sorted(folder.glob("*.json*")) if folder.is_dir() else []:
        builder, prompts, responses = UnitBuilder(ByteTokenizer()), [], []
        try:
            for i, rec in enumerate(open_records([path], log=lambda _s: None)):
                if i >= max_records:
                    break
                if not isinstance(rec, PreferenceRecord):
                    continue
                try:
                    units = builder.build(rec)
                except SkipRecord:  # a skipped record (too long, no preference...): not a shape
                    continue
                for u in units:
                    prompts.append(u.prompt_len)
                    responses += u.response_lens.tolist()
        except ValueError as err:
            print(f"skip {path.name}: {err}", flush=True)
            continue
        if not prompts:
            continue
        p, c = float(np.median(prompts)), float(np.median(responses))
        out.append({"dataset": path.name.split(".")[0], "source": "file", "median_len": p + c,
                    "prompt_completion_ratio": round(p / c, 3), "prompt_len": round(p), "completion_len": round(c),
                    "records": min(i + 1, max_records)})
    return out


def units_for(shape: dict, tokens: int, scale: float) -> list[Unit]:
    """As many (prompt, 2 completions) units as fill one shared row of ``tokens``."""
    p = max(1, round(shape["prompt_len"] * scale))
    c = max(1, round(shape["completion_len"] * scale))
    n = max(1, tokens // (p + 2 * c))
    if p + 2 * c > tokens:  # one unit does not fit: shrink it proportionally
        f = tokens / (p + 2 * c)
        p, c = max(1, int(p * f)), max(1, int(c * f) - 1)
    ones = np.ones
    return [Unit(ones(p, np.int32), [ones(c, np.int32), ones(c, np.int32)], np.array([1.0, 0.0]), i) for i in range(n)]


def _time(fn, warmup: int, reps: int, cuda: bool) -> float:
    """Median seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _leaf(shape, device, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()


def baseline_fn(units: list[Unit], h: int, g: int, d: int, device, dtype, backward: bool, gen):
    """Plain causal attention over the duplicated sequences ``[prompt + r_i]``; returns (fn, kernel name)."""
    from megatron_prefix.attention import varlen

    lens = [u.prompt_len + int(n) for u in units for n in u.response_lens]
    total, scale = sum(lens), 1.0 / math.sqrt(d)
    q, k, v = _leaf((total, h, d), device, dtype, gen), _leaf((total, g, d), device, dtype, gen), None
    v = _leaf((total, g, d), device, dtype, gen)
    tv = varlen._kernel_torch() if device.type == "cuda" and dtype != torch.float32 else None
    if tv is not None:
        cu = torch.tensor(np.r_[0, np.cumsum(lens)], dtype=torch.int32, device=device)
        call = varlen.torch_varlen_adapter(tv)

        def attn():
            return call(q, k, v, cu, cu, max(lens), max(lens), scale)

        name = "torch_varlen_attn"
    else:  # every duplicated sequence has the same length: one batched causal SDPA
        n, length = len(lens), lens[0]
        assert all(x == length for x in lens)

        def attn():
            qb = q.view(n, length, h, d).transpose(1, 2)
            kb, vb = (x.view(n, length, g, d).transpose(1, 2) for x in (k, v))
            return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=g != h)

        name = "sdpa_causal_batched"

    def step():
        out = attn()
        if backward:
            out.float().sum().backward()

    return step, name


def shared_fn(name: str, units, tokens, h, g, d, device, dtype, backward: bool, gen, rehearse: bool):
    """One shared row through backend ``name`` (registry): returns (step fn, prepare seconds)."""
    cfg = AttentionConfig(backend=name, max_dense_tokens=tokens, allow_cpu_reference=rehearse,
                          flex_block_size=16 if rehearse else 128)
    backend = registry.make(cfg)
    params = SharedPrefixParams.from_rows([pack_row(units, tokens, 0)], device=device)
    t0 = time.perf_counter()
    plan = backend.prepare(params, registry.CPSlice(1, 0, device))
    prepare_s = time.perf_counter() - t0
    q = _leaf((tokens, 1, h, d), device, dtype, gen)
    k, v = _leaf((tokens, 1, g, d), device, dtype, gen), _leaf((tokens, 1, g, d), device, dtype, gen)

    def step():
        if backward:
            backend.attend(q, k, v, plan, 1.0 / math.sqrt(d)).float().sum().backward()
        else:
            with torch.no_grad():
                backend.attend(q, k, v, plan, 1.0 / math.sqrt(d))

    return step, prepare_s


def sweep(rehearse: bool, out_dir: Path) -> dict:
    """Run the sweep; returns the JSON document."""
    cuda = torch.cuda.is_available() and not rehearse
    device = torch.device("cuda" if cuda else "cpu")
    dev_name, dtype_name = device.type, ("bfloat16" if cuda else "float32")
    dtype = getattr(torch, dtype_name)
    conf = REHEARSE if rehearse else GPU
    h, g, d = conf["heads"], conf["groups"], conf["head_dim"]
    folder = next((p for p in DATA_CANDIDATES if p.is_dir()), None)
    shapes = paper_shapes() + (file_shapes(folder, max_records=40 if rehearse else 400) if folder else [])
    if folder is None:
        print(f"no data folder among {[str(p) for p in DATA_CANDIDATES]}: paper shapes only", flush=True)
    gen = torch.Generator().manual_seed(0)
    results = []
    for tokens in conf["tokens"]:
        scale = tokens / REF_TOKENS if rehearse else 1.0
        for shape in shapes:
            units = units_for(shape, tokens, scale)
            resp = [[int(n) for n in u.response_lens] for u in units]
            shared_pairs = sum(sharing.shared_pairs(u.prompt_len, r) for u, r in zip(units, resp))
            unshared_pairs = sum(sharing.unshared_pairs(u.prompt_len, r) for u, r in zip(units, resp))
            base = {**shape, "tokens": tokens, "units": len(units), "prompt_len_used": units[0].prompt_len,
                    "completion_len_used": resp[0][0], "shared_tokens": sum(u.shared_len for u in units),
                    "unshared_tokens": sum(u.unshared_len for u in units),
                    "shared_pairs": shared_pairs, "unshared_pairs": unshared_pairs,
                    "ideal_pair_ratio": round(unshared_pairs / shared_pairs, 4)}
            base["ideal_token_ratio"] = round(base["unshared_tokens"] / base["shared_tokens"], 4)
            for name in registry.names():
                cfg = AttentionConfig(backend=name, allow_cpu_reference=rehearse)
                rec = {**base, "backend": name}
                try:
                    registry.check(cfg, device=dev_name, dtype=dtype_name, backward=False)
                except ValueError as err:
                    results.append({**rec, "status": f"skipped: {err}"})
                    continue
                backward = True
                try:
                    registry.check(cfg, device=dev_name, dtype=dtype_name, backward=True)
                except ValueError:
                    backward = False  # forward-only CPU reference (flex on CPU)
                try:
                    s_step, prep = shared_fn(name, units, tokens, h, g, d, device, dtype, backward, gen, rehearse)
                    u_step, kernel = baseline_fn(units, h, g, d, device, dtype, backward, gen)
                    t_shared = _time(s_step, conf["warmup"], conf["reps"], cuda)
                    t_unshared = _time(u_step, conf["warmup"], conf["reps"], cuda)
                except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as err:
                    results.append({**rec, "status": f"failed: {type(err).__name__}: {str(err)[:300]}"})
                    print(f"{tokens:>6} {shape['dataset']:<28} {name:<7} FAILED {err}", flush=True)
                    if cuda:
                        torch.cuda.empty_cache()
                    continue
                rec.update(status="ok", forward_backward=backward, baseline=kernel, prepare_ms=round(prep * 1e3, 3),
                           shared_ms=round(t_shared * 1e3, 4), unshared_ms=round(t_unshared * 1e3, 4),
                           time_ratio=round(t_unshared / t_shared, 4))
                results.append(rec)
                print(f"{tokens:>6} {shape['dataset']:<28} {name:<7} {'fwd+bwd' if backward else 'fwd':<7} "
                      f"shared {rec['shared_ms']:9.3f} ms  unshared {rec['unshared_ms']:9.3f} ms  "
                      f"time ratio {rec['time_ratio']:6.2f}  ideal (pairs) {rec['ideal_pair_ratio']:6.2f}", flush=True)
    doc = {
        "benchmark": "attention_sweep", "rehearse": rehearse, "device": torch.cuda.get_device_name() if cuda else
        (platform.processor() or platform.machine()), "device_type": dev_name, "dtype": dtype_name,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "heads": h, "kv_heads": g, "head_dim": d,
        "tokens": conf["tokens"], "backends": list(registry.names()), "data_folder": str(folder) if folder else None,
        "results": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention_sweep.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, out_dir / "attention_sweep.png")
    return doc


def plot(doc: dict, path: Path) -> None:
    """Measured vs ideal ratio, one panel per row size, one marker per backend."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {path.name} not written (the JSON has every number)", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = doc["tokens"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.5), squeeze=False)
    for ax, tokens in zip(axes[0], sizes):
        ok = [r for r in doc["results"] if r["tokens"] == tokens and r["status"] == "ok"]
        hi = max([1.0] + [max(r["time_ratio"], r["ideal_pair_ratio"]) for r in ok]) * 1.1
        ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="ideal (pairs)")
        for name in sorted({r["backend"] for r in ok}):
            pts = [r for r in ok if r["backend"] == name]
            ax.scatter([r["ideal_pair_ratio"] for r in pts], [r["time_ratio"] for r in pts], label=name, s=24)
        ax.set(title=f"{tokens} tokens/row, {doc['dtype']}, {doc['device_type']}", xlabel="ideal ratio (pairs)",
               ylabel="measured unshared / shared time", xlim=(0, hi), ylim=(0, hi))
        ax.legend(fontsize=8)
    fig.suptitle(f"shared-prefix attention vs causal attention on the duplicated layout ({doc['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder (attention_sweep.json/.png)")
    ap.add_argument("--rehearse", action="store_true", help="same code path on CPU, tiny sizes, fp32")
    args = ap.parse_args()
    torch.manual_seed(0)
    sweep(args.rehearse, args.out)


if __name__ == "__main__":
    main()
