"""Generation for evaluation: the plain (dequantized) copy, the static-cache loop, sampling, reasoning budgets."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tuned(quantized_model_dir):
    """The tiny 4-bit model with a LoRA adapter whose weights are not zero (a trained adapter's situation)."""
    from peft import LoraConfig, get_peft_model

    from kubetune.modeling import load_model, load_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(load_model(quantized_model_dir),
                           LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    return model.eval(), load_tokenizer(quantized_model_dir)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_plain_copy_has_the_4bit_models_numbers_base_and_tuned(tuned):
    from kubetune.plain_weights import plain_copy

    model, _ = tuned
    ids = torch.tensor([[5 + (7 * j) % 200 for j in range(40)]])
    with model.disable_adapter():
        base = _logits(model, ids)
    with_adapter = _logits(model, ids)
    plain, plain_tuned = plain_copy(model, adapter=False), plain_copy(model, adapter=True)
    assert not any(hasattr(p, "quant_state") for p in plain_tuned.parameters())  # really plain
    assert not any("lora" in name for name, _ in plain.named_parameters())  # the base alone
    for name, parameter in model.named_parameters():  # the same adapter, unmerged
        if "lora_" in name:
            assert torch.equal(plain_tuned.get_parameter(name), parameter)
    # within bf16 rounding (bitsandbytes' CPU kernel sums in its own order); the adapter moves logits far more
    assert (_logits(plain, ids) - base).abs().max() < 0.02 * base.abs().max()
    effect = (with_adapter - base).abs().max()
    assert effect > 0.1 * base.abs().max()
    assert (_logits(plain_tuned, ids) - with_adapter).abs().max() < 0.05 * effect
    # the source model is left as it was: still 4-bit, still answering with its adapter (bitsandbytes re-lays a CPU
    # weight out on its first inference call, so its sums may now run in another order)
    assert any(hasattr(p, "quant_state") for p in model.parameters())
    assert (_logits(model, ids) - with_adapter).abs().max() < 0.05 * effect


def test_plain_copy_carries_a_dora_adapter_too(quantized_model_dir):
    from peft import LoraConfig, get_peft_model

    from kubetune.modeling import load_model
    from kubetune.plain_weights import fits_in_memory, plain_copy

    dora = get_peft_model(load_model(quantized_model_dir),
                          LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).eval()
    ids = torch.tensor([[5 + (7 * j) % 200 for j in range(24)]])
    copied = plain_copy(dora, adapter=True)
    assert copied.peft_config["default"].use_dora
    reference = _logits(dora, ids)
    assert (_logits(copied, ids) - reference).abs().max() < 0.02 * reference.abs().max()
    assert fits_in_memory(dora) == (True, "")


def test_sampling_is_seeded_and_greedy_by_default(tuned):
    from kubetune.generation import Sampling, generate_answers

    model, tokenizer = tuned
    prompts = ["What does 黄芪 do?", "How is a cough treated?"]
    greedy = generate_answers(model, tokenizer, prompts, 12)[0]
    assert generate_answers(model, tokenizer, prompts, 12)[0] == greedy
    hot = Sampling(temperature=1.5, top_p=0.95, seed=7)
    sampled = generate_answers(model, tokenizer, prompts, 12, sampling=hot)[0]
    assert generate_answers(model, tokenizer, prompts, 12, sampling=hot)[0] == sampled  # same seed, same draw
    assert sampled != greedy


def test_reasoning_budget_makes_every_answer_reach_a_final_answer(tuned):
    from kubetune.generation import THINK_CLOSE, generate_ids, generate_reasoned_answers, split_reasoning

    model, tokenizer = tuned
    prompts = ["<|im_start|>user\nWhat does 黄芪 do?<|im_end|>\n<|im_start|>assistant\n<think>\n", "Cough?"]
    first = generate_ids(model, tokenizer, prompts, 6)[0]
    assert not any(ended for _, ended in first)  # random weights do not stop within 6 tokens
    texts, forced, stats = generate_reasoned_answers(model, tokenizer, prompts, thinking_budget=6, max_new_tokens=5)
    assert forced == [True, True]
    for text, (thought, _) in zip(texts, first, strict=True):
        assert text.startswith(tokenizer.decode(thought, skip_special_tokens=True))
        assert THINK_CLOSE in text
        trace, answer = split_reasoning(text)
        assert trace and answer  # the budget closed the trace, and the model then answered
    assert stats.generated_tokens == 2 * 6 + 2 * 5 and stats.batches == 2


def test_reasoning_models_are_recognised_by_their_template(tuned):
    from kubetune.generation import writes_reasoning

    _, tokenizer = tuned
    assert not writes_reasoning(tokenizer)
    r1 = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    r1.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}<｜Assistant｜><think>\n"
    assert not writes_reasoning(r1)  # an opening tag alone is not enough: the closing tag is what splits
    r1.chat_template += "{# answers after </think> #}"
    assert writes_reasoning(r1)


@pytest.fixture(scope="module")
def float32_model(tiny_model_dir):
    """The tiny model unquantized in float32: both decoding loops then choose the same tokens, exactly."""
    from kubetune.modeling import load_model, load_tokenizer

    return load_model(tiny_model_dir, compute_dtype="float32").eval(), load_tokenizer(tiny_model_dir)


@pytest.mark.parametrize("settings", [{}, {"repetition_penalty": 1.3}], ids=["greedy", "repetition_penalty"])
def test_static_cache_loop_chooses_what_generate_chooses(float32_model, settings):
    from kubetune.generation import Sampling, generate_ids

    model, tokenizer = float32_model
    prompts = [[5 + (7 * i + j) % 200 for j in range(3 + 9 * i)] for i in range(6)]  # left padding of 0-45 tokens
    sampling = Sampling(**settings)
    static, stats = generate_ids(model, tokenizer, prompts, 20, sampling=sampling, engine="static")
    assert static == generate_ids(model, tokenizer, prompts, 20, sampling=sampling, engine="generate")[0]
    assert stats.batches == 1 and all(len(ids) <= 20 for ids, _ in static)
    forced = generate_ids(model, tokenizer, prompts, 20, min_new_tokens=20, engine="static")[0]
    assert forced == generate_ids(model, tokenizer, prompts, 20, min_new_tokens=20, engine="generate")[0]
    assert all(len(ids) == 20 for ids, _ in forced)


def test_static_cache_loop_samples_reproducibly(float32_model):
    from kubetune.generation import Sampling, generate_ids

    model, tokenizer = float32_model
    prompts = [[5 + (3 * j) % 200 for j in range(12)]] * 4
    hot = Sampling(temperature=1.2, top_p=0.9, seed=3)
    first = generate_ids(model, tokenizer, prompts, 16, sampling=hot, engine="static")[0]
    assert generate_ids(model, tokenizer, prompts, 16, sampling=hot, engine="static")[0] == first
    assert len({tuple(ids) for ids, _ in first}) > 1  # four draws of one prompt differ: it really samples
    assert first != generate_ids(model, tokenizer, prompts, 16, engine="static")[0]


def test_plain_copy_decodes_with_grouped_attention_to_the_same_tokens(float32_model):
    """The plain copy attends with kubetune_decode (the KV cache read once per step, not copied per query head):
    same tokens as the model it copies, decoded by transformers' generate with SDPA."""
    from kubetune.decoding import DECODE_ATTENTION
    from kubetune.generation import generate_ids
    from kubetune.plain_weights import plain_copy

    model, tokenizer = float32_model
    plain = plain_copy(model, adapter=False)
    assert plain.config._attn_implementation == DECODE_ATTENTION
    prompts = [[5 + (7 * i + j) % 200 for j in range(3 + 9 * i)] for i in range(6)]
    expected = generate_ids(model, tokenizer, prompts, 20, engine="generate")[0]
    assert generate_ids(plain, tokenizer, prompts, 20, engine="static")[0] == expected
    assert generate_ids(plain, tokenizer, prompts, 20, engine="generate")[0] == expected


def test_grouped_decode_attention_equals_sdpa_with_its_mask():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kubetune.decoding import decode_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 4
    query, key, value = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    mask = torch.rand(3, 1, 1, 10) > 0.3
    mask[..., 0] = True
    got, _ = decode_attention_forward(module, query, key, value, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert got.shape == want.shape == (3, 1, 8, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tuned_plain_copy_decodes_like_the_4bit_model_with_its_adapter(tuned):
    from kubetune.generation import generate_ids
    from kubetune.plain_weights import plain_copy

    model, tokenizer = tuned
    copied = plain_copy(model, adapter=True)
    prompts = [[5 + (7 * i + j) % 200 for j in range(3 + 9 * i)] for i in range(4)]
    static = generate_ids(copied, tokenizer, prompts, 12, engine="static")[0]
    assert static == generate_ids(copied, tokenizer, prompts, 12, engine="generate")[0]
