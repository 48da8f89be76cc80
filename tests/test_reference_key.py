"""The reference cache key holds the compute dtype: an fp32 cache is never reused by a bf16 run (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train_helpers import build_demo_dataset, write_recipe


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_demo_dataset(tmp_path_factory.mktemp("refkey") / "data", records=12)


def _key(tmp_path: Path, dataset: Path, dtype: str) -> dict:
    from megatron_prefix.data.dataset import PreferenceDataset
    from megatron_prefix.training.runner import Run, parse_config

    recipe = write_recipe(tmp_path / "r.yaml", dataset, tmp_path / "run")
    run = Run.__new__(Run)  # the key needs no model: only the config, the dataset and the model config
    run.cfg = parse_config(["--config", str(recipe)], "dpo")  # validated for this CPU machine (fp32) ...
    run.cfg.train.dtype = dtype  # ... then the dtype a GPU run would resolve; the key reads only the config
    run.cuda = False
    run.dataset = PreferenceDataset(dataset, "shared")
    run.model_cfg = run.cfg.model
    return run._reference_key()


def test_reference_key_depends_on_dtype(tmp_path, dataset):
    from megatron_prefix.training.reference import key_digest

    fp32, bf16 = _key(tmp_path, dataset, "float32"), _key(tmp_path, dataset, "bfloat16")
    assert fp32["dtype"] == "float32" and bf16["dtype"] == "bfloat16"
    assert key_digest(fp32) != key_digest(bf16)  # so the default cache directories differ too
    assert key_digest(fp32) == key_digest(_key(tmp_path, dataset, "float32"))


def test_explicit_path_refuses_other_dtype(tmp_path, dataset):
    """A cache written by an fp32 run at an explicit reference.path is refused by a bf16 run."""
    import numpy as np

    from megatron_prefix.data.dataset import PreferenceDataset
    from megatron_prefix.training.reference import ReferenceCache

    ds = PreferenceDataset(dataset, "shared")
    old = ReferenceCache(tmp_path / "ref", ds, _key(tmp_path, dataset, "float32"))
    old.save_progress(np.zeros(old.num_responses), np.zeros(len(ds), dtype=bool))
    new = ReferenceCache(tmp_path / "ref", ds, _key(tmp_path, dataset, "bfloat16"))
    with pytest.raises(ValueError, match="reference.path"):
        new.check_key()
