"""``cluster.*``: the GPUs a recipe is planned for (``tools/plan.py`` and the launchers' fit check).

Optional: a recipe without it plans with ``--gpus`` / ``--gpu-mem`` (or the launcher's world size and
the GPU it finds). ``gpu_mem_gb`` is GiB per GPU as the recipe targets it; ``fit_check=false`` turns the
launchers' start-up check off (``cluster.fit_check=false`` on the command line).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_prefix.config import require


@dataclass
class ClusterConfig:
    """``cluster.*``: target GPUs, their memory and speed, and the start-up fit check switch."""

    gpus: int | None = None  # total GPUs the recipe is laid out for (None: the launcher's world size)
    gpus_per_node: int = 8  # tensor parallelism stays inside a node
    gpu_mem_gb: float | None = None  # GiB per GPU (None: the GPU found at start-up; on CPU no check)
    peak_tflops: float = 989.0  # dense bf16 TFLOP/s per GPU (H100 SXM)
    mfu: float = 0.4  # assumed model-FLOPs utilisation for the predicted step time
    reserve_gb: float = 3.0  # CUDA context, NCCL buffers, allocator slack (GiB per GPU)
    fit_check: bool = True  # launchers refuse a layout the planner says cannot fit

    def validate(self) -> None:
        require(self.gpus is None or self.gpus >= 1, "cluster.gpus", f"must be >= 1, got {self.gpus}")
        require(self.gpus_per_node >= 1, "cluster.gpus_per_node", f"must be >= 1, got {self.gpus_per_node}")
        require(self.gpu_mem_gb is None or self.gpu_mem_gb > 0, "cluster.gpu_mem_gb",
                f"must be positive, got {self.gpu_mem_gb}")
        require(self.peak_tflops > 0, "cluster.peak_tflops", f"must be positive, got {self.peak_tflops}")
        require(0 < self.mfu <= 1, "cluster.mfu", f"must be in (0, 1], got {self.mfu}")
        require(self.reserve_gb >= 0, "cluster.reserve_gb", f"must be >= 0, got {self.reserve_gb}")
