"""Special token ids for an exported ``config.json``: from the tokenizer the model was trained with.

``convert_mcore_to_hf`` writes ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` so that
``generate`` in transformers stops at the right token. Where they come from, first found wins per key:

1. ``--hf-config`` (a ``config.json`` or the folder holding it), when it sets the key (it may hold a
   list of end-of-turn ids, richer than a tokenizer's single EOS);
2. ``--tokenizer DIR`` (the folder whose files are copied), read with the project's tokenizer loader;
3. the tokenizer recorded in the checkpoint's ``train_state.json`` at save (``tokenizer``), or else
   in ``meta.json`` of the dataset it was trained on (``config.data.path``), when that still exists.

A tokenizer without a BOS (``bos_id`` null) leaves ``bos_token_id`` out.
"""

from __future__ import annotations

import json
from pathlib import Path

KEYS = {"bos_id": "bos_token_id", "eos_id": "eos_token_id", "pad_id": "pad_token_id"}


def read_hf_config(source: str | Path) -> dict:
    """The parsed ``config.json`` of ``--hf-config`` (the file, or a folder holding it)."""
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--hf-config: no config.json at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--hf-config: {path} is not valid JSON ({err})") from None


def recorded_tokenizer(ckpt_dir: Path) -> dict | None:
    """The tokenizer info recorded with a checkpoint (train_state.json), or in its training dataset's
    meta.json; None when neither is known."""
    state_file = Path(ckpt_dir) / "train_state.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    if isinstance(state.get("tokenizer"), dict):
        return state["tokenizer"]
    data_path = ((state.get("config") or {}).get("data") or {}).get("path")
    meta = Path(data_path) / "meta.json" if data_path else None
    if meta is not None and meta.is_file():
        return json.loads(meta.read_text()).get("tokenizer")
    return None


def tokenizer_token_ids(ckpt_dir: Path, tokenizer: str | Path | None) -> tuple[dict, str | None]:
    """(``{"bos_token_id": ..., ...}``, where they came from) from ``--tokenizer`` or the recorded one."""
    info, where = None, None
    if tokenizer:
        from megatron_prefix.data.tokenizers import load_tokenizer

        try:
            info, where = load_tokenizer(str(tokenizer)).describe(), f"--tokenizer {tokenizer}"
        except ValueError:
            info = None  # files copied but not a tokenizer we read (e.g. vocab.json + merges.txt only)
    if info is None:
        info = recorded_tokenizer(ckpt_dir)
        where = f"the tokenizer recorded for {ckpt_dir}" if info else None
    if not info:
        return {}, None
    ids = {hf_key: int(info[key]) for key, hf_key in KEYS.items() if info.get(key) is not None}
    return ids, where
