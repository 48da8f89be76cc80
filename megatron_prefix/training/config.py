"""The training recipe: one typed section per component, validated before any model is built.

A YAML recipe (``configs/*.yaml``) plus dotted overrides (``train.max_steps=20 parallel.tp=2``) become a
``TrainConfig``. ``validate(world_size, device)`` checks every section and the cross-section rules
(heads vs TP, kv-heads vs TP, layers vs PP, pack_tokens vs CP chunks, backend vs device, loss vs
reference mode) and raises ``ValueError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_prefix.attention import registry as attention_registry
from megatron_prefix.attention.backends import AttentionConfig
from megatron_prefix.config import require
from megatron_prefix.data.batching import BatchConfig
from megatron_prefix.losses.config import NO_REFERENCE
from megatron_prefix.losses.registry import LossConfig
from megatron_prefix.model.config import ModelConfig
from megatron_prefix.planning.cluster import ClusterConfig
from megatron_prefix.training.checkpoint_config import CheckpointConfig
from megatron_prefix.training.metrics import LoggingConfig

TASKS = ("dpo", "rm")
REFERENCE_FREE = NO_REFERENCE  # loss types that read no reference log-probs: simpo, orpo, sft
REWARD_LOSSES = ("bt", "rm_pl")


@dataclass
class DataConfig:
    """``data.*``: the built dataset and how it is batched."""

    path: str = ""
    layout: str = "shared"  # shared | unshared (prefix sharing off, for comparisons)
    pack_tokens: int = 8192
    global_batch_units: int = 64  # units (a prompt with its responses) per optimizer step
    sort_window: int = 1
    shuffle: bool = True
    seed: int = 1234
    algorithm: str = "bfd"
    drop_last: bool = False
    eval_fraction: float = 0.0  # held-out units (by source record)
    eval_units: int = 256  # at most this many held-out units per evaluation

    def validate(self) -> None:
        require(bool(self.path), "data.path", "set it to a directory built by tools/build_dataset.py")
        require(self.layout in ("shared", "unshared"), "data.layout", f"shared or unshared, got {self.layout!r}")
        require(0 <= self.eval_fraction < 1, "data.eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        require(self.eval_units >= 1, "data.eval_units", f"must be >= 1, got {self.eval_units}")
        self.batch_config().validate(prefix="data")

    def batch_config(self) -> BatchConfig:
        return BatchConfig(
            pack_tokens=self.pack_tokens,
            global_batch_units=self.global_batch_units,
            sort_window=self.sort_window,
            shuffle=self.shuffle,
            seed=self.seed,
            algorithm=self.algorithm,
            drop_last=self.drop_last,
        )


@dataclass
class ParallelConfig:
    """``parallel.*``: megatron's tensor / pipeline / context parallel sizes; DP is what remains."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False

    def validate(self, world_size: int) -> None:
        for name in ("tp", "pp", "cp"):
            require(getattr(self, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(self, name)}")
        mp = self.tp * self.pp * self.cp
        require(
            world_size % mp == 0,
            "parallel.tp",
            f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp}",
        )
        require(not (self.sequence_parallel and self.tp == 1), "parallel.sequence_parallel", "needs tp > 1")


@dataclass
class OptimizerConfig:
    """``optimizer.*``: Adam(W) through megatron's ``get_megatron_optimizer``."""

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def validate(self) -> None:
        require(self.lr > 0, "optimizer.lr", f"must be positive, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, "optimizer.min_lr", f"must be in [0, lr], got {self.min_lr}")
        require(self.clip_grad >= 0, "optimizer.clip_grad", f"must be >= 0, got {self.clip_grad}")


@dataclass
class ScheduleConfig:
    """``schedule.*``: linear warmup then decay to ``optimizer.min_lr``."""

    warmup_steps: int = 0
    decay_style: str = "cosine"  # cosine | linear | constant

    def validate(self) -> None:
        require(self.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        styles = ("cosine", "linear", "constant")
        require(self.decay_style in styles, "schedule.decay_style", f"one of {styles}, got {self.decay_style!r}")


@dataclass
class ReferenceConfig:
    """``reference.*``: where DPO's reference log-probs come from."""

    mode: str = "precompute"  # precompute | online | none
    path: str | None = None  # precompute cache dir; default <data.path>/reference/<hash of dataset + reference>

    def validate(self) -> None:
        modes = ("precompute", "online", "none")
        require(self.mode in modes, "reference.mode", f"one of {modes}, got {self.mode!r}")


@dataclass
class TrainLoopConfig:
    """``train.*``: steps, evaluation, precision, recomputation."""

    max_steps: int = 100
    exit_interval: int = 0  # save and exit after a step divisible by N (job time limits); 0: off
    eval_interval: int = 0  # evaluate on the held-out split every N steps (0: only at the end)
    seed: int = 1234
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    recompute: str = "none"  # none | full | selective
    device: str = "auto"  # auto | cpu | cuda

    def validate(self) -> None:
        require(self.max_steps >= 1, "train.max_steps", f"must be >= 1, got {self.max_steps}")
        require(self.eval_interval >= 0, "train.eval_interval", f"must be >= 0, got {self.eval_interval}")
        require(self.exit_interval >= 0, "train.exit_interval", f"must be >= 0, got {self.exit_interval}")
        require(self.dtype in ("auto", "float32", "bfloat16"), "train.dtype", f"got {self.dtype!r}")
        require(self.recompute in ("none", "full", "selective"), "train.recompute", f"got {self.recompute!r}")
        require(self.device in ("auto", "cpu", "cuda"), "train.device", f"got {self.device!r}")


@dataclass
class TrainConfig:
    """The whole recipe."""

    task: str = "dpo"  # dpo | rm (set by launch/train_dpo.py or launch/train_rm.py)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # target GPUs (tools/plan.py, fit check)

    def validate(self, world_size: int = 1, cuda: bool = False) -> None:
        """Check every section and the cross-section rules; ``ValueError`` names the field."""
        require(self.task in TASKS, "task", f"one of {TASKS}, got {self.task!r}")
        for section in (self.data, self.optimizer, self.schedule, self.reference, self.checkpoint,
                        self.logging, self.train, self.loss, self.attention):
            section.validate()
        self.model.validate()
        p = self.parallel
        p.validate(world_size)
        m = self.model
        require(m.num_attention_heads % p.tp == 0, "model.num_attention_heads",
                f"{m.num_attention_heads} heads are not divisible by parallel.tp={p.tp}")
        groups = m.num_query_groups or m.num_attention_heads
        require(groups % p.tp == 0, "model.num_query_groups",
                f"{groups} key/value heads are not divisible by parallel.tp={p.tp}")
        require(m.num_layers % p.pp == 0, "model.num_layers",
                f"{m.num_layers} layers are not divisible by parallel.pp={p.pp}")
        require(self.data.pack_tokens % (2 * p.cp) == 0, "data.pack_tokens",
                f"{self.data.pack_tokens} is not divisible by 2*parallel.cp={2 * p.cp} (CP load-balancing chunks)")
        if p.sequence_parallel:
            require(self.data.pack_tokens % (p.tp * 2 * p.cp) == 0, "data.pack_tokens",
                    "must be divisible by tp*2*cp with sequence parallelism")
        device = self.train.device if self.train.device != "auto" else ("cuda" if cuda else "cpu")
        require(device == "cpu" or cuda, "train.device", "cuda requested but CUDA is not available")
        # megatron builds weights and picks its CPU accommodations from CUDA being visible, not from this
        # field: rather than train half on the GPU, refuse and say how to train on CPU on a GPU host
        require(not (self.train.device == "cpu" and cuda), "train.device",
                "cpu on a host with visible GPUs is not supported (megatron would still place weights on "
                "the GPU); hide them instead: CUDA_VISIBLE_DEVICES= python launch/train_dpo.py ...")
        # backend x device x dtype x cp, asked of the attention-backend registry (names the field)
        attention_registry.check(self.attention, device=device, dtype=self.resolved_dtype(cuda), cp=p.cp,
                                 backward=True)
        if device == "cpu":
            require(self.train.dtype in ("auto", "float32"), "train.dtype", "CPU training runs in float32")
        types = self.loss.types  # loss.type may be a list (a TRL loss mix)
        if self.task == "rm":
            require(all(t in REWARD_LOSSES for t in types), "loss.type",
                    f"reward models use one of {REWARD_LOSSES}, got {self.loss.type!r}")
        else:
            require(not any(t in REWARD_LOSSES for t in types), "loss.type",
                    f"{self.loss.type!r} is a reward-model loss; use launch/train_rm.py")
        if self.task == "rm" or all(t in REFERENCE_FREE for t in types):
            self.reference.mode = "none"
        else:
            require(self.reference.mode != "none", "reference.mode",
                    f"loss {self.loss.type!r} needs reference log-probs: precompute or online")
            require(self.loss.ld_alpha is None or self.reference.mode == "online", "reference.mode",
                    "loss.ld_alpha needs reference.mode=online: the precomputed reference holds whole-response "
                    "sums, not LD-DPO's shared/tail split of each pair")
        require(self.data.global_batch_units >= 1, "data.global_batch_units", "must be >= 1")

    def resolved_device(self, cuda: bool) -> str:
        return self.train.device if self.train.device != "auto" else ("cuda" if cuda else "cpu")

    def resolved_dtype(self, cuda: bool) -> str:
        if self.train.dtype != "auto":
            return self.train.dtype
        return "bfloat16" if self.resolved_device(cuda) == "cuda" else "float32"
