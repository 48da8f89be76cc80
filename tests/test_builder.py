"""The offline builder, the on-disk store and the dataset reader (pure CPU tier)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_prefix.data.builder import BuildConfig, build_dataset
from megatron_prefix.data.dataset import PreferenceDataset
from megatron_prefix.data.readers import open_records
from megatron_prefix.data.records import PreferenceRecord
from megatron_prefix.data.row import layout_docs, pack_row
from megatron_prefix.data.tokenizers import load_tokenizer
from megatron_prefix.data.units import UnitBuilder, UnitConfig
from tests.conftest import ROOT, shared_file
from tests.tokenizer_fixtures import cached_hf_chatml, cached_sentencepiece

REAL_FILES = {
    "hh": "hh-rlhf-harmless-base-test.jsonl.gz",
    "ultrafeedback": "ultrafeedback-binarized-1k.jsonl.gz",
    "oasst": "oasst-ranked-multi.jsonl.gz",
    "sharegpt": "sharegpt-dpo-en-demo.json.gz",
}


def demo_file(tmp_path: Path, records: int = 200) -> Path:
    out = tmp_path / "demo.jsonl"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_demo_data.py"), "--output", str(out), "--records", str(records)],
        check=True, capture_output=True,
    )
    return out


def build(inputs: list[Path], out: Path, tokenizer: str = "byte", workers: int = 1, **unit_kw) -> dict:
    cfg = BuildConfig(
        inputs=[str(p) for p in inputs], tokenizer=tokenizer, output=str(out),
        units=UnitConfig(**unit_kw) if unit_kw else UnitConfig(), pack_tokens=8192, workers=workers,
    )
    return build_dataset(cfg, log=lambda _: None)


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_demo_build_stats_and_round_trip(tmp_path):
    data = demo_file(tmp_path)
    stats = build([data], tmp_path / "ds")
    for key in ("records_read", "units", "skipped", "truncated", "responses_per_unit", "unshared_tokens",
                "shared_tokens", "token_ratio", "unshared_attention_pairs", "shared_attention_pairs",
                "pack_fill", "length_percentiles"):
        assert key in stats, key
    assert stats["records_read"] == 200 and stats["units"] == 200 and stats["skipped_total"] == 0
    assert stats["token_ratio"] > 1.5  # long shared prompts: sharing saves most tokens
    assert set(stats["responses_per_unit"]) <= {"2", "3", "4"}
    # the store gives back exactly what the unit builder made, in order, with global ids
    ds = PreferenceDataset(tmp_path / "ds")
    builder = UnitBuilder(load_tokenizer("byte"), UnitConfig())
    records = [r for r in open_records([data], log=lambda _: None) if isinstance(r, PreferenceRecord)]
    for i, rec in enumerate(records[:50]):
        (expected,) = builder.build(rec)
        got = ds.get_unit(i)
        assert got.unit_id == i
        assert np.array_equal(got.prompt_ids, expected.prompt_ids)
        for a, b in zip(got.response_ids, expected.response_ids):
            assert np.array_equal(a, b)
        assert np.array_equal(got.scores, expected.scores)
    assert ds.tokenizer_info["kind"] == "byte" and ds.tokenizer_info["vocab_size"] == 258
    assert ds.meta["build"]["units"]["max_unit_tokens"] == UnitConfig().max_unit_tokens


def test_rebuild_is_byte_identical_across_runs_and_workers(tmp_path):
    data = demo_file(tmp_path, records=300)
    build([data], tmp_path / "a")
    build([data], tmp_path / "b")
    build([data], tmp_path / "c", workers=2)
    a, b, c = (tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a == c


def test_both_layouts_hold_the_same_responses(tmp_path):
    build([demo_file(tmp_path, 40)], tmp_path / "ds")
    ds = PreferenceDataset(tmp_path / "ds")
    ids = [0, 1, 2]
    shared = ds.row(ids, 8192, "shared")
    unshared = ds.row(ids, 8192, "unshared")
    for row in (shared, unshared):
        row.validate()
    assert shared.num_tokens < unshared.num_tokens
    assert shared.num_responses == unshared.num_responses
    for (s0, s1), (u0, u1) in zip(shared.resp_spans, unshared.resp_spans):
        assert np.array_equal(shared.tokens[s0:s1], unshared.tokens[u0:u1])
    assert np.array_equal(shared.resp_unit, unshared.resp_unit)
    assert np.array_equal(shared.resp_slot, unshared.resp_slot)
    assert list(ds.pack_lengths("unshared")[ids]) == [u.unshared_len for u in ds.units(ids)]


def test_split_ids_is_deterministic_and_disjoint(tmp_path):
    build([demo_file(tmp_path, 200)], tmp_path / "ds")
    ds = PreferenceDataset(tmp_path / "ds")
    train, held = ds.split_ids(0.2, seed=3)
    assert len(set(train) & set(held)) == 0 and len(train) + len(held) == len(ds)
    assert 10 < len(held) < 80
    t2, h2 = ds.split_ids(0.2, seed=3)
    assert np.array_equal(held, h2)
    with pytest.raises(ValueError, match="data.eval_fraction"):
        ds.split_ids(1.5)


def test_bad_input_is_counted_not_dropped(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"prompt": "Say hi", "chosen": "hi", "rejected": "hello"}),
        "{not json",
        json.dumps({"prompt": "Say hi", "chosen": "hi"}),
        json.dumps({"prompt": "Same", "chosen": "x", "rejected": "x"}),
        json.dumps({"prompt": "Long " * 10, "chosen": "a" * 3000, "rejected": "b" * 3000}),
    ]
    bad.write_text("\n".join(lines) + "\n")
    stats = build([bad], tmp_path / "ds", max_unit_tokens=100, truncation=False)
    assert stats["records_read"] == 5 and stats["units"] == 1
    assert stats["skipped"] == {"identical_responses": 1, "malformed_json": 1, "missing_field": 1,
                                "unit_too_long": 1}
    skipped = [json.loads(x) for x in (tmp_path / "ds" / "skipped.jsonl").read_text().splitlines()]
    assert [s["line"] for s in skipped] == [2, 3, 4, 5]
    assert all(s["file"] == str(bad) and s["reason"] for s in skipped)


def test_cli_errors_name_the_problem(tmp_path):
    tool = ROOT / "tools" / "build_dataset.py"
    proc = subprocess.run([sys.executable, str(tool), "--input", str(tmp_path / "missing.jsonl"), "--tokenizer",
                           "byte", "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "missing.jsonl" in proc.stderr
    stats_tool = ROOT / "tools" / "dataset_stats.py"
    proc = subprocess.run([sys.executable, str(stats_tool), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "stats.json" in proc.stderr
    with pytest.raises(ValueError, match="not a built dataset"):
        PreferenceDataset(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_files_build_with_a_real_tokenizer(tmp_path, name):
    path = shared_file(REAL_FILES[name])
    tok = str(cached_sentencepiece()) if name == "ultrafeedback" else str(cached_hf_chatml())
    stats = build([path], tmp_path / "ds", tokenizer=tok)
    ds = PreferenceDataset(tmp_path / "ds")
    skipped = (tmp_path / "ds" / "skipped.jsonl").read_text().splitlines()
    assert len(skipped) == stats["skipped_total"]
    assert all({"file", "line", "reason"} <= set(json.loads(s)) for s in skipped)
    assert stats["records_read"] == stats["skipped_total"] + len(set(ds.store.unit_records.tolist()))
    if name == "hh":
        assert stats["units"] >= 2300
    if name == "oasst":
        assert max(int(k) for k in stats["responses_per_unit"]) > 2
    # every unit fits and packs: rows of the whole file fill >= 0.98 at 8192 tokens
    assert stats["pack_fill"] >= 0.98, stats["pack_fill"]
    row = pack_row(layout_docs(ds.units(range(min(5, len(ds)))), "shared"), 8192 * 4, ds.pad_id)
    row.validate()
