"""Reward model (launch/train_rm.py) on real ranked data: OASST prompts with up to K = 4 responses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_prefix.data.readers import open_records
from megatron_prefix.data.records import PreferenceRecord
from tests import train_helpers as th
from tests.conftest import ROOT, shared_file
from tests.tokenizer_fixtures import make_hf_tokenizer

pytestmark = pytest.mark.slow


def test_k4_reward_model_on_oasst_beats_chance_on_held_out_pairs(tmp_path):
    src = shared_file("oasst-ranked-multi.jsonl.gz")
    records = [r for r in open_records([src], log=lambda _: None) if isinstance(r, PreferenceRecord)]
    texts = [m.content for r in records for m in r.prompt] + [x for r in records for x in r.responses]
    tokenizer = make_hf_tokenizer(tmp_path, texts=texts, vocab_size=2000)  # a real BPE, trained here
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_dataset.py"), "--input", str(src), "--tokenizer",
                    str(tokenizer), "--output", str(data), "--max-unit-tokens", "2048", "--pack-tokens", "2048",
                    "--max-responses-per-unit", "4"], check=True, capture_output=True)
    recipe = th.write_recipe(
        tmp_path / "rm.yaml", data, tmp_path / "run",
        model=dict(th.TINY_MODEL, hidden_size=64),
        loss={"type": "bt", "beta": 0.1, "pairs": "all"},
        data={"eval_fraction": 0.2, "global_batch_units": 16},
        optimizer={"lr": 3e-3, "min_lr": 3e-4, "clip_grad": 1.0},
        train={"max_steps": 20, "eval_interval": 10, "seed": 7},
    )
    th.train(recipe, task="rm")
    train, held = th.metrics(tmp_path / "run"), th.metrics(tmp_path / "run", split="eval")
    assert max(int(k) for k in json.loads((data / "stats.json").read_text())["responses_per_unit"]) == 4
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5])
    assert held[-1]["pairs"] >= 100
    # chance is 0.5; with >= 100 held-out pairs, 0.58 is about two standard deviations above it
    assert held[-1]["accuracy"] >= 0.58, held
    # the trained scalar head is in the checkpoint (a replicated [1, h] tensor)
    assert (tmp_path / "run" / "latest").is_file()
