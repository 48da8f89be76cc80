"""The unit: one prompt and its K responses, tokenized, laid out ``[prompt, r1, ..., rK]``.

The contract (tested on every unit of every real file): for every response i,
``concat(prompt_ids, response_ids[i])`` is exactly the token sequence an ordinary (unshared) DPO trainer
builds from the same record. Every response ends in EOS.

Per token, the shared layout gives:
- position id: prompt ``0..P-1``; every response restarts at ``P`` (``P..P+len_i-1``);
- segment id: 0 for the prompt, ``i`` (1-based) for response i;
- loss mask: 1 on every response token (each is predicted: the first from the last prompt position).

Images (``docs/vision.md``): ``images`` [n, C, H, W] float32, in token order, and ``image_token_id``;
each image is ``tokens_per_image`` copies of ``image_token_id`` in the prompt (never in a response).
``images`` is None for a unit without images; ``image_token_id`` is set for every unit of an image
dataset (None for text datasets).

Pure numpy: no torch, no megatron.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_prefix import sharing


@dataclass
class Unit:
    """A tokenized prompt with K >= 1 responses (K == 1 only in the unshared layout)."""

    prompt_ids: np.ndarray  # [P] int32, P >= 1
    response_ids: list[np.ndarray]  # K arrays [len_i] int32, each ending in EOS
    scores: np.ndarray  # [K] float32, higher is better
    unit_id: int = -1  # global id in the dataset; the loss groups responses by it
    slots: np.ndarray = field(default=None)  # [K] int: index of each response in the original unit
    images: np.ndarray | None = None  # [n, C, H, W] float32, in token order; None without images
    image_token_id: int | None = None  # the image token of an image dataset; None for text

    def __post_init__(self) -> None:
        self.prompt_ids = np.asarray(self.prompt_ids, dtype=np.int32)
        self.response_ids = [np.asarray(r, dtype=np.int32) for r in self.response_ids]
        self.scores = np.asarray(self.scores, dtype=np.float32)
        if self.slots is None:
            self.slots = np.arange(len(self.response_ids), dtype=np.int32)
        assert len(self.prompt_ids) >= 1, "a unit needs a non-empty prompt"
        assert len(self.response_ids) == len(self.scores) == len(self.slots)
        assert all(len(r) >= 1 for r in self.response_ids), "empty response"
        if self.images is not None:
            assert self.image_token_id is not None, "a unit with images needs image_token_id"
            assert self.images.ndim == 4 and len(self.images) >= 1, "images must be [n, C, H, W], n >= 1"
        if self.image_token_id is not None:
            n_tok = self.num_image_tokens
            n_img = 0 if self.images is None else len(self.images)
            assert (n_tok == 0) == (n_img == 0) and (n_img == 0 or n_tok % n_img == 0), (
                f"{n_tok} image tokens for {n_img} images"
            )
            assert all(self.image_token_id not in r for r in self.response_ids), "image token in a response"

    @property
    def num_images(self) -> int:
        """Images of the prompt (0 without)."""
        return 0 if self.images is None else len(self.images)

    @property
    def num_image_tokens(self) -> int:
        """Prompt tokens that are image tokens (``num_images * tokens_per_image``)."""
        if self.image_token_id is None:
            return 0
        return int(np.count_nonzero(self.prompt_ids == self.image_token_id))

    @property
    def k(self) -> int:
        return len(self.response_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def response_lens(self) -> np.ndarray:
        return np.array([len(r) for r in self.response_ids], dtype=np.int64)

    @property
    def shared_len(self) -> int:
        """Tokens of the shared layout ``[prompt, r1, ..., rK]``."""
        return self.prompt_len + int(self.response_lens.sum())

    @property
    def unshared_len(self) -> int:
        """Tokens of the duplicated layout ``[prompt, r1], ..., [prompt, rK]``."""
        return self.k * self.prompt_len + int(self.response_lens.sum())

    def shared_attention_pairs(self) -> int:
        """Query-key pairs the prefix-shared mask allows (causal, prompt + own response)."""
        return sharing.shared_pairs(self.prompt_len, self.response_lens.tolist())

    def unshared_attention_pairs(self) -> int:
        """Query-key pairs of plain causal attention over each ``[prompt + response]``."""
        return sharing.unshared_pairs(self.prompt_len, self.response_lens.tolist())

    def tokens(self) -> np.ndarray:
        """``[prompt, r1, ..., rK]`` as one int32 array."""
        return np.concatenate([self.prompt_ids, *self.response_ids]).astype(np.int32)

    def position_ids(self) -> np.ndarray:
        """Prompt ``0..P-1``; each response continues at ``P``."""
        return sharing.unit_position_ids(self.prompt_len, self.response_lens.tolist())

    def segment_ids(self) -> np.ndarray:
        """0 for prompt tokens, i (1-based) for response i."""
        return sharing.unit_segment_ids(self.prompt_len, self.response_lens.tolist())

    def unshared_sequence(self, i: int) -> np.ndarray:
        """The ordinary sequence ``prompt + response i`` an unshared trainer would build."""
        return np.concatenate([self.prompt_ids, self.response_ids[i]]).astype(np.int32)

    def split_unshared(self) -> list[Unit]:
        """The duplicated layout: K units of one response each, keeping ``unit_id``, slots and images (each
        piece carries its own copy of the prompt's images)."""
        return [
            Unit(self.prompt_ids, [r], self.scores[i : i + 1], self.unit_id, self.slots[i : i + 1],
                 images=None if self.images is None else self.images.copy(), image_token_id=self.image_token_id)
            for i, r in enumerate(self.response_ids)
        ]
