"""``SharedPrefixGPTModel`` runs megatron's own ``GPTModel.forward`` and passes ``padding_mask`` on (issue 13).

Only megatron's ``_preprocess`` (RoPE from position ids) and ``_postprocess`` (logits [s, b, V], no loss)
are overridden, so an upstream change to ``GPTModel.forward`` reaches this model; ``padding_mask`` (MoE
routing) reaches the decoder instead of being dropped. Parity with the unshared computation is
``tests/test_model.py``'s job.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_scripts.model_common import pack_units, random_units, randomize_, tiny_config


@pytest.fixture(scope="module")
def parallel():
    from megatron_prefix.parallel import init_parallel

    return init_parallel(1, 1, 1, seed=1234)


@pytest.fixture(scope="module")
def model_and_batch(parallel):
    from megatron_prefix.model.batch import MicroBatch
    from megatron_prefix.model.spec import build_model

    cfg = tiny_config("llama")
    model = build_model(cfg, "dense").eval()
    randomize_(model, 0)
    mb = MicroBatch.from_rows(pack_units(random_units(seed=1, vocab=cfg.vocab_size, ks=(2, 3)), per_row=1))
    return model, mb


def test_forward_is_megatrons(model_and_batch, monkeypatch):
    """The call goes through ``GPTModel.forward`` (a spy on the parent sees it) and gives the same logits."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    model, mb = model_and_batch
    calls = []
    parent = GPTModel.forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return parent(self, *args, **kwargs)

    with torch.no_grad():
        before = mb.forward(model)
        monkeypatch.setattr(GPTModel, "forward", spy)
        after = mb.forward(model)
    assert len(calls) == 1, "SharedPrefixGPTModel.forward must delegate to megatron's GPTModel.forward"
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert before.shape[:2] == mb.tokens.shape[::-1]  # [s, b, V]: no [b, s] transpose


def test_padding_mask_reaches_the_decoder(model_and_batch, monkeypatch):
    """``padding_mask`` is passed on to the decoder (megatron uses it for MoE routing), not dropped."""
    model, mb = model_and_batch
    seen = []
    block_forward = model.decoder.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("padding_mask"))
        return block_forward(*args, **kwargs)

    monkeypatch.setattr(model.decoder, "forward", spy)
    padding = mb.tokens == 0  # any [b, s] bool mask
    with torch.no_grad():
        with_mask = mb.forward(model, padding_mask=padding)
        without = mb.forward(model)
    assert seen[0] is not None and torch.equal(seen[0], padding)
    assert seen[1] is None
    torch.testing.assert_close(with_mask, without, rtol=0, atol=0)  # dense layers ignore it


def test_rotary_comes_from_position_ids(model_and_batch, monkeypatch):
    """The decoder's ``rotary_pos_emb`` is ``PositionRotary(position_ids)`` (megatron built none)."""
    model, mb = model_and_batch
    seen = []
    block_forward = model.decoder.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["rotary_pos_emb"])
        return block_forward(*args, **kwargs)

    monkeypatch.setattr(model.decoder, "forward", spy)
    with torch.no_grad():
        mb.forward(model)
    torch.testing.assert_close(seen[0], model.rotary(mb.position_ids), rtol=0, atol=0)


def test_refuses_labels_and_missing_positions(model_and_batch):
    model, mb = model_and_batch
    with pytest.raises(ValueError, match="labels"):
        model(mb.tokens, mb.position_ids, None, labels=mb.tokens)
    with pytest.raises(ValueError, match="position_ids"):
        model(mb.tokens, None, None)
