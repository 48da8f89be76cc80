"""``tools/verify_sharing.py``: PASS on exact sharing, FAIL on broken controls, works on a built dataset."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "models" / "tiny_llama.yaml")


def _tool():
    spec = importlib.util.spec_from_file_location("verify_sharing", ROOT / "tools" / "verify_sharing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_pass_and_controls_fail(capsys):
    tool = _tool()
    assert tool.main(["--model", TINY, "--synthetic", "6", "--units", "6"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "max |logp_shared - logp_alone|" in out
    # the check must detect stock positions and a leaky mask
    assert tool.main(["--model", TINY, "--synthetic", "6", "--control", "positions"]) == 1
    assert tool.main(["--model", TINY, "--synthetic", "6", "--control", "mask"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_usage_errors():
    tool = _tool()
    with pytest.raises(SystemExit) as err:
        tool.main(["--model", TINY])  # neither --data nor --synthetic
    assert err.value.code == 2


def test_built_dataset(tmp_path, capsys):
    """A dataset built by the data pipeline (byte tokenizer) passes; the vocabulary is widened to fit."""
    from megatron_prefix.data.builder import BuildConfig, build_dataset
    from megatron_prefix.data.units import UnitConfig

    records = [
        {"prompt": f"Sort {i}: c a b", "responses": ["a b c", "c b a", "b a c"][: 2 + i % 2], "ranks": [0, 1, 2][: 2 + i % 2]}
        for i in range(5)
    ]
    src = tmp_path / "prefs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out_dir = tmp_path / "data"
    cfg = BuildConfig(inputs=[str(src)], tokenizer="byte", output=str(out_dir),
                      units=UnitConfig(max_unit_tokens=256), pack_tokens=256)
    build_dataset(cfg, log=lambda msg: None)
    tool = _tool()
    assert tool.main(["--model", TINY, "--data", str(out_dir), "--units", "4"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "4 units" in out


def test_control_image_rotates_images_among_units():
    """``--control image`` gives every unit with images the next one's (counts kept, text units untouched)."""
    import numpy as np

    from megatron_prefix.data.unit import Unit

    tool = _tool()
    img = [np.full((1, 3, 2, 2), float(i), dtype=np.float32) for i in range(3)]
    units = [Unit([5, 9, 9, 6], [[7, 2]], [0.0], unit_id=0, images=img[0], image_token_id=9),
             Unit([5, 6], [[7, 2]], [0.0], unit_id=1, image_token_id=9),
             Unit([5, 9, 9, 9, 9, 6], [[7, 2]], [0.0], unit_id=2, images=np.concatenate(img[1:]), image_token_id=9)]
    out = tool.rotate_images(units)
    assert [float(x) for x in out[0].images[:, 0, 0, 0]] == [2.0] and out[1].images is None
    assert [float(x) for x in out[2].images[:, 0, 0, 0]] == [0.0, 1.0]
    assert float(units[0].images[0, 0, 0, 0]) == 0.0  # the alone side keeps the originals
    with pytest.raises(ValueError, match="single distinct image"):
        tool.rotate_images([units[0], units[1]])


def test_control_image_needs_a_vision_model(capsys):
    tool = _tool()
    assert tool.main(["--model", TINY, "--synthetic", "4", "--control", "image"]) == 2
    assert "--control image: needs a vision-language --model" in capsys.readouterr().err


def test_tp_the_model_cannot_split_is_refused_before_relaunching(capsys):
    """``--tp 3`` on a model with 2 key/value heads: one clear error and exit 2, no torchrun."""
    assert _tool().main(["--model", TINY, "--synthetic", "2", "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("--tp 3: model.num_query_groups") == 1


def test_llava_without_transformers_is_a_clear_error(monkeypatch):
    """The LLaVA alone side needs transformers (an extra): without it, one line saying how to get it."""
    import importlib.util

    tool = _tool()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'megatron_prefix\[vision\]'"):
        tool.require_transformers()
