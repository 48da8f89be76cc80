"""Per-rank memory of a training layout: weights, gradients, optimizer state, activations, buffers.

Bytes per parameter (megatron's mixed precision, ``grad_reduce_in_fp32=True`` as ``training/setup.py``
builds it): bf16 weights 2, fp32 main grads 4, Adam state 12 (fp32 master copy + two moments); the
distributed optimizer shards the 12 over the data-parallel-with-CP group (``dp * cp`` ranks). This is
megatron's ``6 + 12 / dp`` (``theoretical_memory_usage.py``). fp32 training (CPU): 4 + 4 + 8 (no master).

Activations (bytes saved for backward per micro-batch and layer) follow Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models" (Table 2), term by term; the terms are
fields of ``ActivationArch`` whose defaults are the paper's layer (MHA, GeLU MLP, dropout, fp16 scores).
With ``e`` bytes per element, ``s`` tokens (``/cp``), ``b`` rows, ``t`` = tp, replicated terms divided by
``t`` only under sequence parallelism:

- replicated: each of the two norms keeps ``norm_saved`` h-sized tensors (its input and its output, the
  next linear's input; megatron's ``local`` spec also the normalised input) and, ours, an fp32 rstd;
  with dropout two 1-byte masks ``2 sbh``;
- TP-sharded: the QKV output ``q + 2kv`` (plus RoPE's new Q and K, ``q + kv``, ours), the projection
  input ``q``, the MLP's ``mlp_saved`` f-sized tensors (GeLU 2; megatron's SwiGLU 5);
- attention internals: materialised scores ``e as^2b/t`` (+ dropout mask and output ``(1 + e) as^2b/t``),
  or a flash kernel's fp32 log-sum-exp ``4 asb/t`` (+ SDPA's fp32 ``[s, s]`` mask for the ``dense``
  backend); all dropped by ``recompute=selective`` (megatron recomputes core attention);
- ``recompute=full``: only each layer's input ``e sbh`` (``/t`` with SP), plus one layer's full set while
  it is recomputed in backward (``stage_activations``).

For the paper's layer this is ``sbh(34 + 5as/h)`` without parallelism and ``sbh(10 + 24/t + 5as/(ht))``
with TP; ``tests/test_plan_memory.py`` pins both and megatron's ``compute_activation_memory``, and
``tests/test_plan_measured.py`` checks ours against the tensors a tiny model really saves on CPU.
Pipeline 1F1B: stage ``i`` holds ``min(pp - i, m)`` micro-batches in flight (the first stage the most).
Pure arithmetic: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_prefix.model.config import ModelConfig
from megatron_prefix.planning.params import stage_params

GIB = 1024**3
LOGPROB_CHUNK_ELEMS = 1 << 26  # model/logprobs.py DEFAULT_CHUNK_ELEMS: fp32 elements per chunk


@dataclass(frozen=True)
class Layout:
    """A parallel layout and the memory-relevant training switches."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: str = "none"  # none | selective | full

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        sp = "+sp" if self.sequence_parallel else ""
        return f"tp={self.tp}{sp} pp={self.pp} cp={self.cp} dp={self.dp} recompute={self.recompute}"


@dataclass(frozen=True)
class ActivationArch:
    """What a decoder layer saves for backward (see the module docstring); defaults: the paper's layer."""

    hidden: int
    q: int  # heads * head_dim
    kv: int  # groups * head_dim
    ffn: int
    heads: int
    norm_saved: int = 2  # h-sized tensors a norm + the next linear keep: input, output (+ normalized: 3)
    norm_rstd: bool = False  # fp32 1/rms per token per norm
    rope_copies: bool = False  # rotated Q and K are new tensors; V still keeps the fused QKV output alive
    mlp_saved: int = 2  # f-sized tensors the MLP keeps (GeLU: input, output; megatron SwiGLU: 5, see below)
    dropout: bool = True
    attention: str = "materialized"  # materialized (softmax [+ dropout]) | flash (fp32 lse) | flash+mask

    @classmethod
    def from_model(cls, m: ModelConfig, backend: str = "varlen", impl: str = "te") -> ActivationArch:
        """Our layer spec (``model/spec.py``) as megatron-core 0.16 runs it.

        - norms: Transformer Engine's fused norm+linear keeps input, output and rstd; megatron's ``local``
          spec (torch RMSNorm, CPU) also keeps the normalised input before the weight (3 tensors);
        - attention: RoPE makes new Q and K while V is a view of the fused QKV output; flash kernels keep
          their output (the projection's input) and an fp32 log-sum-exp per head; the ``dense`` backend
          also keeps SDPA's fp32 mask ``[s, s]`` per layer;
        - MLP (megatron ``glu``, no bias-activation fusion): fc1 output ``2f``, ``x_linear + offset`` ``f``,
          silu output ``f``, the product (fc2 input) ``f``: 5 f-sized tensors; no dropout (p = 0).
        """
        return cls(hidden=m.hidden_size, q=m.num_attention_heads * m.kv_channels, kv=m.kv_heads * m.kv_channels,
                   ffn=m.ffn_hidden_size, heads=m.num_attention_heads, norm_saved=3 if impl == "local" else 2,
                   norm_rstd=True, rope_copies=True, mlp_saved=5, dropout=False,
                   attention="flash+mask" if backend == "dense" else "flash")


def layer_activation_bytes(arch: ActivationArch, seq: int, batch: int, layout: Layout, elem_bytes: int,
                           recompute: str | None = None) -> float:
    """Bytes one decoder layer keeps for backward for one micro-batch of ``batch`` rows of ``seq`` tokens."""
    recompute = layout.recompute if recompute is None else recompute
    t, e = layout.tp, elem_bytes
    s = seq / layout.cp
    sb, h = s * batch, arch.hidden
    rep = 1 / t if layout.sequence_parallel else 1.0  # replicated terms: split by SP only
    if recompute == "full":
        return e * sb * h * rep
    replicated = (2 * arch.norm_saved * e * sb * h + (2 * sb * h if arch.dropout else 0)
                  + (2 * 4 * sb if arch.norm_rstd else 0)) * rep
    qkv = arch.q + 2 * arch.kv + ((arch.q + arch.kv) if arch.rope_copies else 0)
    sharded = e * sb * (qkv + arch.q + arch.mlp_saved * arch.ffn) / t
    internals = 0.0
    scores = arch.heads * s * seq * batch  # this CP rank's queries against all keys
    if arch.attention == "materialized" and recompute == "none":
        internals = (e + ((1 + e) if arch.dropout else 0)) * scores / t
    elif arch.attention.startswith("flash") and recompute == "none":  # selective recomputes core attention
        internals = 4 * arch.heads * sb / t + (4 * s * seq * batch if arch.attention == "flash+mask" else 0)
    return replicated + sharded + internals


def head_saved_bytes(m: ModelConfig, arch: ActivationArch, layout: Layout, seq: int, elem_bytes: int,
                     task: str = "dpo") -> float:
    """What the last stage keeps for backward: final norm (its output is the output layer's input), logits."""
    s, t = seq / layout.cp, layout.tp
    rep = 1 / t if layout.sequence_parallel else 1.0
    norm = (arch.norm_saved * elem_bytes * s * m.hidden_size + (4 * s if arch.norm_rstd else 0)) * rep
    return norm + (0 if task == "rm" else elem_bytes * s * m.vocab_size / t)


def stage_activations(m: ModelConfig, arch: ActivationArch, layout: Layout, seq: int, elem_bytes: int, *,
                      in_flight: int, first: bool, last: bool, task: str = "dpo") -> dict[str, float]:
    """Saved-for-backward high-water mark of one stage, by part: ``layers``, ``inputs``, ``head``, ``recompute``.

    ``in_flight`` micro-batches each keep this stage's layers; the first stage keeps int64 token and
    position ids, the last the final norm and the logits (``head_saved_bytes``). With full recomputation
    one layer's complete set is rebuilt during backward, after the head's tensors are released: the
    peak is the layer inputs plus the larger of the two (``recompute`` is the excess over ``head``).
    """
    layers = m.num_layers // layout.pp
    out = {"layers": in_flight * layers * layer_activation_bytes(arch, seq, 1, layout, elem_bytes)}
    if first:
        out["inputs"] = in_flight * 16 * seq / layout.cp
    if last:
        out["head"] = head_saved_bytes(m, arch, layout, seq, elem_bytes, task)
    if layout.recompute == "full":
        one = layer_activation_bytes(arch, seq, 1, layout, elem_bytes, recompute="none")
        out["recompute"] = max(0.0, one - out.get("head", 0.0))
    return out


@dataclass
class StageMemory:
    """Bytes per rank of one pipeline stage, by item (``items``) and in total."""

    stage: int
    params: int
    items: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.items.values())


@dataclass(frozen=True)
class MemoryInputs:
    """What memory depends on besides the model and the layout."""

    pack_tokens: int  # tokens per micro-batch row (one row per micro-batch)
    micro_batches: int  # micro-batches per step on one data-parallel rank
    dtype: str = "bfloat16"  # bfloat16 | float32
    backend: str = "varlen"
    reference: str = "precompute"  # precompute | online | none
    task: str = "dpo"
    reserve_gib: float = 3.0  # CUDA context, NCCL buffers, allocator slack


def stage_memory(m: ModelConfig, layout: Layout, inp: MemoryInputs, stage: int) -> StageMemory:
    """The memory of one rank of pipeline stage ``stage``."""
    p = stage_params(m, layout.tp, layout.pp, stage)
    bf16 = inp.dtype != "float32"
    e = 2 if bf16 else 4
    shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    out = StageMemory(stage=stage, params=p)
    out.items["weights"] = p * e
    out.items["grads (fp32 main grads)" if bf16 else "grads"] = p * 4
    out.items["optimizer" + (" (distributed)" if shards > 1 else "")] = p * (12 if bf16 else 8) / shards
    arch = ActivationArch.from_model(m, inp.backend, "te" if bf16 else "local")
    in_flight = min(layout.pp - stage, max(inp.micro_batches, 1))
    s_local, t = inp.pack_tokens / layout.cp, layout.tp
    act = stage_activations(m, arch, layout, inp.pack_tokens, e, in_flight=in_flight, first=stage == 0,
                            last=stage == layout.pp - 1, task=inp.task)
    label = f"activations ({in_flight} micro-batch{'es' if in_flight > 1 else ''} in flight)"
    out.items[label] = act["layers"] + act.get("inputs", 0)
    if "recompute" in act:
        out.items["recompute working set (one layer)"] = act["recompute"]
    if "head" in act:
        head = act["head"]
        if inp.task == "rm":
            head += 4 * s_local  # one reward per token position, fp32
        else:  # the logits' gradient (same dtype) and the fp32 log-softmax chunks of model/logprobs.py
            head += e * s_local * m.vocab_size / t + 2 * 4 * min(s_local * m.vocab_size / t, LOGPROB_CHUNK_ELEMS)
        out.items["logits and log-prob buffers" if inp.task != "rm" else "reward head"] = head
    if inp.reference == "online":
        work = layer_activation_bytes(arch, inp.pack_tokens, 1, layout, e, recompute="none")
        if stage == layout.pp - 1:
            work += e * s_local * m.vocab_size / t + 4 * min(s_local * m.vocab_size / t, LOGPROB_CHUNK_ELEMS)
        out.items["reference model (online, frozen copy)"] = p * e + work
    elif inp.reference == "precompute":
        out.items["reference log-probs (precomputed)"] = 4 * s_local
    out.items["reserve (CUDA context, NCCL, allocator)"] = inp.reserve_gib * GIB
    return out


def rank_memory(m: ModelConfig, layout: Layout, inp: MemoryInputs) -> list[StageMemory]:
    """Every pipeline stage's memory; the peak rank is ``max(..., key=total)``."""
    return [stage_memory(m, layout, inp, i) for i in range(layout.pp)]
