#!/usr/bin/env python3
"""Quantize an exported Hugging Face policy with nvidia-modelopt, for TensorRT-LLM and vLLM.

    python tools/quantize.py --hf HF_DIR --out OUT --format fp8|int4_awq|nvfp4 [--calib DATASET_DIR]
        [--calib-units 128] [--calib-tokens 512]

HF_DIR is a ``*ForCausalLM`` checkpoint (e.g. written by tools/convert_mcore_to_hf.py). The model is
quantized with modelopt's Hugging Face path (``mtq.quantize`` with ``FP8_DEFAULT_CFG``, ``INT4_AWQ_CFG``
or ``NVFP4_DEFAULT_CFG``), calibrated by a forward loop over the dataset's prompts (a folder written by
tools/build_dataset.py with the model's tokenizer; each prompt followed by its first response, at most
``--calib-tokens`` tokens, ``--calib-units`` units spread over the dataset), and exported with
``modelopt.torch.export.export_hf_checkpoint``: ``config.json`` with ``quantization_config``,
``hf_quant_config.json``, safetensors with quantized weights and their scales (the layout TensorRT-LLM's
and vLLM's ``modelopt`` loaders read), plus the tokenizer files of HF_DIR.

Without ``--calib`` the activation ranges come from random token ids (a warning says so): fine for a
smoke test, not for serving. ``nvfp4`` needs CUDA (modelopt's dynamic block quantization). Install the
optional dependency with ``pip install '.[quantize]'``. Exit 2 on bad input, with the reason.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMATS = {"fp8": "FP8_DEFAULT_CFG", "int4_awq": "INT4_AWQ_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}
CUDA_ONLY = {"nvfp4": "modelopt's NVFP4 dynamic block quantization asserts CUDA tensors"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


class QuantizeError(ValueError):
    """A user's mistake or a missing capability: printed without a traceback, exit 2."""


def require_modelopt():
    """``modelopt.torch.quantization`` and ``export_hf_checkpoint``, or a clear error."""
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    except ImportError as err:
        raise QuantizeError(f"nvidia-modelopt is not installed ({err}); pip install '.[quantize]'") from err
    return mtq, export_hf_checkpoint


def calibration_batches(calib: str | None, vocab_size: int, units: int, tokens: int, seed: int = 0) -> list:
    """[1, T] int64 token-id tensors: the dataset's prompts (+ first response), or random ids without one."""
    if calib is None:
        print("quantize: warning: no --calib; calibrating on random token ids (pass the dataset for serving)",
              file=sys.stderr)
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab_size, (1, tokens), generator=g) for _ in range(min(units, 16))]
    from megatron_prefix.data.dataset import PreferenceDataset

    if not (Path(calib) / "meta.json").is_file():
        raise QuantizeError(f"--calib {calib}: not a dataset folder (no meta.json); build it with "
                            "tools/build_dataset.py and the model's tokenizer")
    ds = PreferenceDataset(calib)
    data_vocab = int(ds.tokenizer_info["vocab_size"])
    if data_vocab > vocab_size:
        raise QuantizeError(f"--calib {calib}: its tokenizer has {data_vocab} ids but the model {vocab_size}; "
                            "build the dataset with the model's tokenizer")
    ids = np.linspace(0, len(ds) - 1, num=min(units, len(ds))).round().astype(int)
    out = []
    for i in sorted(set(ids.tolist())):
        u = ds.get_unit(i)
        seq = np.concatenate([u.prompt_ids, u.response_ids[0]])[:tokens]
        out.append(torch.from_numpy(seq.astype(np.int64))[None])
    return out


def load_policy(hf_dir: str, device: str):
    """(model, config dict) of a ``*ForCausalLM`` checkpoint, fp32 on CPU and bf16 on CUDA."""
    src = Path(hf_dir)
    if not (src / "config.json").is_file():
        raise QuantizeError(f"--hf {hf_dir}: no config.json; export the policy with tools/convert_mcore_to_hf.py")
    config = json.loads((src / "config.json").read_text())
    if not any(a.endswith("ForCausalLM") for a in config.get("architectures") or []):
        raise QuantizeError(f"--hf {hf_dir}: architectures {config.get('architectures')}: only *ForCausalLM "
                            "policies are quantized (reward models are not served this way)")
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype).to(device).eval(), config


def quantize_model(model, fmt: str, batches: list, device: str):
    """``mtq.quantize`` with the format's default config, calibrated on ``batches`` (in place; returned)."""
    mtq, _ = require_modelopt()

    def forward_loop(m) -> None:
        with torch.no_grad():
            for ids in batches:
                m(ids.to(device))

    return mtq.quantize(model, getattr(mtq, FORMATS[fmt]), forward_loop)


def export(model, hf_dir: str, out_dir: str) -> dict:
    """``export_hf_checkpoint`` plus HF_DIR's tokenizer files; returns the ``quantization_config``."""
    _, export_hf_checkpoint = require_modelopt()
    src, out = Path(hf_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=str(out))
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)
    qcfg = json.loads((out / "config.json").read_text()).get("quantization_config")
    if not qcfg or not list(out.glob("*.safetensors")):
        raise QuantizeError(f"{out}: the export is incomplete (no quantization_config or no safetensors)")
    return qcfg


def quantize(hf_dir: str, out_dir: str, fmt: str, calib: str | None = None, calib_units: int = 128,
             calib_tokens: int = 512, device: str | None = None) -> dict:
    """Quantize ``hf_dir`` to ``fmt`` and export it to ``out_dir``; returns the exported quantization_config."""
    if fmt not in FORMATS:
        raise QuantizeError(f"--format: one of {sorted(FORMATS)}, got {fmt!r}")
    require_modelopt()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if fmt in CUDA_ONLY and device != "cuda":
        raise QuantizeError(f"--format {fmt}: needs CUDA ({CUDA_ONLY[fmt]}); run it on a GPU")
    model, config = load_policy(hf_dir, device)
    batches = calibration_batches(calib, int(config["vocab_size"]), calib_units, calib_tokens)
    return export(quantize_model(model, fmt, batches, device), hf_dir, out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="quantize.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="exported Hugging Face policy folder")
    ap.add_argument("--out", required=True, help="output folder for the quantized checkpoint")
    ap.add_argument("--format", required=True, choices=sorted(FORMATS))
    ap.add_argument("--calib", help="dataset folder (tools/build_dataset.py, the model's tokenizer)")
    ap.add_argument("--calib-units", type=int, default=128, help="units used for calibration (default 128)")
    ap.add_argument("--calib-tokens", type=int, default=512, help="tokens per calibration sequence (default 512)")
    args = ap.parse_args(argv)
    try:
        qcfg = quantize(args.hf, args.out, args.format, args.calib, args.calib_units, args.calib_tokens)
    except QuantizeError as err:
        print(f"quantize.py: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: quant_algo={qcfg.get('quant_algo')}, excluded {qcfg.get('ignore')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
