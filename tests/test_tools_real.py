"""The forward-only tools on real weights and real data.

A tiny random Hugging Face llama (transformers, fp32, safetensors; vocabulary 264 so that the byte
tokenizer's 258 ids fit) is converted with ``tools/convert_hf_to_mcore.py``'s converter; a dataset is
built with the byte tokenizer from the first records of the shared UltraFeedback sample (responses of
~900 bytes, so summed log-probs reach the thousands, where fp32 accumulation order alone moves them by
~1e-3). ``verify_sharing.py`` must PASS on the converted checkpoint and on the HF folder, and FAIL with
its negative controls; ``score.py`` must give the log-probs of each response run alone.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import shared_file

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 264  # byte tokenizer: 258 ids, padded to a multiple of 8


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_hf_llama(directory: Path, vocab: int = VOCAB):
    """A tiny random fp32 llama saved with ``save_pretrained``; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      initializer_range=0.05, rope_theta=10000.0, attn_implementation="eager",
                      bos_token_id=None, eos_token_id=256, pad_token_id=257)
    model = LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(str(directory))
    return model


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(hf dir, converted run dir, dataset dir, hf model)."""
    from megatron_prefix.convert import convert_hf_to_mcore
    from megatron_prefix.data.builder import BuildConfig, build_dataset
    from megatron_prefix.data.units import UnitConfig

    src = shared_file("ultrafeedback-binarized-1k.jsonl.gz")
    work = tmp_path_factory.mktemp("tools_real")
    with gzip.open(src, "rt") as f:
        lines = [next(f) for _ in range(6)]
    (work / "uf.jsonl").write_text("".join(lines))
    data = work / "data"
    build_dataset(BuildConfig(inputs=[str(work / "uf.jsonl")], tokenizer="byte", output=str(data),
                              units=UnitConfig(max_unit_tokens=4096), pack_tokens=4096), log=lambda m: None)
    hf = work / "hf"
    model = make_hf_llama(hf)
    run = work / "converted"
    convert_hf_to_mcore(hf, run, progress=False)
    return hf, run, data, model


def test_verify_sharing_real_checkpoint(real, capsys):
    """PASS on the converted checkpoint with real data; both negative controls FAIL."""
    _, run, data, _ = real
    tool = _tool("verify_sharing")
    assert tool.main(["--model", str(run), "--data", str(data), "--units", "3"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and f"weights {run}" in out
    worst = float(out.split("|logp_alone| up to ")[1].split(";")[0].split()[0])
    assert worst > 1000, out  # the regime where a bare absolute tolerance of 1e-4 is too strict
    for control in ("positions", "mask"):
        assert tool.main(["--model", str(run), "--data", str(data), "--units", "3", "--control", control]) == 1
        assert "FAIL" in capsys.readouterr().out


@pytest.mark.slow
def test_verify_sharing_hf_folder(real, capsys):
    """The HF folder itself: converted to a temporary checkpoint with the project's converter, removed after."""
    import tempfile

    hf, _, data, _ = real
    before = set(Path(tempfile.gettempdir()).glob("megatron_prefix_weights_*"))
    assert _tool("verify_sharing").main(["--model", str(hf), "--data", str(data), "--units", "2"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "megatron_prefix_weights_" in out
    assert set(Path(tempfile.gettempdir()).glob("megatron_prefix_weights_*")) == before


def test_verify_sharing_tolerances(real, capsys):
    """With every relative criterion off and an absolute tolerance of 0 the same data must not pass silently
    for a broken control, and the tolerance flags are validated."""
    _, run, data, _ = real
    tool = _tool("verify_sharing")
    code = tool.main(["--model", str(run), "--data", str(data), "--units", "1", "--control", "positions",
                      "--rtol", "0", "--token-tol", "0", "--tolerance", "0"])
    assert code == 1 and "FAIL" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        tool.main(["--model", str(run), "--data", str(data), "--rtol", "-1"])
    assert err.value.code == 2


def test_score_equals_alone_logps(real, tmp_path):
    """``score.py`` on the converted checkpoint: every unit, the log-probs of each response run alone through
    the HF model (transformers' forward, an independent path) within 1e-5 relative."""
    _, run, data, model = real
    from megatron_prefix.data.dataset import PreferenceDataset

    out = tmp_path / "scores.jsonl"
    assert _tool("score").main(["--ckpt", str(run), "--data", str(data), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ds = PreferenceDataset(data)
    assert [rec["unit"] for rec in lines] == list(range(len(ds)))
    for rec, unit in zip(lines, ds.units()):
        assert rec["response_tokens"] == [len(r) for r in unit.response_ids]
        assert rec["prompt_tokens"] == unit.prompt_len
        for i, got in enumerate(rec["logps"]):
            seq = torch.from_numpy(unit.unshared_sequence(i)).long()[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(seq).logits[0].double(), -1)
            want = float(logp[unit.prompt_len - 1 : -1].gather(1, seq[0, unit.prompt_len:, None]).sum())
            assert abs(got - want) <= 1e-5 * abs(want) + 1e-4, (rec["unit"], i, got, want)


def test_score_refuses_bad_input(real, tmp_path, capsys):
    """A folder that is no checkpoint, and a folder that is no dataset: exit 2 naming the flag."""
    _, run, data, _ = real
    tool = _tool("score")
    assert tool.main(["--ckpt", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "--ckpt:" in capsys.readouterr().err
    assert tool.main(["--ckpt", str(run), "--data", str(tmp_path), "--out", str(tmp_path / "s.jsonl")]) == 2
    assert "--data:" in capsys.readouterr().err
    assert not (tmp_path / "s.jsonl").exists()


def test_export_writes_tokenizer_ids(real, tmp_path):
    """``convert_mcore_to_hf``: bos/eos/pad ids of ``--tokenizer`` in config.json; ``--hf-config`` accepts a
    folder and wins for the keys it sets."""
    from megatron_prefix.convert import convert_mcore_to_hf
    from megatron_prefix.data.tokenizers import load_tokenizer
    from tests.tokenizer_fixtures import cached_hf_llama3

    hf, run, _, _ = real
    tok_dir = cached_hf_llama3()
    tok = load_tokenizer(str(tok_dir))
    assert tok.bos_id is not None and len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    cfg = json.loads((convert_mcore_to_hf(run, tmp_path / "a", tokenizer=tok_dir, progress=False)
                      / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    # --hf-config as a folder: its ids (eos 256, pad 257, no bos key) first, the tokenizer's for the rest
    cfg = json.loads((convert_mcore_to_hf(run, tmp_path / "b", tokenizer=tok_dir, hf_config=hf, progress=False)
                      / "config.json").read_text())
    hf_cfg = json.loads((hf / "config.json").read_text())
    assert cfg["eos_token_id"] == hf_cfg["eos_token_id"] == 256 and cfg["pad_token_id"] == 257
    assert cfg["bos_token_id"] == hf_cfg.get("bos_token_id", tok.bos_id)
    with pytest.raises(ValueError, match="--hf-config"):
        convert_mcore_to_hf(run, tmp_path / "c", hf_config=tmp_path, progress=False)


@pytest.mark.slow
def test_verify_sharing_bf16_defaults(real, capsys):
    """bfloat16 (CPU): the default tolerances pass the exact computation and still catch a control."""
    _, run, data, _ = real
    tool = _tool("verify_sharing")
    assert tool.main(["--model", str(run), "--data", str(data), "--units", "3", "--dtype", "bfloat16"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert tool.main(["--model", str(run), "--data", str(data), "--units", "3", "--dtype", "bfloat16",
                      "--control", "positions"]) == 1
