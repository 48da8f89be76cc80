"""Records -> units: the tokenization policy, truncation, and splitting of many-response prompts.

Tokenization policy: TRL 1.x ``DPOTrainer`` exactly (checked against TRL v1.9.0, unchanged since v1.0.0;
``docs/tokenization.md`` has the full text). The prompt is tokenized on its own, each response as the tail
of the tokenized prompt + response (joint tokenization, sliced at the prompt's length):

- standard (string) prompt: ``prompt_ids = encode(prompt, add_special=True)`` (BOS if the tokenizer adds
  one); ``full = encode(prompt + response, add_special=True)`` and ``response_ids = full[len(prompt_ids):]``
  plus EOS unless the response text already ends with the EOS text (TRL appends ``eos_token`` as text).
- conversational prompt: ``prompt_text = render_chat(prompt, add_generation_prompt=True)``, ``full_i =
  render_chat(prompt + [assistant: response_i], add_generation_prompt=False)``; both are tokenized *without*
  special tokens (no BOS added: a template writes its own); ``response_ids = encode(full_i)[len(prompt_ids):]``
  and no EOS is appended (the template's end-of-turn text ends the response), except with the plain template
  (a tokenizer without a template of its own, which TRL refuses), which writes no BOS and no end-of-turn
  token: there the tokenizer's BOS is added (as for raw text) and EOS is appended. A ``full_i`` that does not
  start with ``prompt_text`` skips the record (``template_prefix_mismatch``; TRL warns and slices anyway).

Where the joint ids do not start with ``prompt_ids`` (a token merged across the boundary), TRL warns and
slices anyway; so do we, counting ``joint_prefix_mismatch`` (responses) in ``truncated``. So for every unit
and every i, ``unit.unshared_sequence(i)`` is exactly TRL's ``prompt_ids + chosen_ids`` (after truncation,
a prefix of it; see below).

Fitting a record into ``max_unit_tokens`` (``UnitBuilder.build``), with responses ranked by score,
descending and stable, ``best`` the first: every unit holds ``best`` plus at least one other response, so
the record fits when ``P + len(best) + len(longest other) <= max_unit_tokens``. When it does not:

1. (``truncation`` on, conversational prompt) drop whole turns from the left of the prompt, one at a time
   (a turn = a user message and the messages up to the next user message), never the leading system
   message nor the last user message; re-render; count ``prompt_turns_dropped`` (turns) and
   ``prompt_truncated`` (records).
2. cut response tails to a common cap ``c``, the largest with ``P + min(len(best), c) + min(len(longest
   other), c) <= max_unit_tokens``; every response longer than ``c`` is cut to ``c`` tokens and does *not*
   get an EOS re-added (like TRL's ``max_completion_length``); count ``response_tail_cut`` (responses).
3. if ``c < min_response_tokens`` (or truncation is off) the record is skipped: ``unit_too_long``.

Splitting: responses are grouped in rank order; a group starts as ``[best, next]`` and takes the following
responses while it has fewer than ``max_responses_per_unit`` and its tokens fit; then a new group starts
with ``best`` again. A group whose responses all tie with ``best`` carries no preference and is dropped
(its responses counted in ``truncated["dropped_tied_with_best"]``). A record giving several units counts
``split_records`` (records) and ``split_units`` (the units they gave). Inside a unit, responses keep their
original order and ``slots`` are their original indices; ``unit_id`` is -1 (assigned later).

Images (``UnitBuilder(..., images=ImageSpec)``, see ``docs/vision.md``): the prompt is rendered and
tokenized as above (a chat template that takes content-part lists gets them, see
``Tokenizer.takes_parts``); the tokenized prompt must hold one image token (``image_token_id``) per image
(else ``image_count_mismatch``) and no response may hold one (``image_in_response``); then every image
token becomes ``tokens_per_image`` copies, as ``LlavaProcessor`` expands ``<image>`` in the text, so the
image tokens are ordinary prompt tokens for the length limits and statistics. Responses are sliced off
the joint tokenization before the expansion, so they are the same as without images. Truncation never
cuts inside an image: dropping a prompt turn drops the images of its messages too (counted in
``prompt_images_dropped``), the prompt is otherwise never cut, and response tails (which hold no image
token) are the only token-level cut. The images left are decoded and preprocessed once per record
(``images.load_pixels``; an unreadable one skips the record as ``bad_image``) and every unit of the
record carries them (``Unit.images``, in token order).

Pure Python + numpy + PIL: no torch, no megatron.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_prefix.config import require
from megatron_prefix.data.records import Message, PreferenceRecord, Prompt, SkipRecord
from megatron_prefix.data.images import ImageSpec, load_pixels
from megatron_prefix.data.templates import TemplateError, parse_template_date
from megatron_prefix.data.tokenizers import Tokenizer
from megatron_prefix.data.unit import Unit


@dataclass
class UnitConfig:
    """How records become units."""

    max_unit_tokens: int = 4096  # prompt + all responses of one unit
    max_responses_per_unit: int = 8  # more responses are split into several units
    min_response_tokens: int = 1  # a response cut below this skips the record (unit_too_long)
    truncation: bool = True  # off: a record that does not fit is skipped (unit_too_long)
    template_date: str | None = None  # YYYY-MM-DD a chat template's strftime_now prints; None: today

    def validate(self, prefix: str = "units") -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        require(
            isinstance(self.max_responses_per_unit, int) and self.max_responses_per_unit >= 2,
            f"{prefix}.max_responses_per_unit",
            f"must be an int >= 2, got {self.max_responses_per_unit!r}",
        )
        require(
            isinstance(self.min_response_tokens, int) and self.min_response_tokens >= 1,
            f"{prefix}.min_response_tokens",
            f"must be an int >= 1, got {self.min_response_tokens!r}",
        )
        least = 1 + 2 * (self.min_response_tokens if isinstance(self.min_response_tokens, int) else 1)
        require(
            isinstance(self.max_unit_tokens, int) and self.max_unit_tokens >= least,
            f"{prefix}.max_unit_tokens",
            f"must be an int >= {least} (a prompt token and two responses of "
            f"min_response_tokens), got {self.max_unit_tokens!r}",
        )
        require(
            isinstance(self.truncation, bool),
            f"{prefix}.truncation",
            f"must be true or false, got {self.truncation!r}",
        )
        if self.template_date is not None:
            try:
                parse_template_date(self.template_date)
            except ValueError as err:
                require(False, f"{prefix}.template_date", str(err))


def tokenize_record(
    tok: Tokenizer, prompt: Prompt, responses: Sequence[str], mismatches: Counter[str] | None = None
) -> tuple[list[int], list[list[int]]]:
    """The tokenization policy (module docstring): ``(prompt_ids, [response_ids...])``.

    ``mismatches["joint_prefix_mismatch"]`` counts responses whose joint ids do not start with the prompt's.
    Raises ``SkipRecord`` (``template_prefix_mismatch``, ``template_error``).
    """
    if isinstance(prompt, str):
        prompt_ids = tok.encode(prompt, add_special=True)
        fulls = [tok.encode(prompt + r, add_special=True) for r in responses]
        ends = [bool(tok.eos_token) and r.endswith(tok.eos_token) for r in responses]
    else:
        messages = list(prompt)
        try:
            prompt_text = tok.render_chat(messages, add_generation_prompt=True, parts=True)
            texts = [
                tok.render_chat(messages + [Message("assistant", r)], add_generation_prompt=False, parts=True)
                for r in responses
            ]
        except TemplateError as err:
            raise SkipRecord("template_error", str(err)) from err
        for i, full in enumerate(texts):
            if not full.startswith(prompt_text):
                raise SkipRecord(
                    "template_prefix_mismatch",
                    f"response {i}: the rendered conversation does not start with the rendered prompt",
                )
        # A tokenizer's own template writes its BOS and ends a response with its end-of-turn text: no BOS
        # and no EOS are added (TRL 1.x). The plain template (no template of the tokenizer's own, which TRL
        # refuses) writes neither: the tokenizer's BOS is added, as for raw text, and EOS is appended.
        plain = not tok.has_chat_template
        prompt_ids = tok.encode(prompt_text, add_special=plain)
        fulls = [tok.encode(t, add_special=plain) for t in texts]
        ends = [not plain] * len(texts)
    n = len(prompt_ids)
    resp = []
    for full, has_eos in zip(fulls, ends):
        if mismatches is not None and full[:n] != prompt_ids:
            mismatches["joint_prefix_mismatch"] += 1
        resp.append(full[n:] if has_eos else full[n:] + [tok.eos_id])
    return prompt_ids, resp


def drop_first_turn_indices(messages: Sequence[Message]) -> list[int] | None:
    """Indices of the messages kept by ``drop_first_turn``; None when nothing can be dropped."""
    msgs = list(messages)
    start = 1 if msgs and msgs[0].role == "system" else 0
    users = [i for i, m in enumerate(msgs) if m.role == "user" and i > start]
    if not users:
        return None
    return list(range(start)) + list(range(users[0], len(msgs)))


def drop_first_turn(messages: Sequence[Message]) -> list[Message] | None:
    """The prompt without its oldest turn (keeping a leading system message and the last user message).

    A turn is the messages from the first non-system message up to (excluding) the next user message.
    Returns None when nothing can be dropped.
    """
    keep = drop_first_turn_indices(messages)
    return None if keep is None else [messages[i] for i in keep]


def expand_image_tokens(
    prompt_ids: list[int], responses: Sequence[Sequence[int]], num_images: int, spec: ImageSpec
) -> list[int]:
    """Check the image tokens (one per image in the prompt, none in a response) and expand each into
    ``spec.tokens_per_image`` copies; raises ``SkipRecord`` (``image_in_response``,
    ``image_count_mismatch``)."""
    tid = spec.image_token_id
    for i, r in enumerate(responses):
        if tid in r:
            raise SkipRecord("image_in_response", f"response {i} holds the image token {tid}")
    found = prompt_ids.count(tid)
    if found != num_images:
        raise SkipRecord(
            "image_count_mismatch",
            f"the tokenized prompt holds {found} image token(s) (id {tid}, {spec.image_token!r}) for "
            f"{num_images} image(s); does the chat template write {spec.image_token!r} for an image part?",
        )
    if not found:
        return prompt_ids
    out: list[int] = []
    for t in prompt_ids:
        if t == tid:
            out.extend([tid] * spec.tokens_per_image)
        else:
            out.append(t)
    return out


def tail_cap(prompt_len: int, best_len: int, other_len: int, max_tokens: int) -> int:
    """Largest ``c`` with ``prompt_len + min(best_len, c) + min(other_len, c) <= max_tokens`` (may be < 1)."""
    budget = max_tokens - prompt_len
    short, long_ = sorted((best_len, other_len))
    if short + long_ <= budget:
        return long_
    if 2 * short <= budget:
        return budget - short
    return budget // 2


class UnitBuilder:
    """Builds units from records with one tokenizer and config; counts what it truncated and skipped."""

    def __init__(self, tokenizer: Tokenizer, cfg: UnitConfig | None = None, images: ImageSpec | None = None) -> None:
        self.tok = tokenizer
        self.cfg = cfg or UnitConfig()
        self.cfg.validate()
        self.images = images
        if images is not None:
            ids = tokenizer.encode(images.image_token, add_special=False)
            if ids != [images.image_token_id]:
                raise ValueError(
                    f"tokenizer {tokenizer.path}: {images.image_token!r} tokenizes to {ids}, not to the model's "
                    f"image token [{images.image_token_id}] ({images.source}/config.json image_token_index); "
                    "use the model's own tokenizer (--tokenizer with the same folder)"
                )
        if self.cfg.template_date is not None:
            self.tok.template_date = parse_template_date(self.cfg.template_date)
        self.truncated: Counter[str] = Counter()

    @property
    def skipped_responses(self) -> Counter[str]:
        """Responses dropped from kept records, by reason (``tied_with_best``, ``response_too_short``).

        They are counted in ``truncated`` under ``dropped_<reason>`` (one counter for the dataset stats).
        """
        return Counter(
            {k[len("dropped_") :]: v for k, v in self.truncated.items() if k.startswith("dropped_")}
        )

    def build(self, record: PreferenceRecord) -> list[Unit]:
        """The units of ``record`` (see the module docstring); raises ``SkipRecord`` when it yields none."""
        cfg = self.cfg
        if record.k < 2:
            raise SkipRecord("too_few_responses", f"{record.k} response(s)")
        before = self.truncated.copy()
        prompt = record.prompt
        spec = self.images
        if record.images and spec is None:
            raise ValueError(f"{record.where()}: a record with images needs an image spec (--image-processor)")
        kept_images = list(range(len(record.images)))  # indices of the images still in the prompt
        mismatch: Counter[str] = Counter()  # of the final tokenization only (turns may be dropped below)

        def tokenize(p: Prompt) -> tuple[list[int], list[list[int]]]:
            p_ids, r_ids = tokenize_record(self.tok, p, record.responses, mismatch)
            if spec is not None:
                p_ids = expand_image_tokens(p_ids, r_ids, len(kept_images), spec)
            return p_ids, r_ids

        prompt_ids, resp = tokenize(prompt)
        if not prompt_ids:
            raise SkipRecord("empty_prompt", "the prompt tokenizes to nothing")
        keep = [i for i, r in enumerate(resp) if len(r) >= cfg.min_response_tokens]
        if len(keep) < len(resp):
            self.truncated["dropped_response_too_short"] += len(resp) - len(keep)
        scores = record.scores
        order = sorted(keep, key=lambda i: -scores[i])
        if len(order) < 2:
            raise SkipRecord(
                "too_few_responses", f"{len(order)} response(s) of >= {cfg.min_response_tokens} tokens"
            )
        if all(scores[i] == scores[order[0]] for i in order):
            raise SkipRecord("no_preference", "all responses have the same score")

        def need() -> tuple[int, int, int]:
            best = len(resp[order[0]])
            other = max(len(resp[i]) for i in order[1:])
            return len(prompt_ids) + best + other, best, other

        total, best_len, other_len = need()
        if total > cfg.max_unit_tokens:
            if not cfg.truncation:
                raise SkipRecord(
                    "unit_too_long",
                    f"prompt {len(prompt_ids)} + best {best_len} + longest other "
                    f"{other_len} tokens > max_unit_tokens {cfg.max_unit_tokens} (truncation off)",
                )
            dropped = 0
            images_before = len(kept_images)
            while total > cfg.max_unit_tokens and not isinstance(prompt, str):
                keep = drop_first_turn_indices(prompt)
                if keep is None:
                    break
                starts = np.cumsum([0] + [m.num_images for m in prompt]).tolist()
                kept_images = [kept_images[j] for i in keep for j in range(starts[i], starts[i + 1])]
                prompt, dropped = tuple(prompt[i] for i in keep), dropped + 1
                mismatch.clear()
                prompt_ids, resp = tokenize(prompt)
                total, best_len, other_len = need()
            if dropped:
                self.truncated["prompt_turns_dropped"] += dropped
                self.truncated["prompt_truncated"] += 1
                if images_before > len(kept_images):
                    self.truncated["prompt_images_dropped"] += images_before - len(kept_images)
            if total > cfg.max_unit_tokens:
                cap = tail_cap(len(prompt_ids), best_len, other_len, cfg.max_unit_tokens)
                if cap < cfg.min_response_tokens:
                    raise SkipRecord(
                        "unit_too_long",
                        f"prompt of {len(prompt_ids)} tokens leaves room for responses "
                        f"of {max(cap, 0)} tokens < min_response_tokens {cfg.min_response_tokens} "
                        f"(max_unit_tokens {cfg.max_unit_tokens})",
                    )
                cut = [i for i in order if len(resp[i]) > cap]
                for i in cut:
                    resp[i] = resp[i][:cap]
                self.truncated["response_tail_cut"] += len(cut)
        pixels = None
        if spec is not None and kept_images:  # decoded once per record, shared by its units
            try:
                pixels = load_pixels([record.images[i] for i in kept_images], spec.processor)
            except SkipRecord:
                self.truncated = before  # a skipped record counts no truncation
                raise
        self.truncated.update(mismatch)
        groups = self._groups(order, [len(r) for r in resp], cfg.max_unit_tokens - len(prompt_ids))
        useful = []
        for g in groups:
            if any(scores[i] < scores[order[0]] for i in g):
                useful.append(g)
            else:
                self.truncated["dropped_tied_with_best"] += len(g) - 1
        if len(useful) > 1:
            self.truncated["split_records"] += 1
            self.truncated["split_units"] += len(useful)
        units = []
        for g in useful:
            idx = sorted(g)
            units.append(
                Unit(
                    prompt_ids,
                    [resp[i] for i in idx],
                    [scores[i] for i in idx],
                    -1,
                    np.asarray(idx, dtype=np.int32),
                    images=pixels,
                    image_token_id=None if spec is None else spec.image_token_id,
                )
            )
        return units

    def _groups(self, order: list[int], lens: list[int], budget: int) -> list[list[int]]:
        """Rank-ordered groups, each ``[best, ...]``, within ``budget`` tokens and the response limit."""
        best = order[0]
        groups, cur, used = [], [best], lens[best]
        for j in order[1:]:
            if len(cur) < self.cfg.max_responses_per_unit and used + lens[j] <= budget:
                cur.append(j)
                used += lens[j]
            else:
                groups.append(cur)
                cur, used = [best, j], lens[best] + lens[j]
        groups.append(cur)
        return groups
