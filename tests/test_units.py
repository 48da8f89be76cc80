"""Records -> units on synthetic records: the tokenization contract, truncation and splitting rules."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_prefix.data.records import Message, PreferenceRecord, SkipRecord
from megatron_prefix.data.tokenizers import load_tokenizer
from megatron_prefix.data.units import UnitBuilder, UnitConfig, drop_first_turn, tail_cap
from tests.tokenizer_fixtures import (
    cached_hf_chatml,
    cached_hf_llama3,
    cached_sentencepiece,
    make_hf_tokenizer,
)

BYTE = load_tokenizer("byte")
EOS = 256


def rec(prompt, responses, scores=None) -> PreferenceRecord:
    if not isinstance(prompt, str):
        prompt = tuple(Message(*m) for m in prompt)
    scores = tuple(float(s) for s in (scores if scores is not None else range(len(responses), 0, -1)))
    return PreferenceRecord(prompt, tuple(responses), scores, "synthetic", 1)


def b(text: str) -> list[int]:
    return list(text.encode())


def plain(msgs, gen: bool) -> str:
    """The plain template, written out independently of templates.py."""
    return "".join(f"<|{r}|>\n{c}\n" for r, c in msgs) + ("<|assistant|>\n" if gen else "")


# ---- the contract ------------------------------------------------------------------------------------


def test_standard_prompt_byte():
    [u] = UnitBuilder(BYTE).build(rec("Q?", ["yes", "no way"], [1, 0]))
    assert u.prompt_ids.tolist() == b("Q?") and u.unit_id == -1 and u.slots.tolist() == [0, 1]
    assert u.unshared_sequence(0).tolist() == b("Q?") + b("yes") + [EOS]
    assert u.unshared_sequence(1).tolist() == b("Q?") + b("no way") + [EOS]
    assert u.scores.tolist() == [1.0, 0.0]


def test_standard_prompt_sentencepiece_single_bos():
    tok = load_tokenizer(str(cached_sentencepiece()))
    [u] = UnitBuilder(tok).build(rec("The quick fox", [" jumps over", "sleeps"], [2, 1]))
    assert u.prompt_ids.tolist() == [tok.bos_id] + tok.encode("The quick fox", False)
    joint = tok.encode("The quick fox jumps over", True)  # TRL 1.x: the joint ids sliced at the prompt
    assert u.response_ids[0].tolist() == joint[u.prompt_len :] + [tok.eos_id]
    assert int(np.sum(u.tokens() == tok.bos_id)) == 1


@pytest.mark.parametrize("system", [True, False])
def test_chat_byte_multi_turn(system):
    msgs = ([("system", "Be nice.")] if system else []) + [
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "2+2?"),
    ]
    [u] = UnitBuilder(BYTE).build(rec(msgs, ["4", "5"], [1, 0]))
    p = plain(msgs, True)
    assert u.prompt_ids.tolist() == b(p)
    for i, r in enumerate(["4", "5"]):
        full = plain(msgs + [("assistant", r)], False)
        assert full.startswith(p)
        assert u.unshared_sequence(i).tolist() == b(p) + b(full[len(p) :]) + [EOS]


def test_chat_plain_template_sentencepiece_one_bos_and_eos():
    """The plain template writes no BOS/end-of-turn: the tokenizer's BOS is added and EOS appended."""
    tok = load_tokenizer(str(cached_sentencepiece()))
    [u] = UnitBuilder(tok).build(rec([("user", "Hi")], ["Hey", "Go away"], [1, 0]))
    p = plain([("user", "Hi")], True)
    assert u.prompt_ids.tolist() == tok.encode(p, True) and u.prompt_ids[0] == tok.bos_id
    joint = tok.encode(plain([("user", "Hi"), ("assistant", "Hey")], False), True)
    assert u.response_ids[0].tolist() == joint[u.prompt_len :] + [tok.eos_id]
    assert int(np.sum(u.tokens() == tok.bos_id)) == 1


def test_chat_chatml_no_eos_after_turn_end():
    tok = load_tokenizer(str(cached_hf_chatml()))
    msgs = [("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?")]
    [u] = UnitBuilder(tok).build(rec(msgs, ["4", "5"], [1, 0]))
    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert u.prompt_ids.tolist() == tok.encode(prompt, False)
    # response text "4<|im_end|>\n" and no second EOS (= <|im_end|>): TRL 1.x appends none to chats
    assert u.response_ids[0].tolist() == tok.encode(prompt + "4<|im_end|>\n", False)[u.prompt_len :]
    assert u.response_ids[0].tolist() == tok.encode("4<|im_end|>\n", False)


def test_chat_llama3_single_bos_and_no_double_eos():
    tok = load_tokenizer(str(cached_hf_llama3()))
    [u] = UnitBuilder(tok).build(rec([("user", "Hi")], ["Hey", "Go away"], [1, 0]))
    assert u.prompt_ids[0] == tok.bos_id and int(np.sum(u.prompt_ids == tok.bos_id)) == 1
    assert u.response_ids[0].tolist() == tok.encode("Hey<|eot_id|>", False)  # already ends in EOS
    assert u.response_ids[0][-1] == tok.eos_id and u.response_ids[0][-2] != tok.eos_id
    # a raw-text prompt gets the BOS from encode(add_special=True)
    [u] = UnitBuilder(tok).build(rec("Hi", ["Hey", "Go away"], [1, 0]))
    assert u.prompt_ids.tolist() == [tok.bos_id] + tok.encode("Hi", False)


def test_response_ids_are_the_joint_ids_sliced_at_the_prompt():
    """TRL 1.x: response ids are the tail of ``tokenizer(prompt + response)`` past ``len(prompt_ids)``,
    also where a token merges across the boundary (TRL warns; counted as ``joint_prefix_mismatch``)."""
    tok = load_tokenizer(str(cached_sentencepiece()))
    prompt, resp = "How are yo", "u today"  # joint: "you" is one piece across the boundary
    builder = UnitBuilder(tok)
    [u] = builder.build(rec(prompt, [resp, "urs truly"], [1, 0]))
    p = tok.encode(prompt, True)
    joint = tok.encode(prompt + resp, True)
    assert u.unshared_sequence(0).tolist() == p + joint[len(p) :] + [tok.eos_id]
    assert joint[: len(p)] != p and builder.truncated["joint_prefix_mismatch"] == 2
    [u] = builder.build(rec("How are", [" you", " we"], [1, 0]))  # a clean boundary: the joint ids
    assert u.unshared_sequence(0).tolist() == tok.encode("How are you", True) + [tok.eos_id]
    assert builder.truncated["joint_prefix_mismatch"] == 2


def test_template_prefix_mismatch_and_template_error(tmp_path):
    weird = make_hf_tokenizer(
        tmp_path / "w",
        chat_template=(
            "{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}GEN{% endif %}"
        ),
    )
    with pytest.raises(SkipRecord) as err:
        UnitBuilder(load_tokenizer(str(weird))).build(rec([("user", "a")], ["x", "y"]))
    assert err.value.reason == "template_prefix_mismatch"
    strict = make_hf_tokenizer(tmp_path / "s", chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(SkipRecord) as err:
        UnitBuilder(load_tokenizer(str(strict))).build(rec([("user", "a")], ["x", "y"]))
    assert err.value.reason == "template_error" and "alternate" in err.value.detail


def test_record_level_skips():
    builder = UnitBuilder(BYTE)
    for record, reason in [
        (rec("", ["a", "b"]), "empty_prompt"),
        (rec("q", ["a"], [1]), "too_few_responses"),
        (rec("q", ["a", "b", "c"], [1, 1, 1]), "no_preference"),
    ]:
        with pytest.raises(SkipRecord) as err:
            builder.build(record)
        assert err.value.reason == reason
    with pytest.raises(SkipRecord) as err:
        UnitBuilder(BYTE, UnitConfig(min_response_tokens=3)).build(rec("q", ["a", "bcd"]))
    assert err.value.reason == "too_few_responses"


def test_config_validation_names_the_field():
    for kwargs, name in [
        ({"max_unit_tokens": 2}, "units.max_unit_tokens"),
        ({"max_responses_per_unit": 1}, "units.max_responses_per_unit"),
        ({"min_response_tokens": 0}, "units.min_response_tokens"),
        ({"truncation": "yes"}, "units.truncation"),
    ]:
        with pytest.raises(ValueError, match=name):
            UnitBuilder(BYTE, UnitConfig(**kwargs))
    with pytest.raises(ValueError, match="data.units.max_unit_tokens"):
        UnitConfig(max_unit_tokens=0).validate("data.units")


# ---- truncation ---------------------------------------------------------------------------------------


def test_drop_first_turn_rule():
    m = [
        Message(r, c)
        for r, c in [
            ("system", "S"),
            ("user", "u1"),
            ("assistant", "a1"),
            ("user", "u2"),
            ("assistant", "a2"),
            ("user", "u3"),
        ]
    ]
    assert [x.content for x in drop_first_turn(m)] == ["S", "u2", "a2", "u3"]
    assert [x.content for x in drop_first_turn(drop_first_turn(m))] == ["S", "u3"]
    assert drop_first_turn(drop_first_turn(drop_first_turn(m))) is None
    assert drop_first_turn(m[1:2]) is None


def test_tail_cap():
    assert tail_cap(10, 5, 5, 100) == 5  # fits: nothing to cut
    assert tail_cap(10, 5, 100, 30) == 15  # only the long one is cut, to what is left after the short
    assert tail_cap(10, 50, 100, 30) == 10  # both cut to the same cap
    assert tail_cap(29, 5, 5, 30) == 0


def test_truncation_drops_prompt_turns_first():
    msgs = [
        ("system", "SYS"),
        ("user", "u" * 40),
        ("assistant", "a" * 40),
        ("user", "v" * 40),
        ("assistant", "b" * 40),
        ("user", "last?"),
    ]
    builder = UnitBuilder(BYTE, UnitConfig(max_unit_tokens=120))
    [u] = builder.build(rec(msgs, ["yes", "no"], [1, 0]))
    kept = [msgs[0], msgs[-1]]
    assert u.prompt_ids.tolist() == b(plain(kept, True))
    assert u.unshared_sequence(0).tolist() == b(plain(kept, True)) + b("yes\n") + [EOS]
    assert builder.truncated["prompt_turns_dropped"] == 2 and builder.truncated["prompt_truncated"] == 1
    assert builder.truncated["response_tail_cut"] == 0
    # with a larger budget only one turn goes
    builder = UnitBuilder(BYTE, UnitConfig(max_unit_tokens=200))
    [u] = builder.build(rec(msgs, ["yes", "no"], [1, 0]))
    assert u.prompt_ids.tolist() == b(plain([msgs[0]] + msgs[3:], True))
    assert builder.truncated["prompt_turns_dropped"] == 1


def test_truncation_cuts_response_tails_without_eos():
    builder = UnitBuilder(BYTE, UnitConfig(max_unit_tokens=30))
    units = builder.build(rec("0123456789", ["a" * 50, "short", "b" * 8], [3, 2, 1]))
    # budget 20; best is 51 tokens, the longest other 9 ("b"*8 + EOS): best is cut to 11
    assert [u.slots.tolist() for u in units] == [[0, 1], [0, 2]]  # 11 + 6 + 9 > 20: split in two
    assert [u.response_lens.tolist() for u in units] == [[11, 6], [11, 9]]
    assert units[0].response_ids[0].tolist() == b("a" * 11)  # cut: no EOS re-added
    assert units[0].response_ids[1][-1] == EOS and units[1].response_ids[1][-1] == EOS
    assert builder.truncated["response_tail_cut"] == 1 and builder.truncated["split_units"] == 2
    assert all(u.shared_len <= 30 for u in units)
    # both cut to one cap when neither fits beside the other
    builder = UnitBuilder(BYTE, UnitConfig(max_unit_tokens=30))
    [u] = builder.build(rec("0123456789", ["a" * 50, "b" * 50], [1, 0]))
    assert u.response_lens.tolist() == [10, 10] and builder.truncated["response_tail_cut"] == 2


def test_truncation_skips_what_cannot_fit():
    with pytest.raises(SkipRecord) as err:
        UnitBuilder(BYTE, UnitConfig(max_unit_tokens=30)).build(rec("p" * 29, ["a", "b"]))
    assert err.value.reason == "unit_too_long"
    with pytest.raises(SkipRecord) as err:  # responses would fall under min_response_tokens
        UnitBuilder(BYTE, UnitConfig(max_unit_tokens=30, min_response_tokens=5)).build(
            rec("p" * 22, ["a" * 9, "b" * 9])
        )
    assert err.value.reason == "unit_too_long"
    with pytest.raises(SkipRecord) as err:  # truncation off
        UnitBuilder(BYTE, UnitConfig(max_unit_tokens=30, truncation=False)).build(rec("p", ["a" * 40, "b"]))
    assert err.value.reason == "unit_too_long" and "truncation off" in err.value.detail
    [u] = UnitBuilder(BYTE, UnitConfig(max_unit_tokens=30, truncation=False)).build(rec("p", ["a" * 10, "b"]))
    assert u.shared_len == 1 + 11 + 2


# ---- splitting ----------------------------------------------------------------------------------------


def test_split_by_response_count():
    scores = [5, 9, 1, 7, 3, 8, 2, 6, 4, 0]  # best is slot 1
    responses = [f"r{i}" for i in range(10)]
    builder = UnitBuilder(BYTE, UnitConfig(max_responses_per_unit=4))
    units = builder.build(rec("q", responses, scores))
    # rank order: 1, 5, 3, 7, 0, 8, 4, 6, 2, 9 -> [1,5,3,7] [1,0,8,4] [1,6,2,9]
    assert [u.slots.tolist() for u in units] == [[1, 3, 5, 7], [0, 1, 4, 8], [1, 2, 6, 9]]
    for u in units:
        assert u.k <= 4 and 1 in u.slots.tolist() and u.unit_id == -1
        assert u.scores.max() == 9 and (u.scores < 9).any()
        for i, slot in enumerate(u.slots.tolist()):
            assert u.unshared_sequence(i).tolist() == b("q") + b(responses[slot]) + [EOS]
            assert u.scores[i] == scores[slot]
    assert builder.truncated["split_records"] == 1 and builder.truncated["split_units"] == 3
    covered = set().union(*[set(u.slots.tolist()) for u in units])
    assert covered == set(range(10))


def test_split_by_token_budget():
    builder = UnitBuilder(BYTE, UnitConfig(max_unit_tokens=40))
    units = builder.build(rec("q", ["a" * 9, "b" * 9, "c" * 9, "d" * 9, "e" * 9], [5, 4, 3, 2, 1]))
    assert [u.slots.tolist() for u in units] == [[0, 1, 2], [0, 3, 4]]  # 1 + 3*10 <= 40 < 1 + 4*10
    assert all(u.shared_len <= 40 for u in units)
    assert builder.truncated["split_units"] == 2


def test_groups_tied_with_best_are_dropped_and_counted():
    builder = UnitBuilder(BYTE, UnitConfig(max_responses_per_unit=2))
    units = builder.build(rec("q", ["a", "b", "c", "d"], [1, 1, 1, 0]))
    # rank order a, b, c, d -> [a,b] (tied: dropped) [a,c] (tied: dropped) [a,d]
    assert [u.slots.tolist() for u in units] == [[0, 3]]
    assert builder.truncated["dropped_tied_with_best"] == 2
    assert builder.skipped_responses == {"tied_with_best": 2}
    assert builder.truncated["split_units"] == 0  # one useful unit: not a split


def test_min_response_tokens_drops_short_responses():
    builder = UnitBuilder(BYTE, UnitConfig(min_response_tokens=3))
    [u] = builder.build(rec("q", ["ab", "", "x", "abc"], [3, 2, 1, 0]))
    assert u.slots.tolist() == [0, 3]
    assert builder.skipped_responses["response_too_short"] == 2


def test_joint_tokenization_differs_sometimes(capsys):
    """How often joint tokenization of prompt + response text differs from the separate (TRL) policy."""
    tok = load_tokenizer(str(cached_sentencepiece()))
    pairs = [
        ("What is", " the answer?"),
        ("Say hi:", "hi"),
        ("Question\n", "Answer"),
        ("a b", " c"),
        ("Tell me", "a story"),
        ("Hello", "!"),
    ]
    differ = sum(tok.encode(p + r, True) != tok.encode(p, True) + tok.encode(r, False) for p, r in pairs)
    print(f"sentencepiece, synthetic pairs: joint tokenization differs in {differ}/{len(pairs)}")
    assert differ > 0
