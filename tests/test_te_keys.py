"""Checkpoints of the local spec (converter, CPU runs) load into the Transformer-Engine spec (issue 13).

megatron's TE spec cannot be built without Transformer Engine, but its *structure* can be read:
``get_gpt_layer_with_transformer_engine_spec`` asks a backend provider for each submodule, so with a
provider that returns named placeholders we learn which submodules exist, which linear layers fuse a
norm (``column_parallel_layer_norm_linear`` -> ``layer_norm_weight``) and which are TE modules (each
holds an ``_extra_state``). From that we derive the key set a TE-spec model asks a checkpoint for and
compare it with (a) our mapping (``convert.layout``) and (b) the keys the local spec writes.

The load path tolerates exactly one gap, missing ``*._extra_state``; any other missing or surplus
model key is an error that names it. The real TE load is the ``gpu`` test at the end.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_scripts.model_common import randomize_, tiny_config


class _Placeholder:
    pass


def _te_layer_structure(monkeypatch) -> dict[str, str]:
    """{submodule path in a layer: provider method that built it} of megatron's TE GPT layer spec."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.identity_op import IdentityOp

    made: dict[type, str] = {}

    class Provider:
        def fuse_layernorm_and_linear(self) -> bool:
            return True

        def __getattr__(self, name):
            def build(*args, **kwargs):
                cls = type(f"TE_{name}", (_Placeholder,), {})
                made[cls] = name
                return cls

            return build

    monkeypatch.setattr(specs, "TESpecProvider", Provider, raising=False)
    spec = specs.get_gpt_layer_with_transformer_engine_spec()
    out: dict[str, str] = {}

    def walk(prefix: str, sub) -> None:
        for field, value in vars(sub).items():
            path = f"{prefix}{field}"
            module = getattr(value, "module", value)
            if module is IdentityOp or value is IdentityOp:
                continue
            if isinstance(module, type) and module in made:
                out[path] = made[module]
            if getattr(value, "submodules", None) is not None:
                walk(path + ".", value.submodules)

    walk("", spec.submodules)
    return out


def _te_checkpoint_keys(structure: dict[str, str], qkv_bias: bool) -> set[str]:
    """Layer keys (``decoder.layers.<path>.<param>``) a TE-spec layer asks for (our core attention aside)."""
    keys = set()
    for path, kind in structure.items():
        if kind == "core_attention":
            continue  # replaced by SharedPrefixCoreAttention in both specs
        if kind == "layer_norm":
            keys.add(f"{path}.weight")
            continue
        keys |= {f"{path}.weight", f"{path}._extra_state"}
        if kind == "column_parallel_layer_norm_linear":
            keys.add(f"{path}.layer_norm_weight")
        if qkv_bias and path == "self_attention.linear_qkv":
            keys.add(f"{path}.bias")
    return {"decoder.layers." + k for k in keys}


def test_mapping_matches_megatron_te_spec(monkeypatch):
    from megatron_prefix.convert.layout import CKPT_EXTRA_STATE_KEYS, CKPT_LAYER_KEYS, TE_FUSED_NORMS

    structure = _te_layer_structure(monkeypatch)
    assert structure["self_attention.linear_qkv"] == "column_parallel_layer_norm_linear"
    assert structure["mlp.linear_fc1"] == "column_parallel_layer_norm_linear"
    assert "input_layernorm" not in structure and "pre_mlp_layernorm" not in structure  # fused away
    te_keys = _te_checkpoint_keys(structure, qkv_bias=True)
    ours = set(CKPT_LAYER_KEYS.values()) | set(CKPT_EXTRA_STATE_KEYS)
    assert ours == te_keys, (sorted(ours - te_keys), sorted(te_keys - ours))
    for local, fused in TE_FUSED_NORMS.items():
        module = fused.rsplit(".", 1)[0]
        assert structure[module] == "column_parallel_layer_norm_linear", (local, fused)


@pytest.fixture(scope="module")
def parallel():
    from megatron_prefix.parallel import init_parallel

    return init_parallel(1, 1, 1, seed=1234)


def _model(qkv_bias: bool = False):
    from megatron_prefix.model.spec import build_model

    model = build_model(tiny_config("llama", qkv_bias=qkv_bias), "dense", impl="local")
    randomize_(model, 0)
    return model


def _layer_keys(model) -> set[str]:
    return {v.key for v in model.sharded_state_dict().values() if v.key.startswith("decoder.layers.")}


def test_local_spec_writes_the_te_key_set(parallel, monkeypatch):
    """What the local spec (and so the converter) saves is what a TE-spec model asks for."""
    structure = _te_layer_structure(monkeypatch)
    for bias in (False, True):
        assert _layer_keys(_model(bias)) == _te_checkpoint_keys(structure, qkv_bias=bias)


def _save(model, path, drop=lambda key: False, extra=None):
    from megatron.core import dist_checkpointing

    sd = {k: v for k, v in model.sharded_state_dict().items() if not drop(v.key)}
    sd.update(extra or {})
    path.mkdir()
    dist_checkpointing.save({"model": sd}, str(path))


def _load(model, path):
    from megatron_prefix.training.checkpoint import load_sharded
    from megatron_prefix.training.setup import check_loaded_keys

    state = load_sharded({"model": model.sharded_state_dict()}, path)
    check_loaded_keys(*model.load_state_dict(state["model"], strict=False))


def test_missing_extra_state_is_tolerated(parallel, tmp_path):
    """A checkpoint without ``_extra_state`` entries (what a TE model asks more than a local one) loads."""
    src, dst = _model(), _model()
    torch.nn.init.zeros_(dst.decoder.final_layernorm.weight)
    _save(src, tmp_path / "ckpt", drop=lambda key: key.endswith("._extra_state"))
    _load(dst, tmp_path / "ckpt")
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_other_missing_key_is_an_error_naming_it(parallel, tmp_path):
    _save(_model(), tmp_path / "ckpt", drop=lambda key: key == "decoder.final_layernorm.weight")
    with pytest.raises(ValueError, match=r"lacks 1 keys.*decoder\.final_layernorm\.weight"):
        _load(_model(), tmp_path / "ckpt")


def test_surplus_model_key_is_an_error_naming_it(parallel, tmp_path):
    """A checkpoint with QKV biases loaded into a model without: the biases would be dropped silently."""
    _save(_model(qkv_bias=True), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"no place for.*linear_qkv\.bias"):
        _load(_model(qkv_bias=False), tmp_path / "ckpt")


@pytest.mark.gpu
def test_converted_checkpoint_loads_into_te_spec(parallel, tmp_path):
    """GPU tier: a local-spec checkpoint loads into the real TE spec and gives the same logits."""
    from megatron_prefix.model.batch import MicroBatch
    from megatron_prefix.model.spec import build_model, te_available
    from tests.dist_scripts.model_common import pack_units, random_units

    if not te_available():
        pytest.skip("needs transformer_engine (not installed on this machine)")
    cfg = tiny_config("llama", params_dtype="float32")
    local = build_model(cfg, "dense", impl="local").cuda()
    randomize_(local, 0)
    _save(local, tmp_path / "ckpt")
    te = build_model(cfg, "dense", impl="te")
    _load(te, tmp_path / "ckpt")
    mb = MicroBatch.from_rows(pack_units(random_units(seed=1, vocab=cfg.vocab_size), per_row=1),
                              device=torch.device("cuda"))
    with torch.no_grad():
        torch.testing.assert_close(mb.forward(te.eval()), mb.forward(local.eval()), rtol=1e-4, atol=1e-4)
