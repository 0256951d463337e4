"""GPU checks, run on a CUDA machine with `pytest -m gpu tests/test_gpu.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_varlen_kernel_isolates_packed_samples(tiny_model_dir):
    from test_packing_isolation import packed_vs_alone

    from kubetune import attention
    from kubetune.modeling import load_model

    attention.register()
    model = load_model(tiny_model_dir, attention=attention.NAME, compute_dtype="bfloat16").eval()
    assert next(model.parameters()).is_cuda
    # FlashAttention (packed) against SDPA (alone), both bf16: equal within bf16 rounding.
    assert packed_vs_alone(model, [17, 300, 2, 129, 64]) < 5e-2


def test_cpu_quantized_model_trains_and_evaluates_on_gpu(tiny_model_dir, tmp_path):
    """The pipeline's split: 4-bit conversion on a CPU node, training and evaluation on a GPU node."""
    from peft import PeftModel

    from kubetune.config import DataConfig, EvalConfig, LoraSettings, TrainConfig
    from kubetune.data import prepare_dataset
    from kubetune.evaluate import evaluate_adapter
    from kubetune.modeling import load_model, load_tokenizer
    from kubetune.sft import train_lora

    quantized = tmp_path / "nf4-from-cpu"
    code = (
        "import torch, json; from kubetune.modeling import quantize_model; from kubetune.config import QuantConfig;"
        f"assert not torch.cuda.is_available(); print(json.dumps(quantize_model({tiny_model_dir!r}, "
        f"{str(quantized)!r}, QuantConfig())))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["quantized_on"] == "cpu"

    tokenizer = load_tokenizer(str(quantized))
    data = DataConfig(max_length=256)
    prepare_dataset(data, tokenizer, str(tmp_path / "train.parquet"), str(tmp_path / "eval.parquet"))
    result = train_lora(str(quantized), str(tmp_path / "train.parquet"), str(tmp_path / "adapter"),
                        lora=LoraSettings(), train=TrainConfig(learning_rate=1e-2, num_epochs=2, save_steps=0),
                        max_length=256, checkpoint_dir=str(tmp_path / "ckpt"))
    assert result.plan.attention == "kubetune_varlen"
    assert result.metrics["global_step"] > 0
    losses = [row["loss"] for row in result.history if "loss" in row]
    assert losses[-1] < losses[0]

    evaluation = evaluate_adapter(str(quantized), str(tmp_path / "adapter"), str(tmp_path / "eval.parquet"),
                                  str(tmp_path / "report.html"), EvalConfig(max_new_tokens=16, max_generation_samples=4))
    assert evaluation.metrics["tuned_eval_loss"] < evaluation.metrics["base_eval_loss"]
    base = load_model(str(quantized))
    assert type(base.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    PeftModel.from_pretrained(base, str(tmp_path / "adapter"))


def test_fused_lora_matches_peft_on_a_4bit_model_under_autocast(quantized_model_dir, monkeypatch):
    """The training path on the GPU: bitsandbytes 4-bit base, bf16 adapters, bf16 autocast."""
    from test_fused_lora import _forbid_peft_forward, _logits_and_grads, _peft_model

    from kubetune.fused_lora import fuse_lora_layers

    model = _peft_model(quantized_model_dir, "bfloat16")
    ids = torch.randint(10, 200, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference_logits, reference_grads = _logits_and_grads(model, ids)
        assert fuse_lora_layers(model) > 0
        _forbid_peft_forward(monkeypatch)
        logits, grads = _logits_and_grads(model, ids)
    torch.testing.assert_close(logits, reference_logits, rtol=3e-2, atol=3e-2)
    for name, grad in grads.items():
        scale = reference_grads[name].abs().max().item()
        torch.testing.assert_close(grad, reference_grads[name], rtol=3e-2, atol=3e-2 * scale, msg=name)


def test_host_embedding_frees_gpu_memory_and_keeps_logits():
    from test_host_embedding import _model

    from kubetune.host_embedding import embed_on_host

    model = _model(tied=False).cuda()
    ids = torch.randint(0, 300, (2, 12), device="cuda")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert embed_on_host(model) == 300 * 32 * 4
    assert model.get_input_embeddings().table.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
    assert embed_on_host(_model(tied=True).cuda()) == 0


@pytest.mark.parametrize(("tokens", "width", "rank"), [(12288, 18944, 16), (1000, 513, 8), (77, 3584, 64)])
def test_lora_epilogue_kernel_matches_addmm(tokens, width, rank):
    from kubetune.fused_lora import _LoraEpilogue, lora_epilogue

    g = torch.Generator(device="cuda").manual_seed(0)
    c, h, b = (torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for shape in ((tokens, width), (tokens, rank), (width, rank)))
    out = lora_epilogue(c, h, b, 2.0)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == f"{_LoraEpilogue.__name__}Backward"
    reference = torch.addmm(c.float(), h.float(), b.float().t(), alpha=2.0)
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-2)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [t.grad.clone() for t in (c, h, b)]
    for t in (c, h, b):
        t.grad = None
    torch.addmm(c, h, b.t(), alpha=2.0).backward(grad)
    for mine, theirs in zip(got, (c.grad, h.grad, b.grad), strict=True):
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=2e-2, atol=2e-2 * theirs.abs().max().item())


def test_plain_copy_computes_what_the_4bit_model_computes(quantized_model_dir):
    """bitsandbytes multiplies by its 4-bit weight in a fused kernel whose sums run in another order than a plain
    matmul's: the plain copy's logits equal the 4-bit model's within bf16 rounding, base and with the adapter
    attached (the adapter's own effect is far larger than the difference)."""
    from peft import LoraConfig, get_peft_model

    from kubetune.modeling import load_model
    from kubetune.plain_weights import plain_copy

    model = load_model(quantized_model_dir)
    torch.manual_seed(0)
    tuned = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False)).eval()
    plain, merged = plain_copy(tuned, adapter=False), plain_copy(tuned, adapter=True)
    assert next(plain.parameters()).is_cuda
    ids = torch.tensor([[5 + (7 * j) % 200 for j in range(40)] for _ in range(3)], device="cuda")
    with torch.no_grad():
        with tuned.disable_adapter():
            base = tuned(ids).logits.float()
        with_adapter = tuned(ids).logits.float()
        assert (plain(ids).logits.float() - base).abs().max() < 0.02 * base.abs().max()
        effect = (with_adapter - base).abs().max()
        assert (merged(ids).logits.float() - with_adapter).abs().max() < 0.05 * effect


def test_graph_decoding_chooses_what_generate_chooses(tiny_model_dir):
    """The static-cache loop with its step replayed as a CUDA graph (the default for plain weights on a GPU) picks
    the tokens transformers' generate picks, in float32 where both round alike."""
    from kubetune.generation import generate_ids
    from kubetune.modeling import load_model, load_tokenizer

    model = load_model(tiny_model_dir, compute_dtype="float32").eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = [[5 + (7 * i + j) % 200 for j in range(3 + 9 * i)] for i in range(8)]
    graph, _ = generate_ids(model, tokenizer, prompts, 40, engine="auto")
    assert graph == generate_ids(model, tokenizer, prompts, 40, engine="generate")[0]
