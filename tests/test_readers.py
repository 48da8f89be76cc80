"""Streaming preference readers: real files, format detection, bad-record corpus, containers, memory."""

from __future__ import annotations

import collections
import gzip
import io
import json
import tracemalloc
from pathlib import Path

import pytest

from megatron_prefix.data.formats import SKIP_REASONS, parse_transcript
from megatron_prefix.data.readers import (
    FORMATS,
    _iter_array,
    detect_format,
    open_records,
    parse_field_map,
)
from megatron_prefix.data.records import Message, PreferenceRecord, Skipped, SkipRecord
from tests.conftest import shared_file

HH = "hh-rlhf-harmless-base-test.jsonl.gz"
UF = "ultrafeedback-binarized-1k.jsonl.gz"
OASST = "oasst-ranked-multi.jsonl.gz"
SHAREGPT = "sharegpt-dpo-en-demo.json.gz"


def read_all(paths, **kw):
    """(records, skips, log lines) of ``open_records``."""
    logs: list[str] = []
    recs, skips = [], []
    for item in open_records([str(p) for p in paths], log=logs.append, **kw):
        (skips if isinstance(item, Skipped) else recs).append(item)
    return recs, skips, logs


def load_gz_jsonl(path: Path) -> list:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, rows, compress: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_array(path: Path, rows, compress: bool = False) -> Path:
    data = json.dumps(rows, indent=2).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


# --------------------------------------------------------------------------------------------- real files


def test_hh_rlhf_reads_fully():
    path = shared_file(HH)
    recs, skips, logs = read_all([path])
    assert logs == [f"{path}: format 'transcript' (auto-detected)"]
    assert len(recs) + len(skips) == 2312  # every line read is either a record or a skip
    assert len(recs) >= 2300
    lines = sorted([r.line for r in recs] + [s.line for s in skips])
    assert lines == list(range(1, 2313))
    for s in skips:
        assert s.source == str(path) and s.reason in SKIP_REASONS and s.detail
    assert collections.Counter(s.reason for s in skips) == {"empty_response": 4, "prompt_mismatch": 5}
    assert {s.line for s in skips if s.reason == "empty_response"} == {87, 517, 926, 1104}
    for r in recs:
        assert r.is_chat and r.k == 2 and r.scores == (1.0, 0.0)
        assert r.prompt[-1].role == "user" and r.prompt[0].role == "user"
        assert all(m.role in ("user", "assistant") for m in r.prompt)


def test_hh_rlhf_reconstructs_transcript_exactly():
    """prompt + response rebuilds the original transcript: no character is lost."""
    path = shared_file(HH)
    raw = load_gz_jsonl(path)
    recs, _, _ = read_all([path])
    for r in recs:
        msgs = list(r.prompt)
        for key, resp in zip(("chosen", "rejected"), r.responses):
            turns = msgs + [Message("assistant", resp)]
            text = "".join(f"\n\n{'Human' if m.role == 'user' else 'Assistant'}: {m.content}" for m in turns)
            # the single space after each colon is the only thing dropped
            assert text == raw[r.line - 1][key]


def test_ultrafeedback_reads_fully():
    path = shared_file(UF)
    recs, skips, logs = read_all([path])
    assert logs == [f"{path}: format 'pair' (auto-detected)"]
    assert len(recs) + len(skips) == 1000
    assert collections.Counter(s.reason for s in skips) == {"identical_responses": 4, "empty_response": 2}
    assert len(recs) == 994
    assert all(isinstance(r.prompt, str) and not r.is_chat and r.scores == (1.0, 0.0) for r in recs)


def test_oasst_reads_fully():
    path = shared_file(OASST)
    raw = load_gz_jsonl(path)
    recs, skips, logs = read_all([path])
    assert logs == [f"{path}: format 'ranked' (auto-detected)"]
    assert skips == [] and len(recs) == 212
    ks = [r.k for r in recs]
    assert min(ks) == 2 and max(ks) == 9
    assert sum(len(r.prompt) > 1 for r in recs) == 113  # multi-turn prompts
    for r in recs:
        src = raw[r.line - 1]
        assert r.responses == tuple(src["responses"])
        assert r.scores == tuple(-float(x) for x in src["ranks"])
        assert r.prompt[-1].role == "user"


def test_sharegpt_reads_fully():
    path = shared_file(SHAREGPT)
    recs, skips, logs = read_all([path])
    assert logs == [f"{path}: format 'sharegpt' (auto-detected)"]
    assert skips == [] and len(recs) == 300
    assert [r.line for r in recs] == list(range(1, 301))  # element index + 1
    with_system = [r for r in recs if r.prompt[0].role == "system"]
    assert len(with_system) == 80
    assert all(m.role != "system" for r in recs for m in r.prompt[1:])
    assert sum(len(r.prompt) > 2 for r in recs) > 50  # multi-turn
    assert all(r.prompt[-1].role == "user" for r in recs)


@pytest.mark.parametrize(
    "name,fmt", [(HH, "transcript"), (UF, "pair"), (OASST, "ranked"), (SHAREGPT, "sharegpt")]
)
def test_detect_format_real(name, fmt):
    assert detect_format(shared_file(name)) == fmt


def test_sharegpt_array_same_as_jsonl_variants(tmp_path):
    path = shared_file(SHAREGPT)
    with gzip.open(path, "rt") as f:
        rows = json.load(f)
    ref, _, _ = read_all([path])
    for out in (
        write_jsonl(tmp_path / "a.jsonl", rows),
        write_jsonl(tmp_path / "b.jsonl.gz", rows, compress=True),
        write_array(tmp_path / "c.json", rows),
    ):
        got, skips, _ = read_all([out])
        assert skips == [] and [strip(r) for r in got] == [strip(r) for r in ref]


def strip(r: PreferenceRecord):
    return (r.prompt, r.responses, r.scores, r.line)


# --------------------------------------------------------------------------------------------- synthetic

GOOD = {
    "pair": {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
    "transcript": {
        "chosen": "\n\nHuman: hi\n\nAssistant: good",
        "rejected": "\n\nHuman: hi\n\nAssistant: bad",
    },
    "sharegpt": {
        "conversations": [{"from": "human", "value": "hi"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    },
    "ranked": {
        "messages": [{"role": "user", "content": "hi"}],
        "responses": ["a", "b", "c"],
        "ranks": [1, 0, 2],
    },
    "alpaca": {"instruction": "Sum:", "input": "2+2", "chosen": "4", "rejected": "5"},
    "swift": {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}],
        "rejected_response": "bad",
    },
}


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


def _hh(*turns):
    return "".join(f"\n\n{who}: {text}" for who, text in turns)


# (format, expected reason, one raw line). Each line has exactly one fault.
BAD = [
    ("pair", "malformed_json", b'{"prompt": "a", "chosen": "b", '),
    ("pair", "malformed_json", b"{'prompt': 'single quotes'}"),
    ("pair", "bad_utf8", b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}'),
    ("pair", "bad_type", b"[1, 2, 3]"),
    ("pair", "missing_field", {"prompt": "a", "chosen": "b"}),
    ("pair", "missing_field", {"prompt": "a", "chosen": "b", "rejected": None}),
    ("pair", "missing_field", {"chosen": "b", "rejected": "c"}),
    ("pair", "missing_field", {"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}),
    ("pair", "bad_type", {"prompt": 3, "chosen": "b", "rejected": "c"}),
    ("pair", "bad_type", {"prompt": "a", "chosen": [_a("b")], "rejected": [_a("c")]}),
    ("pair", "bad_type", {"prompt": [_u("a")], "chosen": [_a("b"), _a("x")], "rejected": [_a("c")]}),
    ("pair", "bad_type", {"prompt": [_u("a")], "chosen": 5, "rejected": "c"}),
    ("pair", "bad_type", {"prompt": [{"role": "user", "content": ["part"]}], "chosen": "b", "rejected": "c"}),
    ("pair", "empty_prompt", {"prompt": "  \n", "chosen": "b", "rejected": "c"}),
    ("pair", "empty_prompt", {"prompt": [], "chosen": "b", "rejected": "c"}),
    ("pair", "empty_response", {"prompt": "a", "chosen": "", "rejected": "c"}),
    ("pair", "empty_response", {"prompt": [_u("a")], "chosen": [_a("b")], "rejected": [_a(" ")]}),
    ("pair", "identical_responses", {"prompt": "a", "chosen": "same", "rejected": "same"}),
    ("pair", "bad_role", {"prompt": [{"role": "wizard", "content": "a"}], "chosen": "b", "rejected": "c"}),
    ("pair", "bad_role", {"prompt": [_u("a")], "chosen": [_u("b")], "rejected": [_a("c")]}),
    ("pair", "bad_prompt", {"prompt": [_u("a"), _a("b")], "chosen": "c", "rejected": "d"}),
    (
        "pair",
        "bad_prompt",
        {"prompt": [_u("a"), {"role": "system", "content": "s"}, _u("b")], "chosen": "c", "rejected": "d"},
    ),
    ("pair", "prompt_mismatch", {"chosen": [_u("a"), _a("c")], "rejected": [_u("DIFFERENT"), _a("d")]}),
    ("pair", "bad_prompt", {"chosen": [_u("a"), _a("c")], "rejected": [_u("a")]}),
    (
        "transcript",
        "prompt_mismatch",
        {
            "chosen": _hh(("Human", "a"), ("Assistant", "x")),
            "rejected": _hh(("Human", "b"), ("Assistant", "y")),
        },
    ),
    (
        "transcript",
        "empty_response",
        {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: y"},
    ),
    (
        "transcript",
        "empty_response",
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant:  \n"},
    ),
    (
        "transcript",
        "empty_prompt",
        {"chosen": "\n\nHuman: \n\nAssistant: x", "rejected": "\n\nHuman: \n\nAssistant: y"},
    ),
    (
        "transcript",
        "bad_prompt",
        {
            "chosen": "preamble\n\nHuman: a\n\nAssistant: x",
            "rejected": "preamble\n\nHuman: a\n\nAssistant: y",
        },
    ),
    (
        "transcript",
        "bad_prompt",
        {
            "chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: b",
            "rejected": "\n\nHuman: a\n\nAssistant: x\n\nHuman: c",
        },
    ),
    (
        "transcript",
        "bad_prompt",
        {
            "chosen": "\n\nHuman: a\n\nAssistant: x\n\nAssistant: y",
            "rejected": "\n\nHuman: a\n\nAssistant: x\n\nAssistant: z",
        },
    ),
    ("transcript", "bad_type", {"chosen": 1, "rejected": "\n\nHuman: a\n\nAssistant: y"}),
    ("transcript", "missing_field", {"chosen": "\n\nHuman: a\n\nAssistant: y"}),
    (
        "transcript",
        "identical_responses",
        {"chosen": "\n\nHuman: a\n\nAssistant: y", "rejected": "\n\nHuman: a\n\nAssistant: y"},
    ),
    ("sharegpt", "bad_role", {**GOOD["sharegpt"], "conversations": [{"from": "wizard", "value": "hi"}]}),
    ("sharegpt", "bad_role", {**GOOD["sharegpt"], "chosen": {"from": "human", "value": "x"}}),
    (
        "sharegpt",
        "bad_prompt",
        {
            **GOOD["sharegpt"],
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
        },
    ),
    (
        "sharegpt",
        "bad_prompt",
        {
            **GOOD["sharegpt"],
            "system": "S",
            "conversations": [{"from": "system", "value": "T"}, {"from": "human", "value": "hi"}],
        },
    ),
    ("sharegpt", "bad_type", {**GOOD["sharegpt"], "system": 7}),
    ("sharegpt", "bad_type", {**GOOD["sharegpt"], "conversations": "hi"}),
    (
        "sharegpt",
        "missing_field",
        {
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
            "conversations": None,
        },
    ),
    ("sharegpt", "empty_response", {**GOOD["sharegpt"], "rejected": {"from": "gpt", "value": ""}}),
    ("sharegpt", "empty_prompt", {**GOOD["sharegpt"], "conversations": [{"from": "system", "value": "S"}]}),
    ("ranked", "too_few_responses", {**GOOD["ranked"], "responses": ["a"], "ranks": [0]}),
    ("ranked", "too_few_responses", {**GOOD["ranked"], "responses": [], "ranks": []}),
    ("ranked", "bad_scores", {**GOOD["ranked"], "ranks": [0, 1]}),
    ("ranked", "bad_scores", b'{"prompt": "q", "responses": ["a", "b"], "scores": [NaN, 1.0]}'),
    ("ranked", "bad_scores", b'{"prompt": "q", "responses": ["a", "b"], "scores": [Infinity, 1.0]}'),
    ("ranked", "bad_scores", {**GOOD["ranked"], "ranks": [0, 0, 0]}),
    ("ranked", "bad_scores", {**GOOD["ranked"], "responses": ["a", "a", "b"], "scores": [1.0, 2.0, 1.0]}),
    ("ranked", "identical_responses", {**GOOD["ranked"], "responses": ["a", "a"], "ranks": [0, 1]}),
    ("ranked", "bad_type", {**GOOD["ranked"], "ranks": "0,1,2"}),
    ("ranked", "bad_type", {**GOOD["ranked"], "ranks": [0, "1", 2]}),
    ("ranked", "bad_type", {**GOOD["ranked"], "ranks": [0, True, 2]}),
    ("ranked", "bad_type", {**GOOD["ranked"], "responses": "abc"}),
    ("ranked", "missing_field", {"messages": [_u("hi")], "responses": ["a", "b"]}),
    ("ranked", "missing_field", {"responses": ["a", "b"], "ranks": [0, 1]}),
    (
        "ranked",
        "missing_field",
        {**GOOD["ranked"], "responses": [{"text": "a"}, {"text": "b"}], "ranks": [0, 1]},
    ),
    ("ranked", "empty_response", {**GOOD["ranked"], "responses": ["a", "", "c"]}),
    ("ranked", "empty_prompt", {"prompt": "", "responses": ["a", "b"], "scores": [1, 2]}),
    ("ranked", "bad_role", {**GOOD["ranked"], "messages": [{"role": "narrator", "content": "x"}]}),
    ("ranked", "bad_prompt", {**GOOD["ranked"], "messages": [_u("a"), _a("b")]}),
    ("ranked", "image_unsupported", {**GOOD["ranked"], "videos": ["cat.mp4"]}),
    ("ranked", "image_count_mismatch", {**GOOD["ranked"], "images": ["cat.png"]}),
    ("ranked", "bad_image", {**GOOD["ranked"], "images": [7]}),
    ("alpaca", "missing_field", {"input": "x", "chosen": "a", "rejected": "b"}),
    ("alpaca", "bad_type", {**GOOD["alpaca"], "history": [["only one"]]}),
    ("alpaca", "bad_type", {**GOOD["alpaca"], "chosen": ["a"]}),
    ("alpaca", "identical_responses", {**GOOD["alpaca"], "rejected": "4"}),
    ("alpaca", "image_unsupported", {**GOOD["alpaca"], "instruction": "<audio>What is it?"}),
    ("alpaca", "image_count_mismatch", {**GOOD["alpaca"], "instruction": "<image>What is it?"}),
    ("alpaca", "image_in_response", {**GOOD["alpaca"], "chosen": "<image>", "images": ["a.png"]}),
    ("swift", "bad_prompt", {**GOOD["swift"], "messages": [_u("hi")]}),
    ("swift", "bad_type", {**GOOD["swift"], "rejected_response": {"content": "x"}}),
    (
        "swift",
        "image_unsupported",
        {
            **GOOD["swift"],
            "messages": [
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what?"}]},
                _a("a cat"),
            ],
        },
    ),
]


def _line(raw) -> bytes:
    return raw if isinstance(raw, bytes) else json.dumps(raw).encode()


def test_bad_corpus_covers_every_reason():
    # truncated_file is about a whole (gzip) file, not one line: tests/test_faults.py covers it
    assert {reason for _, reason, _ in BAD} == set(SKIP_REASONS) - {"truncated_file"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_corpus_one_skip_each(tmp_path, fmt):
    """Good and bad lines interleaved: one Skipped with the expected reason per bad line, no crash."""
    cases = [(reason, raw) for f, reason, raw in BAD if f == fmt]
    lines, expected = [], {}
    for reason, raw in cases:
        lines.append(json.dumps(GOOD[fmt]).encode())
        lines.append(_line(raw))
        expected[len(lines)] = reason
    lines.append(b"")  # trailing blank line: ignored
    path = tmp_path / f"bad_{fmt}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    recs, skips, logs = read_all([path])
    assert logs == [f"{path}: format '{fmt}' (auto-detected)"]
    got = {s.line: s.reason for s in skips}
    assert len(skips) == len(got) == len(cases)
    assert got == expected, [(s.line, s.reason, s.detail) for s in skips if expected.get(s.line) != s.reason]
    assert [r.line for r in recs] == [n for n in range(1, len(lines)) if n not in expected]


def test_bad_elements_in_json_array(tmp_path):
    """In an array a bad element is skipped and reading goes on; a syntax error ends the file."""
    good = json.dumps(GOOD["pair"]).encode()
    data = (
        b"["
        + b",\n".join(
            [
                good,
                b"[1, 2]",
                b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}',
                good,
                b'{"prompt": "a" "x": 1}',
                good,
            ]
        )
        + b"]"
    )
    path = tmp_path / "arr.json"
    path.write_bytes(data)
    recs, skips, _ = read_all([path], fmt="pair")
    assert [r.line for r in recs] == [1, 4]
    assert [(s.line, s.reason) for s in skips] == [(2, "bad_type"), (3, "bad_utf8"), (5, "malformed_json")]
    path.write_bytes(b"[" + good + b"," + good)  # truncated
    recs, skips, _ = read_all([path], fmt="pair")
    assert len(recs) == 2 and [(s.line, s.reason) for s in skips] == [(3, "malformed_json")]


def test_array_parser_across_chunk_boundaries():
    """Tiny buffer sizes cut elements, numbers, escapes and multi-byte characters anywhere."""
    rows = [
        {"prompt": 'é中😀 \\u00e9 "q"', "responses": ["a\\nb", "ü" * 7], "scores": [12345.678, -1e-3]},
        {"prompt": "x", "responses": ["😀 \\ud83d", "b"], "scores": [1, 20000]},
    ] * 3
    for text in (
        json.dumps(rows),
        json.dumps(rows, indent=3, ensure_ascii=False),
        "\ufeff" + json.dumps(rows),
    ):
        for chunk in (1, 2, 3, 5, 7, 64):
            got = list(_iter_array(io.BytesIO(text.encode()), chunk_chars=chunk))
            assert [v for _, v in got] == rows and [n for n, _ in got] == list(range(1, 7)), chunk
    assert list(_iter_array(io.BytesIO(b" [ ] "), chunk_chars=1)) == []


# --------------------------------------------------------------------------------------------- HH policy


def test_hh_transcript_policy():
    t = '\n\nHuman: Say "Human: hi" please\n\nAssistant: Human: hi\n\nHuman:  two spaces \n\nAssistant: ok\n  '
    msgs = parse_transcript(t, "chosen")
    assert msgs == [
        Message("user", 'Say "Human: hi" please'),
        Message("assistant", "Human: hi"),  # 'Human:' not at a turn boundary stays in the text
        Message("user", " two spaces "),  # only the single space after the colon is removed
        Message("assistant", "ok\n  "),  # trailing whitespace kept
    ]
    # a single newline before Human: is not a boundary; no space after the colon is fine
    assert parse_transcript("Human:a\nHuman: b\n\nAssistant:c", "x") == [
        Message("user", "a\nHuman: b"),
        Message("assistant", "c"),
    ]


def test_hh_record_and_empty_final_turn(tmp_path):
    rows = [
        {
            "chosen": _hh(("Human", "q"), ("Assistant", "a1"), ("Human", "q2"), ("Assistant", " Human: no")),
            "rejected": _hh(("Human", "q"), ("Assistant", "a1"), ("Human", "q2"), ("Assistant", "yes\n")),
        },
        {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: fine"},
    ]
    recs, skips, _ = read_all([write_jsonl(tmp_path / "hh.jsonl", rows)])
    assert recs[0].prompt == (Message("user", "q"), Message("assistant", "a1"), Message("user", "q2"))
    assert recs[0].responses == (" Human: no", "yes\n")
    assert [(s.line, s.reason) for s in skips] == [(2, "empty_response")]


# --------------------------------------------------------------------------------------------- API details


def test_pair_conversational_and_implicit_prompt(tmp_path):
    rows = [
        {"prompt": [{"role": "system", "content": "S"}, _u("q")], "chosen": [_a("g")], "rejected": [_a("b")]},
        {"chosen": [_u("q"), _a("x"), _u("q2"), _a("g")], "rejected": [_u("q"), _a("x"), _u("q2"), _a("b")]},
        {"prompt": [_u("q")], "chosen": "g", "rejected": {"role": "gpt", "content": "b"}},
    ]
    recs, skips, _ = read_all([write_jsonl(tmp_path / "c.jsonl", rows)])
    assert skips == []
    assert recs[0].prompt == (Message("system", "S"), Message("user", "q"))
    assert recs[1].prompt == (Message("user", "q"), Message("assistant", "x"), Message("user", "q2"))
    assert all(r.responses == ("g", "b") and r.scores == (1.0, 0.0) for r in recs)


def test_ranked_variants(tmp_path):
    rows = [
        {"prompt": "q", "responses": [{"content": "a"}, {"content": "b"}], "scores": [0.5, 2]},
        {"prompt": [_u("q")], "responses": ["a", "a", "b"], "ranks": [0, 1, 1]},  # duplicate dropped
        {"messages": [_u("q")], "responses": ["a", "b", "c"], "ranks": [0, 0, 1]},  # ties allowed
    ]
    recs, skips, _ = read_all([write_jsonl(tmp_path / "r.jsonl", rows)])
    assert skips == []
    assert recs[0].prompt == "q" and recs[0].scores == (0.5, 2.0)
    assert recs[1].responses == ("a", "b") and recs[1].scores == (-0.0, -1.0)
    assert recs[2].scores == (-0.0, -0.0, -1.0)


def test_field_map(tmp_path):
    rows = [{"question": "q", "pos": "g", "neg": "b"}]
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    with pytest.raises(ValueError, match="f.jsonl"):
        detect_format(path)
    fm = parse_field_map(" chosen=pos, rejected = neg ,prompt=question")
    assert fm == {"chosen": "pos", "rejected": "neg", "prompt": "question"}
    assert detect_format(path, fm) == "pair"
    recs, skips, _ = read_all([path], field_map=fm)
    assert skips == [] and recs[0].prompt == "q" and recs[0].responses == ("g", "b")
    recs, skips, _ = read_all(
        [write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "pos": "g"}])], fmt="pair", field_map=fm
    )
    assert skips[0].reason == "missing_field" and "'neg'" in skips[0].detail


@pytest.mark.parametrize(
    "text", ["chosen", "chosen=", "=pos", "chosen=a,,rejected=b", "chosen=a,chosen=b", "winner=a"]
)
def test_parse_field_map_rejects(text):
    with pytest.raises(ValueError):
        parse_field_map(text)


def test_parse_field_map_empty():
    assert parse_field_map("") == {} and parse_field_map("  ") == {}


def test_containers_read_the_same(tmp_path):
    """Plain/gzip x JSONL/array give the same records; gzip is found by magic bytes, not the name."""
    rows = [dict(GOOD["ranked"], responses=[f"r{i}", "s", "t"]) for i in range(50)]
    variants = [
        write_jsonl(tmp_path / "a.jsonl", rows),
        write_jsonl(tmp_path / "b.jsonl", rows, compress=True),  # gzip without .gz
        write_array(tmp_path / "c.json", rows),
        write_array(tmp_path / "d.dat", rows, compress=True),
    ]
    results = [[strip(r) for r in read_all([p])[0]] for p in variants]
    assert len(results[0]) == 50 and all(r == results[0] for r in results)
    recs, _, logs = read_all(variants)  # several files stream in order, one log line each
    assert (
        len(recs) == 200 and len(logs) == 4 and [r.source for r in recs[::50]] == [str(p) for p in variants]
    )


def test_unusable_files(tmp_path):
    with pytest.raises(ValueError, match="nope.jsonl"):
        open_records([tmp_path / "nope.jsonl"])
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD["pair"]])
    with pytest.raises(ValueError, match="unknown --format"):
        open_records([good], fmt="csv")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jsonl"):
        open_records([good, empty])
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hello"}])
    with pytest.raises(ValueError, match="odd.jsonl"):
        detect_format(odd)
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"not json\n" * 40)
    with pytest.raises(ValueError, match="junk.jsonl"):
        detect_format(junk)
    assert list(open_records([empty], fmt="pair")) == []  # explicit format: an empty file is just empty
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(
        gzip.compress(b"".join(json.dumps(GOOD["pair"]).encode() + b"\n" for _ in range(3000)))[:-200]
    )
    # a cut gzip keeps the records before the cut and counts the cut (issue 10; it used to raise)
    out = list(open_records([corrupt], fmt="pair"))
    assert out[-1].reason == "truncated_file" and out[-1].source.endswith("corrupt.jsonl.gz")
    assert sum(isinstance(r, PreferenceRecord) for r in out) > 1000
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b"x" * 100)[:10] + b"garbage" * 20)  # not a cut: broken compression
    with pytest.raises(ValueError, match="bad.jsonl.gz"):
        list(open_records([bad], fmt="pair"))


def test_skip_is_serialisable():
    s = Skipped("f.jsonl", 3, "bad_role", "x")
    assert json.loads(json.dumps(s.to_json())) == {
        "file": "f.jsonl",
        "line": 3,
        "reason": "bad_role",
        "detail": "x",
    }
    assert issubclass(SkipRecord, Exception)


# --------------------------------------------------------------------------------------------- streaming


def _peak_bytes(path: Path) -> tuple[int, int]:
    tracemalloc.start()
    try:
        n = sum(1 for _ in open_records([path], log=lambda _: None))
        return n, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("array", [False, True])
def test_memory_is_flat(tmp_path, array):
    """Peak traced memory while streaming does not grow with the number of records."""
    row = {"prompt": "p" * 100, "chosen": "c" * 100, "rejected": "r" * 100}
    sizes = (5_000, 50_000) if not array else (2_000, 20_000)
    peaks = []
    for n in sizes:
        path = tmp_path / f"m{n}.json"
        with gzip.open(path, "wb", compresslevel=1) as out:
            if array:
                out.write(b"[" + b",".join([json.dumps(row).encode()] * n) + b"]")
            else:
                out.write((json.dumps(row) + "\n").encode() * n)
        count, peak = _peak_bytes(path)
        assert count == n
        peaks.append(peak)
    assert peaks[1] < 1_000_000, peaks
    assert peaks[1] < 1.5 * peaks[0] + 100_000, peaks
