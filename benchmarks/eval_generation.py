"""Generation throughput of the evaluation step, path by path, with each path's output checked against the 4-bit
model's own.

Builds a model of a given shape with random weights on the spot (throughput does not depend on the weights),
optionally stores it in 4-bit through ``kubetune.modeling.quantize_model`` exactly as the pipeline does, and
times greedy generation of the same random-token prompts:

- ``loop``: the loop a notebook writes, ``model.generate`` on one prompt at a time;
- ``4bit``: :func:`kubetune.generation.generate_ids` on the 4-bit model (length-sorted, left-padded batches);
- ``plain``: transformers' ``generate`` on :func:`kubetune.plain_weights.plain_copy` (weights dequantized once);
- ``plain_graph``: :func:`kubetune.decoding.decode` on the plain copy (static KV cache, the decode step replayed
  as a CUDA graph), what the evaluation step uses on a GPU when memory allows;
- ``4bit_tuned`` / ``plain_graph_tuned``: a random LoRA adapter on every linear layer, on the 4-bit model vs
  attached to the plain copy and decoded as ``plain_graph`` (the tuned pass).

Both use greedy decoding and ``min_new_tokens = max_new_tokens`` (random weights emit EOS at random), so every
answer has the same length in both runs. The loop is slow, so it is timed on the first ``--loop-prompts``
prompts and its tokens/s taken as the per-prompt rate; the output says how many prompts it timed.

    python benchmarks/eval_generation.py --shape 7b --quantization nf4        # on a GPU
    python benchmarks/eval_generation.py --shape tiny --prompts 8 --max-new-tokens 16 --loop-prompts 2  # CPU smoke

Prints one JSON line on stdout (``--record`` appends it to benchmarks/results.jsonl); progress goes to stderr.
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
from kubetune.generation import generate_answers, generate_ids
from kubetune.modeling import load_model, load_tokenizer, quantize_model
from kubetune.plain_weights import plain_copy
from kubetune.tiny import make_tiny_model, make_tokenizer

RESULTS_FILE = Path(__file__).resolve().parent / "results.jsonl"

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
    parser.add_argument("--record", action="store_true", help="append the result to benchmarks/results.jsonl")
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
        n = args.max_new_tokens

        log(f"one-at-a-time loop over {len(loop_prompts)} prompts")
        loop_tokens, loop_seconds = one_at_a_time(model, tokenizer, loop_prompts, n)
        loop_rate = loop_tokens / loop_seconds
        rows: dict[str, dict] = {}

        def timed(name: str, target, reference: list[list[int]] | None = None, **kwargs) -> list[list[int]]:
            log(f"{name}: {len(prompts)} prompts x {n} new tokens")
            outputs, stats = generate_ids(target, tokenizer, prompts, n, args.batch_size, min_new_tokens=n, **kwargs)
            ids = [tokens for tokens, _ in outputs]
            rows[name] = {"tokens_per_s": round(stats.tokens_per_second, 1), "seconds": round(stats.seconds, 2),
                          "x_loop": round(stats.tokens_per_second / loop_rate, 2)}
            if reference is not None:
                rows[name]["same_tokens_as_reference"] = round(token_agreement(ids, reference), 4)
            log(f"{name}: {rows[name]}")
            return ids

        reference = timed("4bit", model)
        started = time.perf_counter()
        plain = plain_copy(model, adapter=False)
        rows["plain_copy_seconds"] = round(time.perf_counter() - started, 2)
        plain_eager = timed("plain", plain, reference, engine="generate")
        timed("plain_graph", plain, plain_eager, engine="static")  # the default on a GPU
        del plain
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

        # The tuned pass: a LoRA adapter with non-zero weights on every linear layer.
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(args.seed)
        tuned = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 init_lora_weights=False)).eval()
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:  # a trained adapter's size: its output a small share of the base layer's
                parameter.data.mul_(0.05)
        tuned_reference = timed("4bit_tuned", tuned)
        plain_tuned = plain_copy(tuned, adapter=True)
        timed("plain_graph_tuned", plain_tuned, tuned_reference, engine="static")
        # Random weights give near-uniform next-token scores, so greedy paths part at the first near-tie: the
        # numbers are compared on the same token sequences instead (the 4-bit model's answers, teacher-forced).
        check = [prompts[i] + reference[i] for i in range(min(8, len(prompts)))]
        plain = plain_copy(tuned, adapter=False)
        with tuned.disable_adapter():
            rows["plain"]["logits_vs_4bit"] = logits_agreement(plain, tuned, check)
        rows["plain_graph_tuned"]["logits_vs_4bit"] = logits_agreement(plain_tuned, tuned, check)

    best = "plain_graph"
    import transformers

    result = {
        "benchmark": "eval_generation",
        "config": "eval_generation",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": "python3 benchmarks/eval_generation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shape": args.shape,
        "quantization": args.quantization,
        "prompts": len(prompts),
        "prompt_tokens": [args.min_prompt_tokens, args.max_prompt_tokens],
        "max_new_tokens": n,
        "batch_size": args.batch_size or "auto",
        "loop_prompts_timed": len(loop_prompts),
        "loop_tokens_per_s": round(loop_rate, 2),
        "paths": rows,
        "best_path": best,
        "tokens_per_s": rows.get(best, {}).get("tokens_per_s"),
        "x_loop": rows.get(best, {}).get("x_loop"),
        "x_4bit_batched": round(rows.get(best, {}).get("tokens_per_s", 0) / rows["4bit"]["tokens_per_s"], 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "note": (
            f"loop timed on the first {len(loop_prompts)} of {len(prompts)} prompts; greedy, "
            "min_new_tokens=max_new_tokens everywhere; random weights; same_tokens_as_reference: generated tokens equal to the 4-bit "
            "model's (base) or the 4-bit model + unmerged adapter's (tuned), which random weights' near-ties make low; "
            "logits_vs_4bit: teacher-forced scores on 8 of the 4-bit model's answers"
        ),
    }
    print(json.dumps(result), flush=True)
    if args.record:
        with RESULTS_FILE.open("a") as f:
            f.write(json.dumps(result) + "\n")
    return result


def logits_agreement(model, reference, sequences: list[list[int]]) -> dict:
    """Next-token scores of ``model`` vs ``reference`` on the same sequences: relative error (Frobenius) and the
    share of positions with the same top token."""
    device = model.get_input_embeddings().weight.device
    error = norm = same = total = 0.0
    with torch.inference_mode():
        for sequence in sequences:
            ids = torch.tensor([sequence], device=device)
            got, want = model(ids).logits.float(), reference(ids).logits.float()
            error += float((got - want).square().sum())
            norm += float(want.square().sum())
            same += float((got.argmax(-1) == want.argmax(-1)).sum())
            total += want.shape[1]
    return {"relative_error": round((error / norm) ** 0.5, 5), "same_top_token": round(same / total, 4)}


def token_agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions where two sets of answers hold the same token (up to each pair's shorter length)."""
    same = total = 0
    for a, b in zip(outputs, reference, strict=True):
        same += sum(x == y for x, y in zip(a, b, strict=False))  # up to the shorter answer
        total += max(len(a), len(b))
    return same / total if total else 1.0


if __name__ == "__main__":
    main()
