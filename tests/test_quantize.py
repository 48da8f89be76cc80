"""tools/quantize.py: nvidia-modelopt quantized export of a tiny random HF Llama, on CPU.

For ``fp8`` and ``int4_awq`` (both run on CPU): the export is complete (``config.json`` with
``quantization_config``, ``hf_quant_config.json``, every decoder Linear's quantized weight with its
scales), and the weights dequantized from the files (fp8 x per-tensor scale; int4 unpacked from uint8 x
per-block scale x AWQ ``pre_quant_scale``) give logits within a stated relative error of the unquantized
model (``TOLERANCE``: RMS(logits_deq - logits) / RMS(logits)). ``nvfp4`` asserts CUDA tensors in
modelopt's dynamic block quantization: refused on CPU with that reason, covered by the gpu-marked test.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.conftest import ROOT

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt not installed (pip install '.[quantize]')")

# relative RMS logit error of the dequantized export vs the unquantized model. Measured on this random tiny
# model: fp8 0.081, int4_awq 0.36 (16 levels per 128-wide group of Gaussian weights, ~11% RMS error per weight,
# compounded over 2 layers: random weights are the worst case for 4 bits). The second, tighter check is that the
# files are as faithful as modelopt's in-memory quantized model (0.360 vs 0.375; fp8 0.081 vs 0.108, which
# also quantizes activations).
TOLERANCE = {"fp8": 0.10, "int4_awq": 0.45}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _tool():
    spec = importlib.util.spec_from_file_location("quantize_tool", ROOT / "tools" / "quantize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tool():
    return _tool()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.05)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("quant") / "hf"
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def calib_dataset(tmp_path_factory):
    from tests.test_builder import build, demo_file

    work = tmp_path_factory.mktemp("calib")
    build([demo_file(work, records=40)], work / "data")
    return work / "data"


def dequantized_state_dict(out) -> dict[str, torch.Tensor]:
    """The exported checkpoint's weights as plain fp32 tensors (what a loader reconstructs)."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    plain = {}
    for key, w in sd.items():
        if not key.endswith(".weight"):
            continue
        base = key[: -len(".weight")]
        scale = sd.get(base + ".weight_scale")
        if scale is None:
            plain[key] = w.float()
        elif w.dtype == torch.uint8:  # int4: byte[j, i] = q[2j, i] | q[2j + 1, i] << 4, two's complement
            low = (w & 0x0F).to(torch.int8)
            high = (w >> 4).to(torch.int8)
            q = torch.stack([low, high], dim=1).reshape(w.shape[0] * 2, w.shape[1]).float()
            q = torch.where(q >= 8, q - 16, q)
            block = q.shape[1] // scale.shape[1]
            deq = q * scale.float().repeat_interleave(block, dim=1)
            pre = sd.get(base + ".pre_quant_scale")
            plain[key] = deq * pre.float()[None, :] if pre is not None else deq
        else:  # fp8 e4m3 with a per-tensor scale
            plain[key] = w.float() * scale.float()
    return plain


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq"])
def test_export_is_complete_and_dequantizes_close(tool, tiny_hf, calib_dataset, tmp_path, fmt):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    original, config = tool.load_policy(str(tiny_hf), "cpu")
    want = _logits(original, ids)
    model, _ = tool.load_policy(str(tiny_hf), "cpu")
    batches = tool.calibration_batches(str(calib_dataset), config["vocab_size"], 8, 64)
    assert len(batches) == 8 and all(b.shape[1] <= 64 for b in batches)
    model = tool.quantize_model(model, fmt, batches, "cpu")
    in_memory = _logits(model, ids)  # modelopt's own simulated quantization, before export
    out = tmp_path / fmt
    qcfg = tool.export(model, str(tiny_hf), str(out))
    assert qcfg["quant_algo"] == {"fp8": "FP8", "int4_awq": "W4A16_AWQ"}[fmt]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == qcfg["quant_algo"]
    sd = {}
    for f in out.glob("*.safetensors"):
        sd.update(load_file(str(f)))
    for layer in range(2):
        for lin in LINEARS:
            base = f"model.layers.{layer}.{lin}"
            w = sd[base + ".weight"]
            assert w.dtype == (torch.float8_e4m3fn if fmt == "fp8" else torch.uint8), base
            assert base + ".weight_scale" in sd, base
            if fmt == "fp8":
                assert base + ".input_scale" in sd, base  # static activation scale from calibration
    assert sd["lm_head.weight"].dtype == torch.float32  # excluded from quantization, as the config says
    restored = LlamaForCausalLM(original.config).eval()
    missing, unexpected = restored.load_state_dict(dequantized_state_dict(out), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    got = _logits(restored, ids)
    rel, rel_in_memory = _rel(got, want), _rel(in_memory, want)
    print(f"{fmt}: relative RMS logit error, dequantized export {rel:.4f}, modelopt in memory {rel_in_memory:.4f}")
    assert 0 < rel <= TOLERANCE[fmt]
    assert rel <= 1.1 * rel_in_memory + 0.01  # the files are as faithful as modelopt's own quantized model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def test_cli_refuses_nvfp4_without_cuda_and_bad_input(tool, tiny_hf, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: nvfp4 runs (see the gpu test)")
    assert tool.main(["--hf", str(tiny_hf), "--out", str(tmp_path / "n"), "--format", "nvfp4"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert tool.main(["--hf", str(tmp_path), "--out", str(tmp_path / "x"), "--format", "fp8"]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.gpu
def test_nvfp4_export_on_gpu(tool, tiny_hf, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("nvfp4: modelopt's dynamic block quantization needs CUDA")
    out = tmp_path / "nvfp4"
    qcfg = tool.quantize(str(tiny_hf), str(out), "nvfp4", calib_units=4, calib_tokens=64)
    assert qcfg["quant_algo"] == "NVFP4"
    assert (out / "hf_quant_config.json").is_file() and list(out.glob("*.safetensors"))
