"""The built ids are TRL 1.x ``DPOTrainer``'s (v1.0.0 to v1.9.0, ``trl/trainer/dpo_trainer.py``).

TRL's policy, written out from its source (``_prepare_dataset`` / ``tokenize_fn`` and ``data_utils._tokenize``):

- conversational: ``prompt_ids = apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)``,
  ``full = apply_chat_template(prompt + chosen, tokenize=True)``, ``chosen_ids = full[len(prompt_ids):]``;
  ``apply_chat_template`` tokenizes the rendered text with ``add_special_tokens=False``, so no BOS is added
  to a rendered chat, and no EOS is appended (the template's end-of-turn token ends the response);
- standard: ``chosen += eos_token`` unless it ends with it; ``prompt_ids = tokenizer(prompt)``,
  ``chosen_ids = tokenizer(prompt + chosen)[len(prompt_ids):]`` (special tokens added: the BOS).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_prefix.data.records import Message, PreferenceRecord
from megatron_prefix.data.tokenizers import load_tokenizer
from megatron_prefix.data.units import UnitBuilder, UnitConfig
from tests.tokenizer_fixtures import make_hf_tokenizer

BOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def chatml_bos(tmp_path_factory) -> Path:
    """A ChatML tokenizer whose post-processor adds a BOS (``tokenizer("a")`` starts with it)."""
    return make_hf_tokenizer(
        tmp_path_factory.mktemp("chatml_bos"),
        bos_post_processor=BOS,
        config={"bos_token": BOS},
    )


def chat(prompt, responses) -> PreferenceRecord:
    msgs = tuple(Message(r, c) for r, c in prompt)
    return PreferenceRecord(msgs, tuple(responses), tuple(float(-i) for i in range(len(responses))), "t", 1)


def test_chatml_with_bos_tokenizer_gets_trl_ids(chatml_bos):
    tok = load_tokenizer(str(chatml_bos))
    assert tok.add_bos and tok.encode("a", True)[0] == tok.bos_id  # the tokenizer would add a BOS
    msgs = [("system", "Be brief."), ("user", "2+2?")]
    [u] = UnitBuilder(tok).build(chat(msgs, ["4", "5"]))
    prompt_text = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    # TRL: the rendered chat tokenized without special tokens: no BOS
    assert u.prompt_ids.tolist() == tok.encode(prompt_text, False)
    assert tok.bos_id not in u.tokens().tolist()
    for i, r in enumerate(["4", "5"]):
        full = tok.encode(prompt_text + r + "<|im_end|>\n", False)
        assert u.response_ids[i].tolist() == full[u.prompt_len :]
        # ends with the template's own <|im_end|>\n, no second EOS after it
        assert u.response_ids[i].tolist() == tok.encode(r, False) + [tok.eos_id] + tok.encode("\n", False)
        assert u.response_ids[i].tolist().count(tok.eos_id) == 1


def test_chatml_ids_equal_transformers_apply_chat_template(chatml_bos):
    """The same ids as TRL's own calls into transformers (when transformers is installed)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(chatml_bos))
    msgs = [{"role": "user", "content": "Name a colour."}]
    responses = ["Blue, like the sky.", "No."]
    prompt_ids = list(
        hf.apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
    )
    [u] = UnitBuilder(load_tokenizer(str(chatml_bos))).build(chat([("user", "Name a colour.")], responses))
    assert u.prompt_ids.tolist() == prompt_ids
    for i, r in enumerate(responses):
        full = hf.apply_chat_template(
            msgs + [{"role": "assistant", "content": r}], tokenize=True, return_dict=True
        )
        assert u.response_ids[i].tolist() == list(full["input_ids"])[len(prompt_ids) :]


def test_raw_text_prompt_gets_bos_and_one_eos(chatml_bos):
    tok = load_tokenizer(str(chatml_bos))
    rec = PreferenceRecord("Q: 2+2?\nA:", (" 4", " 5<|im_end|>"), (1.0, 0.0), "t", 1)
    [u] = UnitBuilder(tok).build(rec)
    assert u.prompt_ids.tolist() == tok.encode("Q: 2+2?\nA:", True) and u.prompt_ids[0] == tok.bos_id
    # TRL appends eos_token (as text) unless the response already ends with it
    assert u.unshared_sequence(0).tolist() == tok.encode("Q: 2+2?\nA: 4<|im_end|>", True)
    assert u.unshared_sequence(1).tolist() == tok.encode("Q: 2+2?\nA: 5<|im_end|>", True)


DATED = (
    "{{ 'Today Date: ' + strftime_now('%d %b %Y') + '\\n' }}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_template_date_is_pinned(tmp_path):
    tok = load_tokenizer(str(make_hf_tokenizer(tmp_path / "d", chat_template=DATED)))
    record = chat([("user", "hi")], ["a", "b"])
    [u] = UnitBuilder(tok, UnitConfig(template_date="2024-07-26")).build(record)
    assert tok.decode(u.prompt_ids.tolist()).startswith("Today Date: 26 Jul 2024\n")
    [v] = UnitBuilder(tok, UnitConfig(template_date="2031-01-02")).build(record)
    assert tok.decode(v.prompt_ids.tolist()).startswith("Today Date: 02 Jan 2031\n")
    with pytest.raises(ValueError, match="units.template_date"):
        UnitConfig(template_date="26/07/2024").validate()


def test_build_records_the_date_and_rebuilds_identically(tmp_path):
    from tools.build_dataset import main

    tokdir = make_hf_tokenizer(tmp_path / "d", chat_template=DATED)
    src = tmp_path / "in.jsonl"
    src.write_text(
        "\n".join(
            json.dumps(
                {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": f"a{i}", "rejected": "no"}
            )
            for i in range(5)
        )
    )
    args = ["--input", str(src), "--tokenizer", str(tokdir), "--output"]
    assert main(args + [str(tmp_path / "today")]) == 0
    meta = json.loads((tmp_path / "today" / "meta.json").read_text())
    date = meta["build"]["units"]["template_date"]
    assert len(date) == 10  # today's date (UTC), recorded
    assert main(args + [str(tmp_path / "a"), "--date", "2024-07-26"]) == 0
    assert main(args + [str(tmp_path / "b"), "--date", "2024-07-26"]) == 0
    for name in ("tokens.bin", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "tokens.bin").read_bytes() != (
        tmp_path / "today" / "tokens.bin"
    ).read_bytes() or (date == "2024-07-26")
    assert main(args + [str(tmp_path / "c"), "--date", "July 26"]) == 2
