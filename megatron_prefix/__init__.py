"""megatron_prefix: prefix-shared preference training (DPO, reward models) for Megatron-core.

The pipeline, in reading order: ``data`` (records -> units -> packed rows) -> ``attention``
(shared-prefix core attention) -> ``model`` (GPTModel with our spec, positions, log-probs) ->
``losses`` -> ``training`` -> ``tools/`` (conversion, planning, plotting).
"""

__version__ = "0.1.0"
