"""Every unit of the four real preference files honours the contract, against an independent reference.

The reference re-implements TRL 1.x's ``DPOTrainer`` policy here, without ``megatron_prefix``'s tokenizers or
templates: ``transformers`` (``AutoTokenizer`` + ``apply_chat_template``) for the HF tokenizers, the
``sentencepiece`` processor for SentencePiece, ``str.encode`` and an f-string template for the byte
tokenizer. Counts (units, splits, truncations, joint-tokenization differences) are printed (``pytest -s``).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

from megatron_prefix.data.records import PreferenceRecord, SkipRecord
from megatron_prefix.data.tokenizers import load_tokenizer
from megatron_prefix.data.units import UnitBuilder, UnitConfig
from tests.conftest import shared_file
from tests.tokenizer_fixtures import make_hf_tokenizer, make_llama3_tokenizer, make_sentencepiece

HH, OASST = "hh-rlhf-harmless-base-test.jsonl.gz", "oasst-ranked-multi.jsonl.gz"
SHAREGPT, UF = "sharegpt-dpo-en-demo.json.gz", "ultrafeedback-binarized-1k.jsonl.gz"
NO_LIMIT = UnitConfig(max_unit_tokens=1 << 22)  # no truncation; splitting by response count only


@cache
def records(name: str) -> tuple[PreferenceRecord, ...]:
    from megatron_prefix.data.readers import open_records

    return tuple(
        r for r in open_records([shared_file(name)], log=lambda _: None) if isinstance(r, PreferenceRecord)
    )


def corpus(n: int = 150) -> list[str]:
    """Training text for the tiny tokenizers: a slice of the real files (so merges look like real ones)."""
    out = []
    for name in (UF, OASST):
        for r in records(name)[:n]:
            out.append(r.prompt if isinstance(r.prompt, str) else "\n".join(m.content for m in r.prompt))
            out.extend(r.responses)
    return out


@cache
def tokenizer_path(kind: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f"mp_real_{kind}_"))
    if kind == "sentencepiece":
        return make_sentencepiece(tmp, corpus(), vocab_size=1000)
    if kind == "chatml":
        return make_hf_tokenizer(tmp, corpus(), vocab_size=1000)
    return make_llama3_tokenizer(tmp, corpus())


# ---- the independent reference --------------------------------------------------------------------------


class ByteRef:
    eos, eos_text, plain = 256, None, True  # the plain template has no end-of-turn token: EOS appended

    def prompt_text(self, msgs, gen):
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in msgs) + (
            "<|assistant|>\n" if gen else ""
        )

    def ids(self, text, special):
        return list(text.encode("utf-8"))

    def chat_ids(self, msgs, gen):
        return self.ids(self.prompt_text(msgs, gen), False)


class SentencePieceRef:
    eos_text = None  # transformers would parse "</s>" as EOS; plain sentencepiece does not: append the id

    def __init__(self, path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.eos = self.sp.eos_id()

    def ids(self, text, special):
        return ([self.sp.bos_id()] if special else []) + list(self.sp.encode(text))


class TransformersRef:
    """TRL 1.x's own calls: ``tokenizer(text)`` and ``apply_chat_template(..., tokenize=True)``."""

    def __init__(self, path):
        transformers = pytest.importorskip("transformers")
        self.tok = transformers.AutoTokenizer.from_pretrained(str(path))
        self.eos, self.eos_text = self.tok.eos_token_id, self.tok.eos_token

    def prompt_text(self, msgs, gen):
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def ids(self, text, special):
        return list(self.tok(text, add_special_tokens=special).input_ids)

    def chat_ids(self, msgs, gen):
        out = self.tok.apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=gen)
        return list(out["input_ids"])


def reference(ref, record: PreferenceRecord) -> tuple[list[int], list[list[int]]] | None:
    """TRL 1.x ``DPOTrainer`` ids for ``record`` (joint tokenization sliced at the prompt's length; EOS
    appended to raw-text responses only); None where the rendered conversation does not extend the prompt."""
    if isinstance(record.prompt, str):
        prompt = ref.ids(record.prompt, True)
        resp = []
        for r in record.responses:
            if ref.eos_text is not None:  # TRL: chosen + eos_token (as text) unless it already ends with it
                full = ref.ids(record.prompt + r + ("" if r.endswith(ref.eos_text) else ref.eos_text), True)
                resp.append(full[len(prompt) :])
            else:
                resp.append(ref.ids(record.prompt + r, True)[len(prompt) :] + [ref.eos])
        return prompt, resp
    msgs = [{"role": m.role, "content": m.content} for m in record.prompt]
    text = ref.prompt_text(msgs, True)
    for r in record.responses:
        if not ref.prompt_text(msgs + [{"role": "assistant", "content": r}], False).startswith(text):
            return None
    prompt = ref.chat_ids(msgs, True)
    eos = [ref.eos] if getattr(ref, "plain", False) else []
    resp = [
        ref.chat_ids(msgs + [{"role": "assistant", "content": r}], False)[len(prompt) :] + eos
        for r in record.responses
    ]
    return prompt, resp


def make_ref(kind: str):
    if kind == "byte":
        return load_tokenizer("byte"), ByteRef()
    path = tokenizer_path(kind)
    if kind == "sentencepiece":
        return load_tokenizer(str(path)), SentencePieceRef(path)
    return load_tokenizer(str(path)), TransformersRef(path)


# ---- the contract on every unit -------------------------------------------------------------------------

CASES = [
    (HH, "byte"),
    (HH, "chatml"),
    (OASST, "byte"),
    (OASST, "chatml"),
    (OASST, "llama3"),
    (SHAREGPT, "byte"),
    (SHAREGPT, "chatml"),
    (UF, "byte"),
    (UF, "sentencepiece"),
    (UF, "llama3"),  # raw-text prompts get the post-processor's BOS, as transformers' tokenizer(prompt)
]


@pytest.mark.parametrize("name,kind", CASES)
def test_every_unit_matches_reference(name, kind):
    recs = records(name)
    tok, ref = make_ref(kind)
    builder = UnitBuilder(tok, NO_LIMIT)
    skips, ks, n_units = Counter(), Counter(), 0
    for record in recs:
        expected = reference(ref, record)
        tied_before = builder.truncated["dropped_tied_with_best"]
        try:
            units = builder.build(record)
        except SkipRecord as skip:
            skips[skip.reason] += 1
            assert expected is None or skip.reason in ("no_preference",), (record.where(), skip)
            continue
        assert expected is not None, record.where()
        prompt_ids, resp_ids = expected
        slots = set()
        for u in units:
            assert u.prompt_ids.tolist() == prompt_ids, record.where()
            for i, slot in enumerate(u.slots.tolist()):
                assert u.unshared_sequence(i).tolist() == prompt_ids + resp_ids[slot], (record.where(), slot)
                assert u.scores[i] == record.scores[slot]
            slots |= set(u.slots.tolist())
            ks[u.k] += 1
        n_units += len(units)
        tied = builder.truncated["dropped_tied_with_best"] - tied_before
        assert len(slots) + tied == record.k, record.where()  # every response is in a unit or counted
    print(
        f"\n{name} [{kind}]: {len(recs)} records -> {n_units} units, K histogram {dict(sorted(ks.items()))}, "
        f"skips {dict(skips)}, counters {dict(builder.truncated)}"
    )
    assert n_units >= len(recs) - sum(skips.values())
    if name == OASST:
        assert sum(n for k, n in ks.items() if k > 2) > 50  # ranked prompts keep their K > 2 units
        assert builder.truncated["split_records"] >= 1  # the 9-response prompt is split (8 per unit)


# ---- truncation on real data ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [SHAREGPT, OASST, HH])
def test_truncated_units_are_prefixes_of_reference(name):
    """At a small budget, units are the reference with whole leading turns dropped and tails cut."""
    tok, ref = make_ref("byte")
    limit = 1024
    builder = UnitBuilder(tok, UnitConfig(max_unit_tokens=limit))
    skips = Counter()
    for record in records(name):
        try:
            units = builder.build(record)
        except SkipRecord as skip:
            skips[skip.reason] += 1
            continue
        msgs = list(record.prompt)
        while True:  # find the shortened prompt: leading turns dropped, system and last user kept
            shorter = PreferenceRecord(tuple(msgs), record.responses, record.scores)
            prompt_ids, resp_ids = reference(ref, shorter)
            if prompt_ids == units[0].prompt_ids.tolist():
                break
            sys = 1 if msgs[0].role == "system" else 0
            nxt = [i for i, m in enumerate(msgs) if m.role == "user" and i > sys]
            assert nxt, f"{record.where()}: unit prompt is no turn-dropped version of the record's"
            msgs = msgs[:sys] + msgs[nxt[0] :]
        assert msgs[-1] == record.prompt[-1] and (
            record.prompt[0].role != "system" or msgs[0] == record.prompt[0]
        )
        for u in units:
            best = u.slots.tolist().index(int(min(u.slots, key=lambda s: (-record.scores[s], s))))
            for i, slot in enumerate(u.slots.tolist()):
                got, want = u.response_ids[i].tolist(), resp_ids[slot]
                assert got == want[: len(got)], (record.where(), slot)
                if i != best:
                    assert u.prompt_len + len(u.response_ids[best]) + len(got) <= limit
            assert u.shared_len <= limit
    print(
        f"\n{name} [byte, max_unit_tokens={limit}]: skips {dict(skips)}, counters {dict(builder.truncated)}"
    )
    assert builder.truncated["response_tail_cut"] > 0


# ---- the tokenization boundary on raw-text prompts ------------------------------------------------------


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "chatml"])
def test_joint_prefix_mismatch_is_counted_on_raw_prompts(kind):
    """TRL 1.x slices the joint ``prompt + response`` ids at the prompt's length; where a token merges
    across the boundary the joint ids do not start with the prompt's (TRL warns). The builder counts those
    responses as ``joint_prefix_mismatch``; this reports how often (UltraFeedback raw-text prompts, first 500)."""
    tok, _ = make_ref(kind)
    builder = UnitBuilder(tok, NO_LIMIT)
    differ = total = 0
    for record in records(UF)[:500]:
        [u] = builder.build(record)
        assert u.prompt_len == len(tok.encode(record.prompt, True))
        for i, slot in enumerate(u.slots.tolist()):
            joint = tok.encode(record.prompt + record.responses[slot], True) + [tok.eos_id]
            differ += joint != u.unshared_sequence(i).tolist()
            total += 1
    print(
        f"\nUltraFeedback [{kind}]: the joint ids do not start with the prompt's in {differ}/{total} "
        f"sequences ({100 * differ / total:.1f}%)"
    )
    assert total > 990 and builder.truncated["joint_prefix_mismatch"] == differ
    assert (differ == 0) == (kind == "byte")
