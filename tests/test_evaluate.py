"""Base-vs-tuned evaluation on the CPU with the tiny Qwen2 model and a real (perturbed) LoRA adapter."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from kubetune.config import EvalConfig
from kubetune.errors import KubetuneError
from kubetune.evaluate import EvalResult, chrf_score, completion_loss, evaluate_adapter, token_batches
from kubetune.generation import generate_answers, prompt_token_ids
from kubetune.modeling import load_model, load_tokenizer
from kubetune.report import render_report
from kubetune.tiny import make_tiny_model

PLANTED = '<script>alert("pwned")</script>'
TEMPLATE = "You are an expert physician of TCM.\n\n### Instruction:\n{q}\n\n### Response:\n"
EXAMPLES = [
    ("久咳不愈怎么治疗？", "久咳多属肺气虚或肺阴虚，可用百合固金汤加减，并注意休息。"),
    ("What is qi deficiency?", "Qi deficiency is a pattern of fatigue, weak voice and spontaneous sweating."),
    ("失眠多梦应该怎么调理？", "心脾两虚者用归脾汤；阴虚火旺者用天王补心丹。"),
    ("Which herbs treat a wind-cold common cold?", "Ma Huang Tang or Gui Zhi Tang, depending on sweating."),
    ("脾胃虚弱有哪些表现？", "食少纳呆，腹胀便溏，神疲乏力，面色萎黄。"),
    ("Explain the role of the liver in TCM.", f"The liver stores blood and governs the free flow of qi. {PLANTED}"),
    ("头痛的中医辨证有哪些类型？", "外感头痛与内伤头痛；内伤又分肝阳、血虚、痰浊、瘀血。"),
]
PROBES = [("久咳不愈怎么治疗？<b>急</b>", TEMPLATE.format(q="久咳不愈怎么治疗？<b>急</b>")),
          ("How is insomnia treated?", TEMPLATE.format(q="How is insomnia treated?"))]
CONFIG = EvalConfig(max_new_tokens=6, generation_batch_size=4, max_generation_samples=6, eval_batch_tokens=128)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def eval_parquet(tiny_model, tmp_path_factory) -> str:
    from datasets import Dataset

    tokenizer = load_tokenizer(tiny_model)
    rows = []
    for question, answer in EXAMPLES:
        prompt = TEMPLATE.format(q=question)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(
            {
                "prompt": prompt,
                "completion": answer,
                "input_ids": prompt_ids + answer_ids,
                "completion_mask": [0] * len(prompt_ids) + [1] * len(answer_ids),
                "length": len(prompt_ids) + len(answer_ids),
            }
        )
    path = tmp_path_factory.mktemp("data") / "eval.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    # A fresh adapter is the identity (lora_B = 0); perturb it so "tuned" really differs from "base".
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("adapters") / "adapter"
    peft_model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def evaluated(tiny_model, adapter, eval_parquet, tmp_path_factory) -> tuple[EvalResult, list[int]]:
    """One evaluation for the module; every generate call's batch size is recorded."""
    from transformers.generation.utils import GenerationMixin

    batch_sizes: list[int] = []
    original = GenerationMixin.generate

    def counting_generate(self, *args, **kwargs):
        batch_sizes.append(int(kwargs["input_ids"].shape[0]))
        return original(self, *args, **kwargs)

    report = tmp_path_factory.mktemp("reports") / "report.html"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GenerationMixin, "generate", counting_generate)
        result = evaluate_adapter(tiny_model, adapter, eval_parquet, str(report), CONFIG, probe_prompts=PROBES)
    return result, batch_sizes


def _hand_loss(model, input_ids: list[list[int]], masks: list[list[int]]) -> float:
    """Mean cross-entropy over completion tokens, one unpadded row at a time, from the full model's logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in zip(input_ids, masks, strict=True):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            targets = torch.tensor(ids[1:])
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            total += float(losses[keep].sum())
            count += int(keep.sum())
    return total / count


def _eval_columns(path: str) -> tuple[list[list[int]], list[list[int]]]:
    from datasets import Dataset

    data = Dataset.from_parquet(path)
    return data["input_ids"], data["completion_mask"]


def test_metrics_are_present_finite_and_differ(evaluated):
    result, _ = evaluated
    expected = {
        "base_eval_loss", "tuned_eval_loss", "base_perplexity", "tuned_perplexity", "base_chrf", "tuned_chrf",
        "eval_rows", "generation_tokens_per_second", "chrf_gain", "loss_reduction",
    }
    assert expected <= result.metrics.keys()
    assert all(math.isfinite(v) for v in result.metrics.values()), result.metrics
    assert result.metrics["eval_rows"] == len(EXAMPLES)
    assert result.metrics["base_eval_loss"] != pytest.approx(result.metrics["tuned_eval_loss"], abs=1e-3)
    assert result.metrics["tuned_perplexity"] == pytest.approx(math.exp(result.metrics["tuned_eval_loss"]))
    assert result.metrics["loss_reduction"] == pytest.approx(
        result.metrics["base_eval_loss"] - result.metrics["tuned_eval_loss"]
    )
    assert result.metrics["generation_tokens_per_second"] > 0
    assert 0.0 <= result.metrics["tuned_chrf"] <= 100.0


def test_rows_cover_held_out_and_probes(evaluated):
    result, _ = evaluated
    kinds = [row["kind"] for row in result.rows]
    assert kinds == ["held-out"] * CONFIG.max_generation_samples + ["probe"] * len(PROBES)
    assert result.rows[0]["reference"] == EXAMPLES[0][1]
    assert result.rows[-1]["prompt"] == PROBES[-1][0]
    common = {"kind", "prompt", "reference", "base_answer", "tuned_answer"}
    for row in result.rows:  # held-out answers carry their own chrF against the reference; probes have none
        assert set(row) == (common | {"base_chrf", "tuned_chrf"} if row["kind"] == "held-out" else common)
        if row["kind"] == "held-out":
            for model in ("base", "tuned"):
                assert float(row[f"{model}_chrf"]) == pytest.approx(
                    chrf_score([row[f"{model}_answer"]], [row["reference"]]), abs=0.05)
    assert any(row["base_answer"] != row["tuned_answer"] for row in result.rows)


def test_loss_matches_hand_computation(evaluated, tiny_model, adapter, eval_parquet):
    from peft import PeftModel

    result, _ = evaluated
    input_ids, masks = _eval_columns(eval_parquet)
    model = PeftModel.from_pretrained(load_model(tiny_model), adapter).eval()
    tuned = _hand_loss(model, input_ids, masks)
    with model.disable_adapter():
        base = _hand_loss(model, input_ids, masks)
    # bf16 weights: padded batches and unpadded rows round slightly differently.
    assert result.metrics["tuned_eval_loss"] == pytest.approx(tuned, abs=2e-2)
    assert result.metrics["base_eval_loss"] == pytest.approx(base, abs=2e-2)

    # One row, exactly: same model, one sequence, no padding.
    total, count = completion_loss(model, input_ids[:1], masks[:1], batch_tokens=4096, pad_token_id=3)
    assert count == sum(masks[0][1:])
    assert total / count == pytest.approx(_hand_loss(model, input_ids[:1], masks[:1]), rel=1e-3)


def test_padded_loss_batches_match_unpadded_rows(tiny_model, eval_parquet):
    model = load_model(tiny_model, compute_dtype="float32")
    input_ids, masks = _eval_columns(eval_parquet)
    batched_total, batched_count = completion_loss(model, input_ids, masks, batch_tokens=200, pad_token_id=3)
    assert batched_total / batched_count == pytest.approx(_hand_loss(model, input_ids, masks), rel=1e-5)


def test_token_batches_respect_budget_and_sort_by_length():
    lengths = [5, 40, 12, 12, 90, 7, 33, 200]
    batches = token_batches(lengths, batch_tokens=100)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 100
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths, reverse=True)
    assert [200] in [[lengths[i] for i in b] for b in batches]  # over budget: alone


def test_generation_is_batched(evaluated):
    _, batch_sizes = evaluated
    prompts = CONFIG.max_generation_samples + len(PROBES)
    per_model = math.ceil(prompts / CONFIG.generation_batch_size)
    assert len(batch_sizes) == 2 * per_model  # base and tuned, never one prompt at a time
    assert sum(batch_sizes) == 2 * prompts
    assert max(batch_sizes) == CONFIG.generation_batch_size


def test_left_padded_batches_equal_one_at_a_time(tiny_model, adapter, eval_parquet):
    from peft import PeftModel

    # float32 so batched and single runs round alike and greedy choices compare exactly.
    model = PeftModel.from_pretrained(load_model(tiny_model, compute_dtype="float32"), adapter).eval()
    tokenizer = load_tokenizer(tiny_model)
    input_ids, masks = _eval_columns(eval_parquet)
    prompts: list = [TEMPLATE.format(q="你好"), prompt_token_ids(input_ids[3], masks[3]), PROBES[0][1]]
    assert len({len(tokenizer(p)["input_ids"]) if isinstance(p, str) else len(p) for p in prompts}) == 3

    batched, stats = generate_answers(model, tokenizer, prompts, max_new_tokens=10, batch_size=8)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=10, batch_size=1)[0][0] for p in prompts]
    assert stats.batches == 1 and stats.prompts == 3
    assert batched == single
    assert all(answer for answer in batched)

    forced, forced_stats = generate_answers(model, tokenizer, prompts, 5, 2, min_new_tokens=5)
    assert forced_stats.generated_tokens == 15 and forced_stats.batches == 2


class _Collect(HTMLParser):
    """Ids, classes and the text inside each element with a given class."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.tags: list[str] = []
        self.stack: list[set[str]] = []
        self.texts: dict[str, list[str]] = {"base-answer": [], "tuned-answer": [], "row": []}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        classes = set((attrs.get("class") or "").split())
        for name in self.texts:
            if name in classes:
                self.texts[name].append("")
        self.stack.append(classes)

    def handle_endtag(self, tag):
        self.stack.pop()

    def handle_data(self, data):
        open_classes = set().union(*self.stack) if self.stack else set()
        for name in self.texts:
            if name in open_classes:
                self.texts[name][-1] += data


def test_report_is_safe_self_contained_html(evaluated):
    result, _ = evaluated
    raw = Path(result.report_path).read_bytes()
    text = raw.decode("utf-8")  # strict: fails on invalid UTF-8
    assert text.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in text
    assert "Noto Sans CJK SC" in text and "Microsoft YaHei" in text
    assert "久咳不愈怎么治疗" in text and "归脾汤" in text
    # The planted reference and probe markup are shown as text, never executed or rendered.
    assert "<script" not in text and "&lt;script&gt;" in text
    assert "<b>" not in text and "&lt;b&gt;急&lt;/b&gt;" in text
    assert "http://" not in text and "https://" not in text and "@import" not in text

    parsed = _Collect()
    parsed.feed(text)
    assert {"metrics", "rows", "title"} <= parsed.ids
    assert "script" not in parsed.tags and "link" not in parsed.tags
    assert len(parsed.texts["row"]) == len(result.rows)
    # each answer's box: its label, the answer's chrF where there is a reference, then the answer
    label = re.compile(r"^(Base model|Tuned model \(base \+ LoRA\))( chrF [0-9.]+)?")
    base_texts = [label.sub("", t, count=1) for t in parsed.texts["base-answer"]]
    tuned_texts = [label.sub("", t, count=1) for t in parsed.texts["tuned-answer"]]
    # The report lists probes first; compare as multisets of (base, tuned) pairs.
    pairs = sorted(zip(base_texts, tuned_texts, strict=True))
    assert pairs == sorted((r["base_answer"], r["tuned_answer"]) for r in result.rows)
    assert text.count('class="row probe"') == len(PROBES)
    assert f"{result.metrics['tuned_eval_loss']:.4f}" in text


def test_render_report_escapes_planted_answers():
    rows = [{"kind": "probe", "prompt": "问", "reference": "", "base_answer": PLANTED, "tuned_answer": "<think>嗯</think>"}]
    page = render_report("t <i>", {"base_eval_loss": 2.0, "tuned_eval_loss": 1.5}, rows, {"k": "<v>"})
    assert "<script" not in page and "<think>" not in page and "<i>" not in page and "<v>" not in page
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page
    assert "&lt;think&gt;嗯&lt;/think&gt;" in page
    assert 'class="num better">-0.5000' in page


def test_missing_adapter_files_raise(tiny_model, eval_parquet, tmp_path):
    empty = tmp_path / "adapter"
    empty.mkdir()
    with pytest.raises(KubetuneError, match="adapter_config.json"):
        evaluate_adapter(tiny_model, str(empty), eval_parquet, str(tmp_path / "r.html"), CONFIG)
    (empty / "adapter_config.json").write_text("{}")
    with pytest.raises(KubetuneError, match="adapter_model.safetensors"):
        evaluate_adapter(tiny_model, str(empty), eval_parquet, str(tmp_path / "r.html"), CONFIG)
    with pytest.raises(KubetuneError, match="does not exist"):
        evaluate_adapter(tiny_model, str(tmp_path / "nope"), eval_parquet, str(tmp_path / "r.html"), CONFIG)
    assert not (tmp_path / "r.html").exists()


def test_bad_eval_data_raises(tiny_model, adapter, tmp_path):
    from datasets import Dataset

    path = tmp_path / "bad.parquet"
    Dataset.from_list([{"prompt": "q", "completion": "a"}]).to_parquet(str(path))
    with pytest.raises(KubetuneError, match="input_ids"):
        evaluate_adapter(tiny_model, adapter, str(path), str(tmp_path / "r.html"), CONFIG)


def test_reasoning_traces_are_kept_apart_from_the_final_answer():
    from kubetune.generation import split_reasoning

    # R1-distill chat templates open <think> in the prompt: the answer starts inside the trace
    assert split_reasoning("肺阴虚……</think>\n\n治宜滋阴润肺。") == ("肺阴虚……", "治宜滋阴润肺。")
    assert split_reasoning("<think>先辨证</think>沙参麦冬汤") == ("先辨证", "沙参麦冬汤")
    assert split_reasoning("<think>still thinking when the tokens ran out") == (
        "still thinking when the tokens ran out", "")
    assert split_reasoning("  no tags at all ") == ("", "no tags at all")
    rows = [{"kind": "held-out", "prompt": "问", "reference": "答", "base_answer": "", "base_trace": "想<b>",
             "tuned_answer": "答", "tuned_trace": "辨证", "base_chrf": "0.0", "tuned_chrf": "100.0"}]
    page = render_report("t", {}, rows, {})
    assert page.count('<details class="trace">') == 2 and "no final answer within max_new_tokens" in page
    assert "想&lt;b&gt;" in page and "Reasoning (2 characters)" in page


def test_training_rows_are_answered_beside_their_references(tiny_model, adapter, eval_parquet, tmp_path):
    from datasets import Dataset

    config = EvalConfig(max_generation_samples=1, train_probe_samples=3, max_new_tokens=4, probe_questions=[])
    result = evaluate_adapter(tiny_model, adapter, eval_parquet, str(tmp_path / "report.html"), config,
                              train_path=eval_parquet)  # any prepared split serves as "the training set"
    training = [row for row in result.rows if row["kind"] == "training"]
    data = Dataset.from_parquet(eval_parquet)
    spread = [0, round((len(data) - 1) / 2), len(data) - 1]  # first, middle, last
    assert [row["reference"] for row in training] == [data[i]["completion"] for i in spread]
    assert all(row["base_chrf"] and row["tuned_chrf"] for row in training)
    assert result.metrics["train_probe_rows"] == 3 and "train_probe_tuned_chrf" in result.metrics
    page = Path(result.report_path).read_text(encoding="utf-8")
    assert page.count('data-kind="training"') == 3 and "1 held-out" in page and "3 training" in page
