#!/usr/bin/env python3
"""DPO (and SimPO/ORPO/IPO/...) training with prefix sharing.

    torchrun [--nnodes N --nproc-per-node G ...] launch/train_dpo.py --config configs/X.yaml [a.b=c ...]

Also runs as a plain ``python launch/train_dpo.py ...`` (one process). See megatron_prefix.training.runner.
"""

import sys
import warnings
from pathlib import Path

# megatron-core warns at import that apex / Transformer Engine are absent (expected on CPU): say it once
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(not installed|Falling back).*")
warnings.filterwarnings("ignore", message=r".*cuda_graph_scope.*")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prefix.training.cli import main  # noqa: E402 - parses the recipe before megatron is imported

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], task="dpo"))
