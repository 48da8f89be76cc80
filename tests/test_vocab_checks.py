"""Checks that save a run (``training.vocab``): token ids beyond the model's vocabulary are refused at start
and on resume, naming dataset and checkpoint; another tokenizer than the checkpoint's gives a warning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_prefix.data.dataset import PreferenceDataset
from megatron_prefix.training.vocab import check_token_ids, tokenizer_mismatch
from tests import train_helpers as th


def _build(tmp: Path) -> Path:
    from megatron_prefix.data.builder import BuildConfig, build_dataset
    from megatron_prefix.data.units import UnitConfig

    src = tmp / "prefs.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": f"Sort {i}: c a b", "chosen": "a b c", "rejected": "c b a"})
                             for i in range(20)) + "\n")
    out = tmp / "data"
    build_dataset(BuildConfig(inputs=[str(src)], tokenizer="byte", output=str(out),
                              units=UnitConfig(max_unit_tokens=256), pack_tokens=256), log=lambda m: None)
    return out


def widened(src: Path, dst: Path, top: int = 499) -> Path:
    """A copy of the byte dataset ``src`` as a 500-id tokenizer would give it: one token rewritten to ``top``,
    ``meta.json`` saying 500 ids and another tokenizer hash (as another tokenizer's build records them)."""
    shutil.copytree(src, dst)
    tokens = np.fromfile(dst / "tokens.bin", dtype="<i4")
    tokens[5] = top
    tokens.tofile(dst / "tokens.bin")
    meta = json.loads((dst / "meta.json").read_text())
    meta["tokenizer"].update(vocab_size=top + 1, sha256="0" * 64, path="other-tokenizer")
    meta["max_token_id"] = top
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def test_max_token_id_recorded_and_read(tmp_path):
    data = _build(tmp_path)
    ds = PreferenceDataset(data)
    tokens = np.fromfile(data / "tokens.bin", dtype="<i4")
    assert ds.meta["max_token_id"] == int(tokens.max()) == ds.max_token_id()
    # a dataset built before the id was recorded: read from tokens.bin
    meta = json.loads((data / "meta.json").read_text())
    del meta["max_token_id"]
    (data / "meta.json").write_text(json.dumps(meta))
    assert PreferenceDataset(data).max_token_id() == int(tokens.max())
    first = int(ds.store.unit_offsets[1])
    assert ds.max_token_id(1) == int(tokens[:first].max())


def test_checks_name_dataset_and_checkpoint(tmp_path):
    data = _build(tmp_path)
    wide = PreferenceDataset(widened(data, tmp_path / "wide"))
    with pytest.raises(ValueError) as err:
        check_token_ids(wide, 264, "checkpoint /runs/x/iter_0000004")
    msg = str(err.value)
    assert "data.path" in msg and str(wide.path) in msg and "/runs/x/iter_0000004" in msg and "499" in msg
    check_token_ids(wide, 500, "checkpoint c")  # fits
    ds = PreferenceDataset(data)
    assert tokenizer_mismatch(ds, ds.tokenizer_info, "c") is None
    assert tokenizer_mismatch(ds, None, "c") is None  # converted checkpoints record none
    warning = tokenizer_mismatch(ds, wide.tokenizer_info, "/runs/x/iter_0000004")
    assert warning and "other-tokenizer" in warning and "/runs/x/iter_0000004" in warning and str(ds.path) in warning


def test_recorded_tokenizer_falls_back_to_the_dataset(tmp_path):
    """A checkpoint saved before the tokenizer was recorded: the ids come from its dataset's meta.json."""
    from megatron_prefix.convert.token_ids import recorded_tokenizer, tokenizer_token_ids

    data = _build(tmp_path)
    ckpt = tmp_path / "iter_0000003"
    ckpt.mkdir()
    (ckpt / "train_state.json").write_text(json.dumps({"step": 3, "config": {"data": {"path": str(data)}}}))
    assert recorded_tokenizer(ckpt) == PreferenceDataset(data).tokenizer_info
    ids, where = tokenizer_token_ids(ckpt, None)
    assert ids == {"eos_token_id": 256, "pad_token_id": 257} and str(ckpt) in where
    (ckpt / "train_state.json").write_text(json.dumps({"step": 3, "config": {"data": {"path": str(tmp_path / "x")}}}))
    assert tokenizer_token_ids(ckpt, None) == ({}, None)


@pytest.mark.slow
def test_resume_and_load_refuse_a_wider_dataset(tmp_path):
    """A run trained on the byte dataset (258 ids): resuming it, or starting from it, on a dataset with id 499
    exits 2 before any model is built; a dataset recording another tokenizer of the same size warns."""
    data = th.build_demo_dataset(tmp_path / "data", records=24)
    run = tmp_path / "run"
    recipe = th.write_recipe(tmp_path / "r.yaml", data, run, train={"max_steps": 1})
    th.train(recipe)
    state = json.loads((run / "iter_0000001" / "train_state.json").read_text())
    assert state["tokenizer"]["sha256"] == PreferenceDataset(data).tokenizer_info["sha256"]
    wide = widened(data, tmp_path / "wide")
    out = th.train(recipe, [f"data.path={wide}"], expect_rc=2)  # resume
    assert "vocab_size" in out and str(wide) in out and str(run / "iter_0000001") in out and "Traceback" not in out
    out = th.train(recipe, [f"data.path={wide}", f"checkpoint.load={run}", f"checkpoint.dir={tmp_path / 'b'}"],
                   expect_rc=2)  # start from it
    assert str(wide) in out and str(run / "iter_0000001") in out
    # same ids, another tokenizer recorded: starting from the checkpoint trains, with a warning naming both
    other = tmp_path / "other"
    shutil.copytree(data, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["tokenizer"]["sha256"] = "0" * 64
    (other / "meta.json").write_text(json.dumps(meta))
    out = th.train(recipe, [f"data.path={other}", f"checkpoint.load={run}", f"checkpoint.dir={tmp_path / 'c'}"])
    assert "warning: the dataset" in out and str(run / "iter_0000001") in out
    # the export takes the special ids of the tokenizer recorded at save (byte: EOS 256, PAD 257, no BOS)
    from megatron_prefix.convert import convert_mcore_to_hf

    cfg = json.loads((convert_mcore_to_hf(run, tmp_path / "hf", progress=False) / "config.json").read_text())
    assert (cfg["eos_token_id"], cfg["pad_token_id"], "bos_token_id" in cfg) == (256, 257, False)


def test_recipe_vocab_size_smaller_than_the_dataset_is_refused(tmp_path):
    """A recipe's model.vocab_size is never replaced silently by the dataset's (issue 12)."""
    data = _build(tmp_path)
    recipe = th.write_recipe(tmp_path / "r.yaml", data, tmp_path / "run", model=dict(th.TINY_MODEL, vocab_size=100),
                             data={"pack_tokens": 256})
    out = th.train(recipe, [], expect_rc=2)
    assert "model.vocab_size: the recipe sets 100 but the tokenizer of the dataset" in out and "258 ids" in out
    assert "Traceback" not in out
