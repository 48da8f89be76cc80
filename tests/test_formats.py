"""Each supported input layout, written by the tests with the real writers, read unchanged and built.

Parquet and Arrow files are written with pyarrow exactly as Hugging Face ``datasets`` lays them out:
``to_parquet`` (one file), ``save_to_disk`` (an Arrow *stream* file ``data-00000-of-00001.arrow`` with
``dataset_info.json`` and ``state.json``), a downloaded dataset's shards (``data/train-0000N-of-00002.parquet``).
"""

from __future__ import annotations

import gzip
import json

import pytest

from megatron_prefix.data.readers import open_records
from megatron_prefix.data.records import Message, PreferenceRecord, Skipped
from tools.build_dataset import main as build_main

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


def uf_row(i: int) -> dict:
    """One row in the ``HuggingFaceH4/ultrafeedback_binarized`` layout."""
    prompt = f"Question {i}: what is {i} + {i}?"
    chosen = [_u(prompt), _a(f"It is {2 * i}.")]
    rejected = [_u(prompt), _a(f"Maybe {2 * i + 1}.")]
    return {
        "prompt": prompt,
        "prompt_id": f"id{i}",
        "chosen": chosen,
        "rejected": rejected,
        "messages": chosen,
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


def read(paths, **kw):
    items = list(open_records([str(p) for p in paths], log=lambda _: None, **kw))
    return [r for r in items if isinstance(r, PreferenceRecord)], [s for s in items if isinstance(s, Skipped)]


def test_ultrafeedback_binarized_jsonl_and_parquet(tmp_path):
    rows = [uf_row(i) for i in range(40)]
    rows[7]["rejected"] = [_u("another question"), _a("x")]  # differs before the last assistant turn
    rows[9]["prompt"] = "not the user turn"
    jsonl = tmp_path / "uf.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=16)  # 3 row groups
    assert pq.ParquetFile(parquet).num_row_groups == 3
    for path in (jsonl, parquet):
        recs, skips = read([path])
        assert len(recs) == 38 and [(s.line, s.reason) for s in skips] == [
            (8, "prompt_mismatch"),
            (10, "prompt_mismatch"),
        ]
        assert "message 0" in skips[0].detail and skips[0].source == str(path)
        r = recs[0]
        assert r.prompt == (Message("user", "Question 0: what is 0 + 0?"),)
        assert r.responses == ("It is 0.", "Maybe 1.") and r.scores == (1.0, 0.0)
        assert [x.line for x in recs[:3]] == [1, 2, 3] and recs[-1].line == 40  # rows across row groups
    jrecs, _ = read([jsonl])
    precs, _ = read([parquet])
    assert [(r.prompt, r.responses) for r in jrecs] == [(r.prompt, r.responses) for r in precs]


def test_save_to_disk_folder_and_sharded_parquet_folder(tmp_path):
    rows = [uf_row(i) for i in range(30)]
    table = pa.Table.from_pylist(rows)
    # save_to_disk: an Arrow IPC *stream* file + dataset_info.json + state.json
    disk = tmp_path / "disk"
    disk.mkdir()
    stream = disk / "data-00000-of-00001.arrow"
    with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=8):
            writer.write_batch(batch)
    (disk / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (disk / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    # a downloaded dataset: data/train-0000N-of-00002.parquet
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    pq.write_table(table.slice(0, 15), hub / "data" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(15), hub / "data" / "train-00001-of-00002.parquet")
    # the Arrow random-access file format too
    arrow_file = tmp_path / "one.arrow"
    with pa.OSFile(str(arrow_file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=7)
    want = [r.responses for r in read([disk])[0]]
    assert len(want) == 30
    assert [r.responses for r in read([hub])[0]] == want
    assert [r.responses for r in read([arrow_file])[0]] == want
    recs, _ = read([hub])
    assert recs[15].source.endswith("train-00001-of-00002.parquet") and recs[15].line == 1
    # two splits in one folder, a DatasetDict folder: refused, naming what to pass
    pq.write_table(table.slice(0, 2), hub / "data" / "test-00000-of-00001.parquet")
    with pytest.raises(ValueError, match="several splits"):
        read([hub])
    (tmp_path / "dd" / "train").mkdir(parents=True)
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(ValueError, match="DatasetDict"):
        read([tmp_path / "dd"])
    # a corrupt parquet file names itself
    bad = tmp_path / "bad.parquet"
    bad.write_bytes((tmp_path / "hub" / "data" / "train-00000-of-00002.parquet").read_bytes()[:300])
    with pytest.raises(ValueError, match="bad.parquet"):
        read([bad], fmt="pair")
    # and a build straight from the folder
    assert build_main(["--input", str(disk), "--tokenizer", "byte", "--output", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["build"]["inputs"][0]["path"].endswith("data-00000-of-00001.arrow")


def test_content_parts_are_joined_text(tmp_path):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]
    row = {"prompt": [{"role": "user", "content": parts}], "chosen": [_a("a")], "rejected": [_a("b")]}
    path = tmp_path / "parts.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    [rec], _ = read([path])
    assert rec.prompt == (Message("user", "Hello world"),)


LF_ALPACA = [
    {"instruction": "Translate to French.", "input": "cat", "chosen": "chat", "rejected": "chien"},
    {"instruction": "Say hi.", "input": "", "chosen": "hi", "rejected": "no"},
    {
        "instruction": "And now?",
        "input": "",
        "system": "Be terse.",
        "history": [["First?", "Yes."]],
        "chosen": "Now.",
        "rejected": "Later.",
    },
]


def test_llamafactory_and_swift_formats(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(LF_ALPACA))
    recs, skips = read([alpaca])
    assert not skips
    assert recs[0].prompt == (Message("user", "Translate to French.\ncat"),)  # input joined with "\n"
    assert recs[1].prompt == (Message("user", "Say hi."),)
    assert recs[2].prompt == (
        Message("system", "Be terse."),
        Message("user", "First?"),
        Message("assistant", "Yes."),
        Message("user", "And now?"),
    )
    assert recs[0].responses == ("chat", "chien")
    lf_msgs = tmp_path / "lf_messages.jsonl"
    lf_msgs.write_text(
        json.dumps({"messages": [_u("hi")], "chosen": _a("hello"), "rejected": _a("go away")}) + "\n"
    )
    [rec], _ = read([lf_msgs])
    assert rec.prompt == (Message("user", "hi"),) and rec.responses == ("hello", "go away")
    swift = tmp_path / "swift.jsonl"
    swift.write_text(
        json.dumps(
            {
                "messages": [{"role": "system", "content": "S"}, _u("hi"), _a("hello")],
                "rejected_response": "go away",
            }
        )
        + "\n"
    )
    [rec], _ = read([swift])
    assert rec.prompt == (Message("system", "S"), Message("user", "hi")) and rec.responses == (
        "hello",
        "go away",
    )


def test_image_records_are_read_and_other_media_refused_with_file_and_line(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "b", "images": ["cat.png"]},  # no placeholder
        {"prompt": "<image>What is this?", "chosen": "a cat", "rejected": "a dog", "images": ["cat.png"]},
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
            "chosen": [_a("a")],
            "rejected": [_a("b")],
            "images": ["sub/dog.jpg"],
        },
        {"prompt": "q", "chosen": "a", "rejected": "b", "images": []},  # no image: read
        {"prompt": "q", "chosen": "a", "rejected": "b", "videos": ["cat.mp4"]},
        {"prompt": "<video>q", "chosen": "a", "rejected": "b"},
        {"prompt": "<image>q", "chosen": "a <image>", "rejected": "b", "images": ["cat.png"]},
    ]
    path = tmp_path / "img.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs, skips = read([path], fmt="pair")
    assert [r.line for r in recs] == [1, 3, 4, 5]
    assert [len(r.images) for r in recs] == [0, 1, 1, 0]
    assert recs[1].images[0].path == str(tmp_path / "cat.png")
    assert recs[2].images[0].path == str(tmp_path / "sub" / "dog.jpg")
    assert recs[2].prompt[0].parts == (("image", ""), ("text", "What?"))
    assert [(s.line, s.reason) for s in skips] == [
        (2, "image_count_mismatch"), (6, "image_unsupported"), (7, "image_unsupported"), (8, "image_in_response")
    ]
    assert all(s.source == str(path) for s in skips)


def test_build_without_units_fails_and_duplicates_are_counted(tmp_path, capsys):
    empty = tmp_path / "all_bad.jsonl"
    empty.write_text(
        "".join(json.dumps({"prompt": "q", "chosen": 1, "rejected": 2}) + "\n" for _ in range(3))
    )
    out = tmp_path / "o1"
    assert (
        build_main(["--input", str(empty), "--tokenizer", "byte", "--output", str(out), "--format", "pair"])
        == 2
    )
    err = capsys.readouterr().err
    assert "no unit kept from 3 records" in err and "bad_type: 3" in err and "skipped.jsonl" in err
    dup = tmp_path / "dup.jsonl"
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3 + [
        {"prompt": "r", "chosen": "a", "rejected": "b"}
    ]
    dup.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert build_main(["--input", str(dup), "--tokenizer", "byte", "--output", str(tmp_path / "o2")]) == 0
    stats = json.loads((tmp_path / "o2" / "stats.json").read_text())
    assert stats["duplicate_records"] == 2 and stats["units"] == 4  # counted, kept
    assert "duplicate records (kept)" in capsys.readouterr().out


def test_undetectable_file_names_the_cli_flags(tmp_path):
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    assert build_main(["--input", str(odd), "--tokenizer", "byte", "--output", str(tmp_path / "o")]) == 2
    with pytest.raises(ValueError, match="--format .*--field-map"):
        read([odd])
    with pytest.raises(ValueError, match="--field-map key 'question'"):
        read([odd], field_map={"question": "prompt"})


def test_files_written_by_hf_datasets(tmp_path):
    """``Dataset.to_parquet``, ``save_to_disk`` (2 shards) and a ``DatasetDict`` folder, by ``datasets`` itself."""
    datasets = pytest.importorskip("datasets")
    rows = [uf_row(i) for i in range(20)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "uf.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"), num_shards=2)
    datasets.DatasetDict({"train_prefs": ds, "test_prefs": ds.select(range(3))}).save_to_disk(
        str(tmp_path / "dd")
    )
    want = [(r["chosen"][-1]["content"], r["rejected"][-1]["content"]) for r in rows]
    for path in (tmp_path / "uf.parquet", tmp_path / "disk", tmp_path / "dd" / "train_prefs"):
        recs, skips = read([path])
        assert not skips and [r.responses for r in recs] == want, path
    assert len({r.source for r in read([tmp_path / "disk"])[0]}) == 2  # both shards, in state.json's order
    with pytest.raises(ValueError, match="train_prefs"):
        read([tmp_path / "dd"])


def test_parquet_is_streamed_by_row_group(tmp_path):
    """Arrow memory while reading stays at about one row group, whatever the file size."""
    row = uf_row(1)
    peaks = []
    for groups in (2, 20):
        path = tmp_path / f"g{groups}.parquet"
        table = pa.Table.from_pylist([row] * (500 * groups))
        pq.write_table(table, path, row_group_size=500)
        del table
        base, peak, n = pa.total_allocated_bytes(), 0, 0
        for _ in open_records([path], log=lambda _: None):
            n += 1
            peak = max(peak, pa.total_allocated_bytes() - base)
        assert n == 500 * groups
        peaks.append(peak)
    assert peaks[1] < 2 * peaks[0] + 100_000, peaks


def test_real_ultrafeedback_in_the_hub_layout(tmp_path):
    """The shared UltraFeedback sample (string chosen/rejected), rewritten in the layout of
    ``HuggingFaceH4/ultrafeedback_binarized`` (whole conversations) as Parquet: the same records, as chats."""
    from tests.conftest import shared_file

    path = shared_file("ultrafeedback-binarized-1k.jsonl.gz")
    flat, flat_skips = read([path])
    rows = []
    with gzip.open(path, "rt") as fh:
        raw = [json.loads(line) for line in fh]
    for r in raw:
        rows.append(
            {
                "prompt": r["prompt"],
                "chosen": [_u(r["prompt"]), _a(r["chosen"])],
                "rejected": [_u(r["prompt"]), _a(r["rejected"])],
                "messages": [_u(r["prompt"]), _a(r["chosen"])],
                "score_chosen": r["metadata"]["score_chosen"],
                "score_rejected": r["metadata"]["score_rejected"],
            }
        )
    hub = tmp_path / "data"
    hub.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:500]), hub / "train_prefs-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[500:]), hub / "train_prefs-00001-of-00002.parquet")
    chats, chat_skips = read([tmp_path])
    assert len(chats) == len(flat) == 994
    assert [s.reason for s in chat_skips] == [s.reason for s in flat_skips] and len(flat_skips) == 6
    for a, b in zip(flat, chats):
        assert b.prompt == (Message("user", a.prompt),) and b.responses == a.responses
