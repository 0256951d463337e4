"""Generation throughput of the evaluation step: one prompt at a time vs kubetune's batched generation.

Builds a model of a given shape with random weights on the spot (throughput does not depend on the weights),
optionally stores it in 4-bit through ``kubetune.modeling.quantize_model`` exactly as the pipeline does, and
times greedy generation of the same random-token prompts two ways:

(a) the loop a notebook writes: ``model.generate`` on one prompt at a time;
(b) ``kubetune.evaluate.generate_answers``: length-sorted, left-padded batches with the KV cache.

Both use greedy decoding and ``min_new_tokens = max_new_tokens`` (random weights emit EOS at random), so every
answer has the same length in both runs. The loop is slow, so it is timed on the first ``--loop-prompts``
prompts and its tokens/s taken as the per-prompt rate; the output says how many prompts it timed.

    python benchmarks/eval_generation.py --shape 7b --quantization nf4        # on a GPU
    python benchmarks/eval_generation.py --shape tiny --prompts 8 --max-new-tokens 16 --loop-prompts 2  # CPU smoke

Prints one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from kubetune.config import QuantConfig
from kubetune.generation import generate_answers
from kubetune.modeling import load_model, load_tokenizer, quantize_model
from kubetune.tiny import make_tiny_model, make_tokenizer

# Qwen2.5-7B (and DeepSeek-R1-Distill-Qwen-7B) shape.
SHAPE_7B = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def log(message: str) -> None:
    print(f"[eval_generation] {message}", file=sys.stderr, flush=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_random_model(shape: str, directory: Path) -> None:
    """A randomly initialised model of ``shape`` saved with a tokenizer, like a downloaded base model."""
    if shape == "tiny":
        make_tiny_model(directory)
        return
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = make_tokenizer()  # small vocabulary: prompts are random ids, text only matters for decoding
    config = Qwen2Config(
        **SHAPE_7B,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: 7.6B random numbers on a CPU take minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_prompts(count: int, low: int, high: int, vocab: int, first_id: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=generator).tolist()
    return [torch.randint(first_id, vocab, (n,), generator=generator).tolist() for n in lengths]


def one_at_a_time(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> tuple[int, float]:
    """The baseline loop: one greedy ``generate`` call per prompt. Returns (generated tokens, seconds)."""
    device = model.get_input_embeddings().weight.device
    tokens = 0
    _sync()
    started = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            output = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
            tokens += output.shape[1] - ids.shape[1]
    _sync()
    return tokens, time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--quantization", choices=["nf4", "none"], default="nf4", help="nf4: QLoRA's 4-bit base")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--min-prompt-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=0, help="generate_answers batch size (0 = its auto)")
    parser.add_argument("--loop-prompts", type=int, default=8, help="prompts timed in the one-at-a-time loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="", help="where the random model is written (default: a temp dir)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.workdir or None) as tmp:
        base_dir = Path(tmp) / "base"
        started = time.perf_counter()
        write_random_model(args.shape, base_dir)
        model_dir = base_dir
        if args.quantization != "none":
            model_dir = Path(tmp) / "quantized"
            quantize_model(str(base_dir), str(model_dir), QuantConfig(quantization=args.quantization))
        log(f"model ready in {time.perf_counter() - started:.0f}s")
        model = load_model(str(model_dir), attention="sdpa").eval()
        tokenizer = load_tokenizer(str(model_dir))
        specials = max(tokenizer.all_special_ids) + 1  # random prompts never contain EOS/pad
        prompts = random_prompts(
            args.prompts, args.min_prompt_tokens, args.max_prompt_tokens, model.config.vocab_size, specials, args.seed
        )
        loop_prompts = prompts[: max(1, min(args.loop_prompts, len(prompts)))]

        # Warm-up: kernels, allocator and cuBLAS handles for both paths.
        one_at_a_time(model, tokenizer, prompts[:1], 4)
        generate_answers(model, tokenizer, prompts[:2], 4, 2, min_new_tokens=4)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

        log(f"one-at-a-time loop over {len(loop_prompts)} prompts")
        loop_tokens, loop_seconds = one_at_a_time(model, tokenizer, loop_prompts, args.max_new_tokens)
        log(f"batched generation over {len(prompts)} prompts")
        _, stats = generate_answers(
            model, tokenizer, prompts, args.max_new_tokens, args.batch_size, min_new_tokens=args.max_new_tokens
        )

    loop_rate = loop_tokens / loop_seconds
    batched_rate = stats.tokens_per_second
    import transformers

    result = {
        "benchmark": "eval_generation",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": args.shape,
        "quantization": args.quantization,
        "prompts": len(prompts),
        "prompt_tokens": [args.min_prompt_tokens, args.max_prompt_tokens],
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size or "auto",
        "batches": stats.batches,
        "loop_prompts_timed": len(loop_prompts),
        "loop_tokens_per_s": round(loop_rate, 2),
        "batched_tokens_per_s": round(batched_rate, 2),
        "speedup": round(batched_rate / loop_rate, 2),
        "batched_seconds": round(stats.seconds, 2),
        "loop_seconds_all_prompts_estimated": round(loop_seconds / len(loop_prompts) * len(prompts), 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "note": (
            f"loop timed on the first {len(loop_prompts)} of {len(prompts)} prompts, rate per prompt extrapolated; "
            "greedy, min_new_tokens=max_new_tokens in both; random weights"
        ),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
