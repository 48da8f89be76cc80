#!/usr/bin/env python3
"""Build a prefix-shared preference dataset from JSONL / JSON / gzip, Parquet or Arrow preference files.

    python tools/build_dataset.py --input FILE [FILE ...] --tokenizer byte|SP.model|HF_DIR --output DIR \\
        [--format auto|pair|transcript|sharegpt|ranked|alpaca|swift] [--field-map chosen=pos,rejected=neg] \\
        [--max-unit-tokens 4096] [--pack-tokens 8192] [--max-responses-per-unit 8] [--workers N] \\
        [--date YYYY-MM-DD] [--image-processor HF_LLAVA_DIR]

Writes DIR/tokens.bin, DIR/index/, DIR/meta.json, DIR/stats.json and DIR/skipped.jsonl (file, line and
reason of every skipped record), then prints the statistics table. Image preference data (TRL's vision
format, LLaVA-style <image> placeholders; docs/vision.md) needs --image-processor: the HF LLaVA model
folder whose image processor settings, image token and tokens per image lay the images out (pass the
same folder as --tokenizer); the preprocessed images go to DIR/images.bin. The same input and options give
byte-identical output, whatever --workers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prefix.data.builder import BuildConfig, build_dataset  # noqa: E402
from megatron_prefix.data.stats import format_stats  # noqa: E402
from megatron_prefix.data.units import UnitConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="preference files (.jsonl/.json, optionally .gz; .parquet; .arrow) or datasets folders",
    )
    ap.add_argument("--tokenizer", required=True, help="'byte', a sentencepiece .model, or a HF tokenizer dir")
    ap.add_argument("--output", required=True, help="dataset directory to write")
    ap.add_argument("--format", default="auto", help="auto (detect from the first record) or a format name")
    ap.add_argument("--field-map", default=None, help="canonical=column pairs, e.g. chosen=pos,rejected=neg")
    ap.add_argument("--max-unit-tokens", type=int, default=UnitConfig.max_unit_tokens)
    ap.add_argument("--max-responses-per-unit", type=int, default=UnitConfig.max_responses_per_unit)
    ap.add_argument("--pack-tokens", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument(
        "--date",
        default=None,
        help="YYYY-MM-DD a chat template's strftime_now prints (Llama-3.1 'Today Date'); default: today "
        "(UTC), recorded in meta.json as build.units.template_date; pass it to rebuild identically",
    )
    ap.add_argument(
        "--image-processor",
        default=None,
        metavar="HF_LLAVA_DIR",
        help="HF LLaVA model folder (processor_config.json or preprocessor_config.json, config.json): needed "
        "when records have images; the images are preprocessed with its settings into DIR/images.bin",
    )
    args = ap.parse_args(argv)
    cfg = BuildConfig(
        inputs=args.input,
        tokenizer=args.tokenizer,
        output=args.output,
        format=args.format,
        field_map=args.field_map,
        units=UnitConfig(
            max_unit_tokens=args.max_unit_tokens,
            max_responses_per_unit=args.max_responses_per_unit,
            template_date=args.date,
        ),
        pack_tokens=args.pack_tokens,
        workers=args.workers,
        image_processor=args.image_processor,
    )
    try:
        stats = build_dataset(cfg, log=lambda msg: print(msg, file=sys.stderr))
    except ValueError as err:
        print(f"build_dataset: error: {err}", file=sys.stderr)
        return 2
    print(format_stats(stats))
    print(f"wrote {args.output} (skipped records: {args.output}/skipped.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
