#!/usr/bin/env python3
"""torchrun worker of the SLURM launcher: ``worker.py {dpo|rm} --config FILE [a.b=c ...]``.

Runs the same training as ``launch/train_dpo.py`` / ``launch/train_rm.py`` in this process, with two
additions for ``launch/slurm/launch.sh``:

- SIGUSR1 / SIGTERM arriving *before* the training loop installs its own handlers (while the model and
  data load) would kill the process by default; here they set the loop's preemption flag instead, so the
  run saves and exits at its first step boundary like a later signal would.
- when the run ends with ``EXIT_PREEMPTED`` (saved, not finished) and ``MP_PREEMPT_DIR`` is set, a marker
  file ``$MP_PREEMPT_DIR/rank<RANK>`` is written: torchrun reports any non-zero worker as its own exit
  code 1, so the batch script needs the marker to tell a saved preemption (requeue) from a failure.
"""

import os
import signal
import sys
import warnings
from pathlib import Path

_EARLY = {"signal": False}


def _early_signal(signum, frame):  # before the training loop's handlers: remember, do not die
    _EARLY["signal"] = True
    if "megatron_prefix.training.runner" in sys.modules:
        sys.modules["megatron_prefix.training.runner"]._Preempted.flag = True


for _sig in (signal.SIGTERM, signal.SIGUSR1):  # first thing: the imports below take seconds
    signal.signal(_sig, _early_signal)

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(not installed|Falling back).*")
warnings.filterwarnings("ignore", message=r".*cuda_graph_scope.*")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_prefix.training import runner
from megatron_prefix.training.exit_codes import EXIT_PREEMPTED, EXIT_USER_ERROR

TASKS = ("dpo", "rm")


def main(argv: list[str]) -> int:
    """Run the task; drop the preemption marker on ``EXIT_PREEMPTED``; return the exit code."""
    if not argv or argv[0] not in TASKS:
        print(f"usage: worker.py {{{'|'.join(TASKS)}}} --config FILE [a.b=c ...]", file=sys.stderr)
        return EXIT_USER_ERROR
    runner._Preempted.flag = runner._Preempted.flag or _EARLY["signal"]
    rc = runner.main(argv[1:], task=argv[0])
    marker_dir = os.environ.get("MP_PREEMPT_DIR")
    if rc == EXIT_PREEMPTED and marker_dir:
        Path(marker_dir).mkdir(parents=True, exist_ok=True)
        (Path(marker_dir) / f"rank{os.environ.get('RANK', '0')}").write_text(f"{EXIT_PREEMPTED}\n")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
