"""Checkpoint conversion: Hugging Face <-> our megatron checkpoints (``megatron_prefix.convert``).

Tiny random HF models (``tests/dist_scripts/convert_common.py``: llama, llama tied, llama 3.1 rope
scaling with non-default constants, qwen2 untied / tied, mistral; init std 0.15, perturbed norms and
biases, fp32) are converted, loaded into ``SharedPrefixGPTModel`` and compared with the HF forward on
the same tokens (max |logit diff| <= 1e-4) at TP=1 in process, and at TP=2 / PP=2 under torchrun
(gloo, marked ``dist``), including loading a checkpoint written at another layout. Negative controls:
a naive QKV concatenation and a wrong rope_theta / llama3 constant must fail the comparison. HF ->
megatron -> HF is bit-identical on every tensor. Reward models export as ``*ForSequenceClassification``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist import ROOT, run_torchrun
from tests.dist_scripts import convert_common as cc

LOGIT_TOL = 1e-4
CONTROL_MIN = 10 * LOGIT_TOL  # a broken mapping must fail the parity check by a clear margin


@pytest.fixture(scope="module")
def parallel():
    from megatron_prefix.parallel import init_parallel

    return init_parallel(1, 1, 1, seed=1234)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


_HF: dict = {}


def hf_checkpoint(work: Path, kind: str):
    """(dir, model, tokens, reference logits) of the HF test model ``kind`` (built once per module)."""
    if kind not in _HF or not (work / f"hf_{kind}").is_dir():
        model = cc.make_hf_checkpoint(kind, work / f"hf_{kind}")
        tokens = cc.sample_tokens(model.config.vocab_size)
        logits = cc.hf_logits(model, tokens)
        torch.save({"tokens": tokens, "logits": logits}, work / f"ref_{kind}.pt")
        _HF[kind] = (work / f"hf_{kind}", model, tokens, logits)
    return _HF[kind]


def converted(work: Path, kind: str) -> Path:
    """``hf_<kind>`` converted in process at TP=1/PP=1 into ``<kind>_tp1pp1`` (once)."""
    from megatron_prefix.convert import convert_hf_to_mcore

    hf_dir = hf_checkpoint(work, kind)[0]
    out = work / f"{kind}_tp1pp1"
    if not (out / "latest").is_file():
        convert_hf_to_mcore(hf_dir, out, progress=False)
        from megatron_prefix.parallel import init_parallel

        init_parallel(1, 1, 1)
    return out


def safetensors_of(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def assert_bit_identical(src: Path, dst: Path) -> None:
    a, b = safetensors_of(src), safetensors_of(dst)
    assert sorted(a) == sorted(b), f"tensor names differ: {sorted(set(a) ^ set(b))}"
    for name in a:
        assert a[name].dtype == b[name].dtype, f"{name}: dtype {a[name].dtype} -> {b[name].dtype}"
        assert torch.equal(a[name], b[name]), f"{name}: values differ after the round trip"


# ------------------------------------------------------------------------------------------ TP=1 parity


@pytest.mark.parametrize("kind", cc.KINDS)
def test_hf_to_mcore_logits_match(parallel, work, kind):
    """Converted weights in our model give HF's logits (fp32, one unpacked sequence)."""
    _, _, tokens, want = hf_checkpoint(work, kind)
    run = converted(work, kind)
    state = json.loads((run / "iter_0000000" / "train_state.json").read_text())
    assert state["step"] == 0 and state["has_optimizer"] is False and state["task"] == "dpo"
    assert len(state["source"]["config_sha256"]) == 64
    got = cc.megatron_logits(cc.load_converted(run), tokens)
    diff = (got - want).abs().max().item()
    print(f"MAXDIFF {kind} tp1pp1 {diff:.3e}")
    assert diff <= LOGIT_TOL, f"{kind}: max |logit diff| {diff:.3g}"


def test_llama3_constants_preserved(parallel, work):
    """The llama 3.1 low/high frequency factors and original length reach our RoPE unchanged."""
    state = json.loads((converted(work, "llama31") / "iter_0000000" / "train_state.json").read_text())
    assert state["model"]["rope_scaling"] == {"type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                                              "high_freq_factor": 8.0, "original_max_position_embeddings": 64}


# ------------------------------------------------------------------------------------------ negative controls


def _diff_of(run: Path, tokens, want) -> float:
    return (cc.megatron_logits(cc.load_converted(run), tokens) - want).abs().max().item()


def test_naive_qkv_concat_fails(parallel, work, monkeypatch):
    """Concatenating q, k, v without the per-group interleave must break the logits."""
    from megatron_prefix.convert import to_mcore

    hf_dir, _, tokens, want = hf_checkpoint(work, "llama")
    monkeypatch.setattr(to_mcore, "interleave_qkv", lambda q, k, v, layout: torch.cat([q, k, v], dim=0))
    run = work / "llama_naive_qkv"
    to_mcore.convert_hf_to_mcore(hf_dir, run, progress=False)
    diff = _diff_of(run, tokens, want)
    print(f"CONTROL naive_qkv {diff:.3e}")
    assert diff > CONTROL_MIN, f"naive QKV concat went unnoticed (diff {diff:.3g})"


@pytest.mark.parametrize("kind,field,value", [
    ("llama", "rope_theta", 10000.0),  # the checkpoint has 50000
    ("llama31", "rope_scaling.low_freq_factor", 1.0),  # the checkpoint has 2.0
])
def test_wrong_rope_fails(parallel, work, kind, field, value):
    """A wrong RoPE constant in the converted config must break the logits."""
    _, _, tokens, want = hf_checkpoint(work, kind)
    src = converted(work, kind)
    run = work / f"{kind}_wrong_{field}"
    shutil.copytree(src, run)
    path = run / "iter_0000000" / "train_state.json"
    state = json.loads(path.read_text())
    target = state["model"]
    *parents, leaf = field.split(".")
    for p in parents:
        target = target[p]
    target[leaf] = value
    path.write_text(json.dumps(state))
    diff = _diff_of(run, tokens, want)
    print(f"CONTROL {kind} {field} {diff:.3e}")
    assert diff > CONTROL_MIN, f"wrong {field} went unnoticed (diff {diff:.3g})"


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("kind", cc.KINDS)
def test_round_trip_bit_identical(parallel, work, kind):
    """HF -> megatron -> HF gives the same tensors bit for bit, and transformers loads the result."""
    from transformers import AutoModelForCausalLM

    from megatron_prefix.convert import convert_mcore_to_hf

    hf_dir, _, tokens, want = hf_checkpoint(work, kind)
    out = work / f"{kind}_back"
    convert_mcore_to_hf(converted(work, kind), out, shard_size=40_000, progress=False)
    assert_bit_identical(hf_dir, out)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1, "shard size should split this model"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(safetensors_of(out))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager")
    assert torch.equal(cc.hf_logits(reloaded.eval(), tokens), want), "the exported model computes differently"


def test_round_trip_bf16(parallel, work):
    """A bf16 HF checkpoint stays bf16 (default --dtype: config.json's) and round-trips bit for bit."""
    from transformers import AutoModelForCausalLM

    from megatron_prefix.convert import convert_hf_to_mcore, convert_mcore_to_hf

    src = work / "hf_qwen2_bf16"
    model = AutoModelForCausalLM.from_pretrained(str(hf_checkpoint(work, "qwen2")[0]), dtype=torch.bfloat16)
    model.save_pretrained(str(src))
    convert_hf_to_mcore(src, work / "qwen2_bf16_run", progress=False)
    convert_mcore_to_hf(work / "qwen2_bf16_run", work / "qwen2_bf16_back", progress=False)
    assert_bit_identical(src, work / "qwen2_bf16_back")
    assert json.loads((work / "qwen2_bf16_back" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------ refusals


def _write_hf_config(directory: Path, kind: str, **changes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = cc.hf_config(kind).to_dict()
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


@pytest.mark.parametrize("kind,changes,message", [
    ("mistral", {"sliding_window": 16, "use_sliding_window": True}, "sliding_window"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "yarn"),
    ("llama", {"vocab_size": 127}, "vocab_size"),
])
def test_refuses_unsupported(work, kind, changes, message):
    from megatron_prefix.convert import convert_hf_to_mcore

    hf_dir = _write_hf_config(work / f"bad_{kind}_{message}", kind, **changes)
    with pytest.raises(ValueError, match=message):
        convert_hf_to_mcore(hf_dir, work / f"bad_out_{message}", tp=2, pp=1, progress=False)


def test_refuses_unmapped_tensors(parallel, work):
    """A tensor the mapping would drop (here an o_proj bias) is refused, not silently lost."""
    from safetensors.torch import load_file, save_file

    from megatron_prefix.convert import convert_hf_to_mcore

    src = hf_checkpoint(work, "llama")[0]
    dst = work / "hf_llama_extra"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="o_proj.bias"):
        convert_hf_to_mcore(dst, work / "llama_extra_run", progress=False)


# ------------------------------------------------------------------------------------------ reward model


def _reward_of_our_model(run: Path, tokens: torch.Tensor) -> float:
    from megatron.core import dist_checkpointing

    from megatron_prefix.convert.to_mcore import no_embedding_sync
    from megatron_prefix.model.config import ModelConfig
    from megatron_prefix.model.spec import build_model
    from megatron_prefix.training.checkpoint import resolve
    from megatron_prefix.training.reward import attach_reward_head

    path = resolve(run)
    cfg = ModelConfig(**json.loads((path / "train_state.json").read_text())["model"])
    with no_embedding_sync():
        model = build_model(cfg, "dense", impl="local")
    attach_reward_head(model, model.config)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(state["model"], strict=True)
    mb = cc._micro_batch(tokens, 7)
    with torch.no_grad():
        hidden = mb.forward(model.eval(), return_hidden=True)
        reward, _ = model.output_layer(hidden)
    return float(reward[-1, 0, 0])


def _with_bias(src: Path, dst: Path, bias: float) -> None:
    """Copy the reward run ``src`` to ``dst`` with the scalar head's bias set to ``bias``."""
    from megatron.core import dist_checkpointing

    from megatron_prefix.training.checkpoint import resolve

    path = resolve(src)
    meta_state = json.loads((path / "train_state.json").read_text())
    from megatron_prefix.model.config import ModelConfig
    from megatron_prefix.model.spec import build_model
    from megatron_prefix.training.reward import attach_reward_head

    model = build_model(ModelConfig(**meta_state["model"]), "dense", impl="local")
    attach_reward_head(model, model.config)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(state["model"], strict=True)
    with torch.no_grad():
        model.output_layer.bias.fill_(bias)
    (dst / "iter_0000000").mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(dst / "iter_0000000"))
    (dst / "iter_0000000" / "train_state.json").write_text(json.dumps(meta_state))
    (dst / "latest").write_text("iter_0000000\n")


def test_reward_model_export(parallel, work):
    """``task rm`` -> LlamaForSequenceClassification whose score equals our reward; a bias is refused or
    dropped (and recorded) on request."""
    from transformers import AutoModelForSequenceClassification

    from megatron_prefix.convert import convert_hf_to_mcore, convert_mcore_to_hf
    from megatron_prefix.parallel import init_parallel

    hf_dir, _, tokens, _ = hf_checkpoint(work, "llama_tied")
    run = work / "rm_run"
    convert_hf_to_mcore(hf_dir, run, task="rm", progress=False)
    init_parallel(1, 1, 1)
    ours = _reward_of_our_model(run, tokens)
    out = work / "rm_hf"
    convert_mcore_to_hf(run, out, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert config["tie_word_embeddings"] is False
    hf = AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = float(hf(tokens[None]).logits[0, 0])
    assert abs(theirs - ours) <= LOGIT_TOL, (theirs, ours)
    assert tuple(safetensors_of(out)["score.weight"].shape) == (1, 64)

    biased = work / "rm_biased"
    _with_bias(run, biased, 0.5)
    with pytest.raises(ValueError, match="reward-bias drop"):
        convert_mcore_to_hf(biased, work / "rm_biased_refused", progress=False)
    dropped = work / "rm_biased_hf"
    convert_mcore_to_hf(biased, dropped, reward_bias_mode="drop", progress=False)
    assert json.loads((dropped / "config.json").read_text())["reward_bias"] == 0.5
    hf = AutoModelForSequenceClassification.from_pretrained(str(dropped), dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        shifted = float(hf(tokens[None]).logits[0, 0])
    assert abs(shifted + 0.5 - _reward_of_our_model(biased, tokens)) <= LOGIT_TOL


# ------------------------------------------------------------------------------------------ CLI


def test_cli_round_trip(work):
    """Both tools end to end as subprocesses, with tokenizer files copied and token ids carried over."""
    hf_dir = hf_checkpoint(work, "mistral")[0]
    tok = work / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    env_py = [sys.executable]
    run, back = work / "cli_run", work / "cli_back"
    for cmd in (
        [*env_py, "tools/convert_hf_to_mcore.py", "--hf", str(hf_dir), "--out", str(run), "--no-progress"],
        [*env_py, "tools/convert_mcore_to_hf.py", "--ckpt", str(run), "--out", str(back), "--tokenizer", str(tok),
         "--hf-config", str(hf_dir / "config.json"), "--shard-size", "50KB", "--no-progress"],
    ):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_bit_identical(hf_dir, back)
    assert (back / "tokenizer_config.json").is_file()
    config = json.loads((back / "config.json").read_text())
    assert config["eos_token_id"] == cc.hf_config("mistral").eos_token_id
    proc = subprocess.run([*env_py, "tools/convert_hf_to_mcore.py", "--hf", str(hf_dir), "--out", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr


# ------------------------------------------------------------------------------------------ TP=2 / PP=2


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_conversion_logits_match(parallel, work, tp, pp):
    """Each rank converts its own shards at TP=2 or PP=2; the result (and the TP=1 conversion, resharded)
    gives HF's logits; exporting the parallel-written checkpoint is bit-identical to the source."""
    from megatron_prefix.convert import convert_mcore_to_hf

    kinds = list(cc.KINDS)
    for kind in kinds:
        converted(work, kind)
    out = run_torchrun("tests/dist_scripts/convert_parity.py", nproc=2,
                       args=["--work", str(work), "--kinds", ",".join(kinds), "--tp", str(tp), "--pp", str(pp),
                             "--reshard-from", "tp1pp1"], timeout=300)
    diffs = {}
    for line in out.splitlines():
        if line.startswith("MAXDIFF"):
            _, kind, source, value = line.split()
            diffs[(kind, source)] = float(value)
    print(diffs)
    name = f"tp{tp}pp{pp}"
    assert set(diffs) == {(k, s) for k in kinds for s in (name, "tp1pp1")}, out[-3000:]
    bad = {k: v for k, v in diffs.items() if not v <= LOGIT_TOL}
    assert not bad, f"max |logit diff| above {LOGIT_TOL}: {bad}"
    for kind in ("qwen2", "llama_tied"):
        back = work / f"{kind}_{name}_back"
        convert_mcore_to_hf(work / f"{kind}_{name}", back, progress=False)
        assert_bit_identical(hf_checkpoint(work, kind)[0], back)
