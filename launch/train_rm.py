#!/usr/bin/env python3
"""Reward-model training (Bradley-Terry or Plackett-Luce) with prefix sharing.

    torchrun [--nnodes N --nproc-per-node G ...] launch/train_rm.py --config configs/X.yaml [a.b=c ...]

The same runner as launch/train_dpo.py with ``task: rm`` (scalar head, reward at each response's EOS).
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
    sys.exit(main(sys.argv[1:], task="rm"))
