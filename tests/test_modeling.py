"""4-bit model load: real bitsandbytes nf4 on the CPU with the tiny Qwen2 model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.config import QuantConfig
from kubetune.errors import KubetuneError
from kubetune.modeling import METADATA_FILE, load_model, quantize_model, resolve_model_source


def test_quantized_model_is_saved_with_metadata_and_reloads_as_4bit(quantized_model_dir, tiny_model_dir):
    files = {p.name for p in Path(quantized_model_dir).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", METADATA_FILE} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    meta = json.loads((Path(quantized_model_dir) / METADATA_FILE).read_text())
    assert meta["source"] == str(Path(tiny_model_dir).resolve())
    assert meta["quant_quantization"] == "nf4" and meta["quant_double_quant"] is True
    assert len(meta["source_sha256"]) == 64 and meta["quantized_on"] == "cpu"
    model = load_model(quantized_model_dir)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_no_quantization_keeps_plain_weights(tiny_model_dir, tmp_path):
    meta = quantize_model(tiny_model_dir, str(tmp_path / "bf16"), QuantConfig(quantization="none"))
    assert meta["quant_quantization"] == "none"
    model = load_model(str(tmp_path / "bf16"))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_same_source_gives_same_content_hash(tiny_model_dir, tmp_path):
    first = quantize_model(tiny_model_dir, str(tmp_path / "a"), QuantConfig(quantization="fp4", double_quant=False))
    second = quantize_model(tiny_model_dir, str(tmp_path / "b"), QuantConfig(quantization="fp4", double_quant=False))
    assert first["source_sha256"] == second["source_sha256"]


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(KubetuneError, match="does not exist") as error:
        resolve_model_source(str(tmp_path / "missing-model"))
    assert "Fix:" in str(error.value)


def test_model_directory_without_weights_is_a_clear_error(tiny_model_dir, tmp_path):
    broken = tmp_path / "no-weights"
    broken.mkdir()
    (broken / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    (broken / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(KubetuneError, match="no \\*.safetensors weights") as error:
        quantize_model(str(broken), str(tmp_path / "out"), QuantConfig())
    assert "pytorch_model.bin" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_hub_ids_are_recognised_without_network():
    source = resolve_model_source("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", revision="main")
    assert not source.is_local and source.revision == "main"
