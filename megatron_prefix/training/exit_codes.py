"""Process exit codes of the training launchers (``launch/train_dpo.py``, ``launch/train_rm.py``).

Scripts and schedulers rely on these numbers (``launch/slurm/*.sbatch`` requeues on ``EXIT_PREEMPTED``),
so they live in one place and are documented in the README.

- ``EXIT_OK`` (0): finished ``train.max_steps``, or stopped at ``train.exit_interval`` as asked.
- ``EXIT_USER_ERROR`` (2): a config or input error, reported before any training step.
- ``EXIT_NONFINITE`` (3): a NaN/inf loss or grad norm stopped the run; the last good checkpoint is kept.
- ``EXIT_PREEMPTED`` (75, ``EX_TEMPFAIL``): SIGTERM/SIGUSR1 arrived, the state was saved, the run is not
  finished: requeue or rerun the same command to resume. ``train && convert`` stops here on purpose.
"""

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75
