"""Fit planning: per-rank memory, FLOPs and step time of a training layout, before a job is queued.

Pure arithmetic (no torch, no megatron): ``params`` counts per-rank parameters exactly as megatron-core
shards them, ``memory`` adds gradients, optimizer state, activations and the logits / reference buffers,
``flops`` turns a dataset's ``stats.json`` into FLOPs, step time, pairs/s and GPU-hours, and ``search``
ties it together (``make_plan``, ``search_layouts``, ``check_fit``). ``tools/plan.py`` is the command.
"""
