"""Generation for evaluation: the plain (dequantized, merged) copy, sampling settings, reasoning budgets."""

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


def test_plain_copy_has_the_4bit_models_numbers_base_and_merged(tuned):
    from kubetune.plain_weights import plain_copy

    model, _ = tuned
    ids = torch.tensor([[5 + (7 * j) % 200 for j in range(40)]])
    with model.disable_adapter():
        base = _logits(model, ids)
    with_adapter = _logits(model, ids)
    plain, merged = plain_copy(model, merge_adapter=False), plain_copy(model, merge_adapter=True)
    assert not any(hasattr(p, "quant_state") for p in plain.parameters())  # really plain
    assert not any("lora" in name for name, _ in merged.named_parameters())
    # within bf16 rounding (bitsandbytes' CPU kernel sums in its own order); the adapter moves logits far more
    assert (_logits(plain, ids) - base).abs().max() < 0.02 * base.abs().max()
    effect = (with_adapter - base).abs().max()
    assert effect > 0.1 * base.abs().max()
    assert (_logits(merged, ids) - with_adapter).abs().max() < 0.05 * effect
    # the source model is untouched: still 4-bit, still answering with its adapter
    assert torch.equal(_logits(model, ids), with_adapter)


def test_plain_copy_declines_what_it_does_not_handle(quantized_model_dir):
    from peft import LoraConfig, get_peft_model

    from kubetune.modeling import load_model
    from kubetune.plain_weights import fits_in_memory, plain_copy

    dora = get_peft_model(load_model(quantized_model_dir),
                          LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).eval()
    assert plain_copy(dora, merge_adapter=True) is None  # DoRA's merge is not a plain sum: the 4-bit path is used
    assert plain_copy(dora, merge_adapter=False) is not None  # the base alone is fine
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
