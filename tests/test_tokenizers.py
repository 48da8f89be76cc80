"""Tokenizer kinds (byte, SentencePiece, HF tokenizer.json) and chat-template rendering."""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_prefix.data.records import Message
from megatron_prefix.data.templates import PLAIN_CHAT_TEMPLATE, TemplateError, render_template
from megatron_prefix.data.tokenizers import load_tokenizer
from tests.tokenizer_fixtures import (
    CHATML_TEMPLATE,
    cached_hf_chatml,
    cached_hf_llama3,
    cached_hf_no_template,
    cached_sentencepiece,
    make_hf_tokenizer,
    make_sentencepiece,
)

TEXTS = ["hello world", "café naïve Straße 東京 🙂", "  leading spaces\nand\ttabs\n\n", "", "x" * 300]
CHAT = [
    Message("system", "Be brief."),
    Message("user", "Hi!"),
    Message("assistant", "Hello."),
    Message("user", "What is 2+2?"),
]
DESCRIBE_KEYS = {
    "kind",
    "path",
    "vocab_size",
    "bos_id",
    "eos_id",
    "pad_id",
    "add_bos",
    "has_chat_template",
    "chat_template_sha256",
    "sha256",
}


def test_byte_tokenizer():
    tok = load_tokenizer("byte")
    assert (tok.kind, tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == ("byte", 258, 256, 257, None)
    assert tok.encode("aé", add_special=True) == [97, 0xC3, 0xA9] == tok.encode("aé", add_special=False)
    for text in TEXTS:
        assert tok.decode(tok.encode(text, True) + [256, 257]) == text
    d = tok.describe()
    assert set(d) == DESCRIBE_KEYS and d["sha256"] == load_tokenizer("byte").describe()["sha256"]
    assert not tok.has_chat_template


def test_plain_template_exact():
    tok = load_tokenizer("byte")
    assert tok.render_chat(CHAT, add_generation_prompt=True) == (
        "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\nHello.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n"
    )
    assert tok.render_chat(CHAT[1:2], add_generation_prompt=False) == "<|user|>\nHi!\n"


def test_sentencepiece_tokenizer():
    path = cached_sentencepiece()
    tok = load_tokenizer(str(path))
    assert tok.kind == "sentencepiece" and tok.vocab_size == 500
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    for text in TEXTS:
        ids = tok.encode(text, add_special=False)
        assert max(ids, default=0) < tok.vocab_size
        assert tok.encode(text, add_special=True) == [1] + ids
        assert tok.decode(ids) == text  # byte_fallback + identity normalization: exact round trip
    d = tok.describe()
    assert set(d) == DESCRIBE_KEYS and d["kind"] == "sentencepiece" and d["bos_id"] == 1
    assert not tok.has_chat_template
    assert tok.render_chat(CHAT[:2], True) == load_tokenizer("byte").render_chat(CHAT[:2], True)


def test_sentencepiece_hash_identifies_the_model(tmp_path):
    a = load_tokenizer(str(make_sentencepiece(tmp_path / "a", ["alpha beta gamma"] * 50)))
    b = load_tokenizer(str(make_sentencepiece(tmp_path / "b", ["delta epsilon zeta"] * 50)))
    assert a.describe()["sha256"] != b.describe()["sha256"]
    assert a.describe()["sha256"] == load_tokenizer(a.path).describe()["sha256"]


def test_hf_chatml_tokenizer():
    tok = load_tokenizer(str(cached_hf_chatml()))
    assert tok.kind == "hf" and tok.has_chat_template and tok.bos_id is None and not tok.add_bos
    assert (
        tok.eos_id == tok.encode("<|im_end|>", False)[0]
        and tok.pad_id == tok.encode("<|endoftext|>", False)[0]
    )
    for text in TEXTS:
        ids = tok.encode(text, add_special=True)
        assert ids == tok.encode(text, add_special=False) and tok.decode(ids) == text
    rendered = tok.render_chat(CHAT, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and rendered.endswith(
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(rendered, False)
    assert ids.count(tok.eos_id) == 4 and tok.decode(ids) == rendered  # special text -> special ids
    # no system message: the template adds its default one
    assert tok.render_chat(CHAT[1:2], False).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert set(tok.describe()) == DESCRIBE_KEYS


def test_hf_llama3_bos_from_post_processor():
    tok = load_tokenizer(str(cached_hf_llama3()))
    assert tok.add_bos and tok.bos_id is not None and tok.bos_token == "<|begin_of_text|>"
    assert tok.encode("hi", True) == [tok.bos_id] + tok.encode("hi", False)
    assert tok.eos_id == tok.encode("<|eot_id|>", False)[0]
    rendered = tok.render_chat(CHAT[1:2], add_generation_prompt=True)
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>")


def test_hf_config_variants(tmp_path):
    folder = make_hf_tokenizer(
        tmp_path / "a",
        chat_template=None,
        config={"bos_token": {"content": "<|endoftext|>"}, "add_bos_token": True},
    )
    tok = load_tokenizer(str(folder))
    assert not tok.has_chat_template and tok.add_bos and tok.encode("a", True)[0] == tok.bos_id
    assert tok.render_chat(CHAT[:2], True) == "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\n"
    # a chat_template.jinja file wins; the list form of chat_template picks "default"
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert load_tokenizer(str(folder)).render_chat(CHAT[:1], False) == "Be brief.!"
    (folder / "chat_template.jinja").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(str(folder / "tokenizer.json"))  # the file path works too
    assert tok.render_chat(CHAT[:1], False) == "D"
    assert not load_tokenizer(str(cached_hf_no_template())).has_chat_template


def test_hf_describe_hash_changes_with_template(tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(cached_hf_chatml(), folder)
    before = load_tokenizer(str(folder)).describe()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML_TEMPLATE.replace("helpful", "kind")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    after = load_tokenizer(str(folder)).describe()
    assert (
        before["sha256"] != after["sha256"]
        and before["chat_template_sha256"] != after["chat_template_sha256"]
    )


def test_hf_matches_transformers_rendering_and_ids():
    transformers = pytest.importorskip("transformers")
    for folder in (cached_hf_chatml(), cached_hf_llama3()):
        ours = load_tokenizer(str(folder))
        theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
        msgs = [{"role": m.role, "content": m.content} for m in CHAT]
        for gen in (True, False):
            text = theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert ours.render_chat(CHAT, gen) == text
        for text in TEXTS:
            assert ours.encode(text, True) == theirs(text).input_ids
            assert ours.encode(text, False) == theirs(text, add_special_tokens=False).input_ids


def test_template_errors():
    with pytest.raises(TemplateError, match="no system"):
        render_template("{{ raise_exception('no system') }}", CHAT, True)
    with pytest.raises(TemplateError, match="does not compile"):
        render_template("{% for %}", CHAT, True)
    with pytest.raises(TemplateError):  # the sandbox refuses unsafe attribute access
        render_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", CHAT, True)
    assert render_template(PLAIN_CHAT_TEMPLATE, [{"role": "user", "content": "x"}], False) == "<|user|>\nx\n"
    assert render_template("{{ {'a': '<b>'} | tojson }}", [], False) == '{"a": "<b>"}'


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path))
