#!/usr/bin/env python3
"""DPO (and SimPO/ORPO/IPO/...) training with prefix sharing.

    torchrun [--nnodes N --nproc-per-node G ...] launch/train_dpo.py --config configs/X.yaml [a.b=c ...]

Also runs as a plain ``python launch/train_dpo.py ...`` (one process). See megatron_prefix.training.runner.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prefix.training.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], task="dpo"))
