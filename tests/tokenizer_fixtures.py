"""Builders of tiny real tokenizers for tests (trained in well under a second each).

- ``make_sentencepiece(tmpdir, texts)``: a SentencePiece BPE model (vocab ~500, byte_fallback so any
  text encodes; BOS 1, EOS 2, PAD 3), returns the ``.model`` path.
- ``make_hf_tokenizer(tmpdir, texts, chat_template)``: a byte-level BPE ``tokenizer.json`` with the
  special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and a ``tokenizer_config.json``
  (Qwen-like: no BOS, EOS ``<|im_end|>``, PAD ``<|endoftext|>``), returns the directory.
- ``make_llama3_tokenizer(tmpdir, texts)``: the same with Llama-3 conventions: BOS ``<|begin_of_text|>``
  added by the post-processor *and* emitted by the chat template, EOS ``<|eot_id|>``.

``cached_*`` variants build once per session under a temporary folder.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

DEFAULT_TEXTS = [
    "The quick brown fox jumps over the lazy dog. How are you today? I am fine, thank you.",
    "Human: what is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "def add(a, b):\n    return a + b  # numbers 0123456789",
    "Preference data pairs a prompt with a chosen and a rejected response; rewards rank them.",
    "Unicode: café, naïve, Straße, 東京, emoji 🙂 and symbols <>{}[]()!?;:'\"",
    "You are a helpful assistant. Please answer the question below as clearly as possible.",
] * 20

_CACHE: dict[str, Path] = {}


def make_sentencepiece(
    tmpdir: Path | str, texts: Iterable[str] | None = None, vocab_size: int = 500, model_type: str = "bpe"
) -> Path:
    """Train a tiny SentencePiece model with byte_fallback into ``tmpdir``; return the ``.model`` path."""
    import sentencepiece as spm

    Path(tmpdir).mkdir(parents=True, exist_ok=True)
    prefix = Path(tmpdir) / f"sp_{model_type}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts or DEFAULT_TEXTS)),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        hard_vocab_limit=False,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
        num_threads=1,
        max_sentence_length=1 << 16,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,  # Llama-style: newlines and spaces survive
    )
    return prefix.with_suffix(".model")


def _train_bpe(texts: Sequence[str], specials: Sequence[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def make_hf_tokenizer(
    tmpdir: Path | str,
    texts: Iterable[str] | None = None,
    chat_template: str | None = CHATML_TEMPLATE,
    *,
    vocab_size: int = 500,
    specials: Sequence[str] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    config: dict | None = None,
    bos_post_processor: str | None = None,
) -> Path:
    """Train a tiny byte-level BPE and write ``tokenizer.json`` + ``tokenizer_config.json`` into a folder.

    ``config`` overrides the Qwen-like defaults (eos ``<|im_end|>``, pad ``<|endoftext|>``, no BOS);
    ``bos_post_processor`` names a token the post-processor prepends (Llama-3 style).
    """
    from tokenizers import processors

    folder = Path(tmpdir) / "hf_tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    tok = _train_bpe(list(texts or DEFAULT_TEXTS), specials, vocab_size)
    if bos_post_processor:
        bos_id = tok.token_to_id(bos_post_processor)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_post_processor} $A",
            pair=f"{bos_post_processor} $A {bos_post_processor} $B",
            special_tokens=[(bos_post_processor, bos_id)],
        )
    tok.save(str(folder / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 1 << 20,
    }
    cfg.update(config or {})
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def make_llama3_tokenizer(tmpdir: Path | str, texts: Iterable[str] | None = None) -> Path:
    """A Llama-3-style HF tokenizer: BOS from the post-processor and from the template, EOS ``<|eot_id|>``."""
    specials = (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    )
    return make_hf_tokenizer(
        Path(tmpdir) / "llama3",
        texts,
        LLAMA3_TEMPLATE,
        specials=specials,
        bos_post_processor="<|begin_of_text|>",
        config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"},
    )


def _cached(key: str, build) -> Path:
    if key not in _CACHE:
        _CACHE[key] = build(Path(tempfile.mkdtemp(prefix=f"mp_tok_{key}_")))
    return _CACHE[key]


def cached_sentencepiece() -> Path:
    """``make_sentencepiece`` on the default corpus, built once per process."""
    return _cached("sp", make_sentencepiece)


def cached_hf_chatml() -> Path:
    """``make_hf_tokenizer`` (ChatML template) on the default corpus, built once per process."""
    return _cached("chatml", make_hf_tokenizer)


def cached_hf_llama3() -> Path:
    """``make_llama3_tokenizer`` on the default corpus, built once per process."""
    return _cached("llama3", make_llama3_tokenizer)


def cached_hf_no_template() -> Path:
    """A HF tokenizer without a chat template (uses the plain one), built once per process."""
    return _cached("notmpl", lambda d: make_hf_tokenizer(d, chat_template=None))
