"""Lean mode's host-memory input embedding: same hidden states, LoRA still trains, tied tables stay put."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from kubetune.host_embedding import HostEmbedding, embed_on_host


def _model(tied: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(config)


def test_host_embedding_gives_the_same_logits_and_lora_still_learns():
    from peft import LoraConfig, get_peft_model

    model = _model(tied=False)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.set_input_embeddings(HostEmbedding(model.get_input_embeddings(), torch.device("cpu")))
    assert "model.embed_tokens.weight" not in dict(model.named_parameters())  # not a parameter any more
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    peft_model.enable_input_require_grads()
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_embed_on_host_leaves_cpu_and_tied_tables_alone():
    for tied in (False, True):
        model = _model(tied)
        embedding = model.get_input_embeddings()
        assert embed_on_host(model) == 0  # on the CPU there is no GPU memory to free
        assert model.get_input_embeddings() is embedding
