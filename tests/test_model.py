"""The model: shared rows give exactly the log-probs and gradients of the duplicated layout.

Pure CPU fp32, tiny models with a large init std (0.15) and every parameter randomized (incl. QKV bias
and norm weights) so that position or mask errors show. The reference is megatron's *stock* GPTModel
(stock causal DotProductAttention, stock RotaryEmbedding over 0..L-1) run on each ``[prompt + response]``
alone, with the same weights, and a plain ``log_softmax`` over the full vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist import run_torchrun
from tests.dist_scripts.model_common import (
    FAMILIES,
    loss_weights,
    pack_units,
    random_units,
    randomize_,
    reference_logps,
    shared_logps,
    tiny_config,
)

ABS_TOL = 1e-5  # per-response summed log-prob
GRAD_RTOL = 1e-5  # per-parameter ||g_shared - g_ref|| / ||g_ref||


@pytest.fixture(scope="module")
def parallel():
    from megatron_prefix.parallel import init_parallel

    return init_parallel(1, 1, 1, seed=1234)


def _models(family: str, seed: int = 0):
    from megatron_prefix.model.spec import build_model, build_reference_model

    cfg = tiny_config(family)
    model = build_model(cfg, "dense")
    randomize_(model, seed)
    ref = build_reference_model(cfg)
    ref.load_state_dict(model.state_dict())
    return cfg, model, ref


def _grad_rel_errors(model, ref) -> dict[str, float]:
    ref_params = dict(ref.named_parameters())
    errs = {}
    for name, p in model.named_parameters():
        g, r = p.grad, ref_params[name].grad
        errs[name] = float((g - r).norm() / r.norm().clamp(min=1e-30))
    return errs


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_rows_match_unshared_logprobs_and_grads(parallel, family):
    """Every response's log-prob and every parameter's gradient equal the duplicated layout's."""
    cfg, model, ref = _models(family)
    units = random_units(seed=FAMILIES.index(family), vocab=cfg.vocab_size, ks=(2, 3, 4, 3, 2))
    rows = pack_units(units, per_row=3)  # 2 rows: 3 units + 2 units, padded to 64
    assert all(r.num_tokens < r.pack_tokens for r in rows), "rows must carry padding"
    out = shared_logps(model, rows)
    want = reference_logps(ref, units)
    assert out.logps.shape == want.shape
    diff = (out.logps - want).abs().max().item()
    assert diff <= ABS_TOL, f"{family}: max |logp diff| {diff:.3g}"
    assert out.num_tokens.tolist() == [len(r) for u in units for r in u.response_ids]

    w = loss_weights(len(want))
    (w * out.logps).sum().backward()
    (w * want).sum().backward()
    errs = _grad_rel_errors(model, ref)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= GRAD_RTOL, f"{family}: grad of {worst} off by {errs[worst]:.3g} (relative)"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["dense", "flex", "varlen"])
def test_gpu_backends_match_unshared(parallel, backend):
    """On CUDA (fp32, TF32 off): every fp32-capable backend gives the unshared log-probs and gradients;
    varlen (flash kernels have no fp32) refuses fp32 naming train.dtype (its bf16 accuracy is in
    tests/test_attention_gpu.py)."""
    from megatron_prefix.model.spec import build_model, build_reference_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = tiny_config("llama")
    model = build_model(cfg, backend, impl="local")
    randomize_(model, 0)
    ref = build_reference_model(cfg, impl="local")
    ref.load_state_dict(model.state_dict())
    units = random_units(seed=3, vocab=cfg.vocab_size, ks=(2, 3, 4, 3, 2))
    rows = pack_units(units, per_row=3, pack_tokens=128)
    if backend == "varlen":
        with pytest.raises(ValueError, match="train.dtype"):
            shared_logps(model, rows)
        return
    out = shared_logps(model, rows)
    want = reference_logps(ref, units)
    assert (out.logps - want).abs().max().item() <= 1e-4
    w = loss_weights(len(want)).to(want.device)
    (w * out.logps).sum().backward()
    (w * want).sum().backward()
    errs = _grad_rel_errors(model, ref)
    assert max(errs.values()) <= 1e-4, max(errs.items(), key=lambda kv: kv[1])


def test_negative_controls_fail(parallel):
    """Stock positions (0..T-1) or a mask letting responses see each other break the equality."""
    cfg, model, ref = _models("llama")
    units = random_units(seed=7, vocab=cfg.vocab_size, ks=(3, 2, 4))
    rows = pack_units(units, per_row=3)
    with torch.no_grad():
        want = reference_logps(ref, units)
        good = shared_logps(model, rows).logps
        stock = shared_logps(model, rows, positions="stock").logps
        mb_seg = torch.stack([torch.from_numpy(r.segment_ids).int() for r in rows])
        leaky = torch.where(mb_seg > 0, torch.ones_like(mb_seg), mb_seg)  # all responses one segment
        wrong_mask = shared_logps(model, rows, segment_ids=leaky).logps
    assert (good - want).abs().max() <= ABS_TOL
    assert (stock - want).abs().max() > 1e-3, "stock positions should be detected"
    assert (wrong_mask - want).abs().max() > 1e-3, "responses seeing each other should be detected"
    # the first response of the first unit has correct positions and mask either way
    assert (stock[0] - want[0]).abs() <= ABS_TOL and (wrong_mask[0] - want[0]).abs() <= ABS_TOL


def test_per_batch_rotary_equals_per_row(parallel):
    """megatron's unfused apply_rotary_pos_emb accepts per-row [s, b, 1, d] angles."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from megatron_prefix.model.rope import PositionRotary

    cfg = tiny_config("llama")
    tcfg = cfg.to_transformer_config()
    rot = PositionRotary(16, 10000.0, cfg.rope_scaling)
    pos = torch.stack([torch.arange(12), torch.tensor([0, 1, 2, 3, 4, 5, 4, 5, 6, 4, 5, 6])])  # [b=2, s]
    t_sbhd = torch.randn(12, 2, 3, 16)
    both = apply_rotary_pos_emb(t_sbhd, rot(pos), tcfg)
    for b in range(2):
        one = apply_rotary_pos_emb(t_sbhd[:, b : b + 1], rot(pos[b : b + 1]), tcfg)
        torch.testing.assert_close(both[:, b : b + 1], one, rtol=0, atol=0)


def test_rotary_matches_megatron_and_hf():
    """inv_freq equals megatron's RotaryEmbedding (default, llama3) and transformers' (llama3, linear)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_prefix.model.config import ModelConfig, RopeScaling
    from megatron_prefix.model.rope import rope_inv_freq

    d = 16
    for scaled in (False, True):
        meg = RotaryEmbedding(d, 1.0, rotary_base=10000, rope_scaling=scaled, use_cpu_initialization=True, cp_group=None)
        ours = rope_inv_freq(d, 10000.0, RopeScaling("llama3", 8.0) if scaled else None)
        torch.testing.assert_close(ours, meg.inv_freq, rtol=0, atol=0)
    for rope in (
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64, "rope_theta": 500000.0},
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    ):
        hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=rope)
        hf_inv, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
        ours_cfg = ModelConfig.from_hf_config(hf_cfg.to_dict())
        ours = rope_inv_freq(16, ours_cfg.rope_theta, ours_cfg.rope_scaling)
        torch.testing.assert_close(ours, hf_inv.float(), rtol=1e-6, atol=0)


def test_return_hidden_and_last_token(parallel):
    """``return_hidden`` gives the final hidden states; logits are their projection."""
    from megatron_prefix.model.batch import MicroBatch
    from megatron_prefix.model.logprobs import last_token_hidden, last_token_hidden_from_spans

    cfg, model, _ = _models("mistral")
    units = random_units(seed=3, vocab=cfg.vocab_size, ks=(2, 3))
    mb = MicroBatch.from_rows(pack_units(units, per_row=1))
    with torch.no_grad():
        hidden_sbh = mb.forward(model, return_hidden=True)
        logits_sbv = mb.forward(model)
    torch.testing.assert_close(model.output_layer(hidden_sbh)[0], logits_sbv)
    last = last_token_hidden(hidden_sbh, mb.index)
    assert last.shape == (5, cfg.hidden_size)
    torch.testing.assert_close(last, last_token_hidden_from_spans(hidden_sbh, mb.resp_spans, mb.resp_row))


@pytest.mark.dist
def test_tp_cp_pp_match_single_process(parallel, tmp_path):
    """TP=2, CP=2, TP=2 x CP=2 (qwen2) and PP=2 (llama) on 4 CPU processes reproduce the
    single-process log-probs and gradients."""
    from megatron_prefix.model.spec import build_model
    from tests.dist_scripts.model_parity import LAYOUTS, MODEL_SEED, parity_rows

    single = {}
    for family in sorted({layout[3] for layout in LAYOUTS.values()}):
        cfg = tiny_config(family)
        model = build_model(cfg, "dense")
        randomize_(model, MODEL_SEED)
        out = shared_logps(model, parity_rows(cfg))
        (loss_weights(len(out.logps)) * out.logps).sum().backward()
        single[family] = (out.logps.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()})

    path = tmp_path / "dist.pt"
    run_torchrun("tests/dist_scripts/model_parity.py", nproc=4, args=["--out", str(path)], timeout=300)
    results = torch.load(path)
    assert set(results) == set(LAYOUTS)
    for layout, res in results.items():
        logps, grads = single[res["family"]]
        diff = (res["logps"] - logps).abs().max().item()
        assert diff <= ABS_TOL, f"{layout}: max |logp diff| {diff:.3g}"
        assert set(res["grads"]) == set(grads), f"{layout}: parameter names differ"
        for name, g in grads.items():
            rel = float((res["grads"][name] - g).norm() / g.norm())
            assert rel <= GRAD_RTOL, f"{layout}: grad of {name} off by {rel:.3g}"


# ---------------------------------------------------------------------------------------------- config

_HF_LLAMA_V4 = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "torch_dtype": "bfloat16",
}


def test_from_hf_config_reads_v4_and_v5_rope_keys():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from megatron_prefix.model.config import ModelConfig

    v4 = ModelConfig.from_hf_config(_HF_LLAMA_V4)
    assert (v4.rope_theta, v4.rope_scaling.type, v4.rope_scaling.factor) == (500000.0, "llama3", 32.0)
    assert (v4.num_query_groups, v4.tie_word_embeddings, v4.params_dtype, v4.qkv_bias) == (2, True, "bfloat16", False)
    v5 = {k: v for k, v in _HF_LLAMA_V4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**_HF_LLAMA_V4["rope_scaling"], "rope_theta": 500000.0}
    assert ModelConfig.from_hf_config(v5) == v4
    # transformers' own config objects (v5 writes rope_parameters)
    qwen = ModelConfig.from_hf_config(Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                                  num_key_value_heads=2, num_hidden_layers=2).to_dict())
    assert (qwen.family, qwen.qkv_bias, qwen.rope_scaling.type) == ("qwen2", True, "none")
    mistral = MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                            num_hidden_layers=2, head_dim=32, sliding_window=None).to_dict()
    assert ModelConfig.from_hf_config(mistral).kv_channels == 32
    llama = ModelConfig.from_hf_config(LlamaConfig(hidden_size=64, num_attention_heads=4).to_dict())
    assert llama.head_dim is None and llama.kv_channels == 16


def test_from_hf_config_refuses_what_the_spec_cannot_reproduce(tmp_path):
    import json

    from megatron_prefix.model.config import ModelConfig

    cases = {
        "sliding_window": {"model_type": "mistral", "sliding_window": 1024},
        "mlp_bias": {"mlp_bias": True},
        "hidden_act": {"hidden_act": "gelu"},
        "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        "model_type": {"model_type": "gemma"},
        "layer_types": {"layer_types": ["full_attention", "sliding_attention"]},
    }
    for word, change in cases.items():
        with pytest.raises(ValueError, match=word):
            ModelConfig.from_hf_config({**_HF_LLAMA_V4, **change})
    (tmp_path / "config.json").write_text(json.dumps(_HF_LLAMA_V4))
    assert ModelConfig.load(tmp_path) == ModelConfig.from_hf_config(_HF_LLAMA_V4)


def test_yaml_configs_and_validation():
    from megatron_prefix.model.config import ModelConfig

    for family in FAMILIES:
        cfg = ModelConfig.load(Path(__file__).parents[1] / "configs" / "models" / f"tiny_{family}.yaml")
        assert cfg.family == family
        tcfg = cfg.to_transformer_config(tp=2)
        assert tcfg.gated_linear_unit and tcfg.normalization == "RMSNorm" and not tcfg.apply_rope_fusion
        assert tcfg.add_qkv_bias == cfg.qkv_bias and not tcfg.add_bias_linear
        assert tcfg.num_query_groups == cfg.kv_heads and tcfg.kv_channels == cfg.kv_channels
    with pytest.raises(ValueError, match="model.num_query_groups"):
        ModelConfig(num_attention_heads=4, num_query_groups=3).validate()
    with pytest.raises(ValueError, match="model.vocab_size"):
        ModelConfig(vocab_size=255).validate(tp=2)
    with pytest.raises(ValueError, match="model.rope_scaling.type"):
        ModelConfig.from_dict({"rope_scaling": {"type": "yarn"}})
    with pytest.raises(ValueError, match="model.bogus"):
        ModelConfig.from_dict({"bogus": 1})
