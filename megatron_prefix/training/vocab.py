"""Checks that save a run: the dataset's token ids fit the model, and its tokenizer is the checkpoint's.

Run at start and on resume, before any model is built (``training.runner.Run._fix_vocab``):

- ``check_token_ids``: the largest token id of the dataset (``meta.json``'s ``max_token_id``, recorded at
  build; one pass over ``tokens.bin`` for older datasets) must be below the model's vocabulary, else
  an error naming the dataset and the checkpoint (an id beyond the embedding table would be read out of
  bounds on GPU, or trained as garbage);
- ``tokenizer_mismatch``: the tokenizer recorded in the dataset against the one recorded in the
  checkpoint's ``train_state.json`` at save (``tokenizer``): a warning naming both when their content
  hashes differ (same size, other ids: a silent mismatch the vocabulary check cannot see).
"""

from __future__ import annotations


def check_token_ids(dataset, vocab_size: int, model_source: str) -> None:
    """Raise ``ValueError`` when a token id of ``dataset`` is ``>= vocab_size``."""
    top = dataset.max_token_id()
    if top >= vocab_size:
        raise ValueError(
            f"data.path: the dataset {dataset.path} holds token ids up to {top} (tokenizer "
            f"{dataset.tokenizer_info.get('path')}, {dataset.tokenizer_info.get('vocab_size')} ids) but the model "
            f"of {model_source} has model.vocab_size {vocab_size}; build the dataset with the model's tokenizer"
        )


def _describe(info: dict) -> str:
    return f"{info.get('kind')} {info.get('path')} ({info.get('vocab_size')} ids, sha256 {str(info.get('sha256'))[:12]})"


def tokenizer_mismatch(dataset, ckpt_tokenizer: dict | None, ckpt_path: str) -> str | None:
    """A warning when the checkpoint recorded another tokenizer than the dataset's; None when they agree
    or the checkpoint recorded none (converted checkpoints, older runs)."""
    data_tok = dataset.tokenizer_info
    if not ckpt_tokenizer or not data_tok.get("sha256") or not ckpt_tokenizer.get("sha256"):
        return None
    if ckpt_tokenizer["sha256"] == data_tok["sha256"]:
        return None
    return (f"warning: the dataset {dataset.path} was tokenized with {_describe(data_tok)}, the checkpoint "
            f"{ckpt_path} was trained with {_describe(ckpt_tokenizer)}; the token ids may mean other text")
