"""Configuration dataclasses: the one source of truth for every step's settings.

Each field carries its help text; the pipeline parameters, the CLI and the components are built from these
names. ``validate()`` collects every problem and raises once (see :func:`kubetune.errors.collect`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from kubetune.errors import collect

DatasetFormat = Literal["auto", "alpaca", "chat", "prompt_completion"]
PromptStyle = Literal["expert", "chat"]
LengthPolicy = Literal["drop", "truncate"]
Quantization = Literal["nf4", "fp4", "none"]
ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]
Attention = Literal["auto", "varlen", "flex_attention", "sdpa", "eager"]
GradientCheckpointing = Literal["auto", "on", "off"]
# transformers' SchedulerType values (tests check the two agree).
LrScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
]
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")
"""URI schemes of MLflow tracking stores."""
MAX_LORA_RANK = 2048  # far above any useful rank; a typo like 100000 would try to allocate hundreds of GB

DEFAULT_PERSONA = (
    "You are an expert physician of Traditional Chinese Medicine (TCM) with deep knowledge of TCM theory, "
    "diagnosis by pattern differentiation, herbal formulas and acupuncture. Answer accurately and carefully."
)
SAMPLE_DATASET = "kubetune://tcm-demo"
DEFAULT_BASE_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
ALL_LINEAR = "all-linear"


def _check_choices(config: Any, problems: list[tuple[str, str]]) -> None:
    """Every ``Literal[...]`` field holds one of its values (components and the CLI pass plain strings)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if typing.get_origin(hints[f.name]) is Literal:
            allowed = typing.get_args(hints[f.name])
            value = getattr(config, f.name)
            if value not in allowed:
                problems.append((f"{f.name}={value!r} is not one of {', '.join(allowed)}",
                                 f"set {f.name} to one of: {', '.join(allowed)}"))


def _check_seed(seed: int, problems: list[tuple[str, str]]) -> None:
    if seed < 0:
        problems.append((f"seed={seed} is negative", "use a seed of 0 or more, e.g. 42"))


def _check_finite(config: Any, names: tuple[str, ...], problems: list[tuple[str, str]]) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append((f"{name}={value} is not a finite number", f"give {name} a finite value"))


def _help(text: str, default: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class DataConfig:
    """How a raw dataset becomes prompt/completion pairs for SFT."""

    dataset: str = _help(
        "Dataset: a local file or folder (jsonl, json, parquet, csv), an s3:// or gs:// URI, a hub id, "
        f"or {SAMPLE_DATASET} for the bundled demo data.",
        SAMPLE_DATASET,
    )
    dataset_format: DatasetFormat = _help(
        "Row format: alpaca (instruction/input/output), chat (messages), prompt_completion, or auto to detect.",
        "auto",
    )
    dataset_subset: str = _help(
        "Configuration (subset) of a hub dataset, e.g. mrpc of glue; empty = the dataset's default.", "")
    dataset_split: str = _help("Split to read when the dataset is a hub id.", "train")
    instruction_column: str = _help("Column holding the instruction (alpaca), overrides detection.", "")
    input_column: str = _help("Column holding the optional input/context (alpaca).", "")
    output_column: str = _help("Column holding the answer (alpaca).", "")
    messages_column: str = _help("Column holding the chat messages list (chat).", "")
    prompt_column: str = _help("Column holding the prompt (prompt_completion).", "")
    completion_column: str = _help("Column holding the completion (prompt_completion).", "")
    prompt_style: PromptStyle = _help(
        "expert: persona + instruction/response template; chat: the tokenizer's chat template with the persona "
        "as the system message.",
        "expert",
    )
    persona: str = _help("The expert persona placed at the top of every prompt.", DEFAULT_PERSONA)
    max_length: int = _help("Maximum tokens per sample (prompt + completion).", 2048)
    length_policy: LengthPolicy = _help(
        "What to do with samples longer than max_length: drop them, or truncate: cut an over-long input in its "
        "middle (its start and end kept) so the instruction and answer fit, then the completion.", "truncate"
    )
    max_samples: int = _help("Keep at most this many rows after cleaning, sampled with the seed (0 = all).", 0)
    eval_fraction: float = _help("Fraction of rows held out for evaluation, in (0, 1).", 0.1)
    max_eval_samples: int = _help("Cap on held-out rows (0 = no cap).", 200)
    seed: int = _help("Seed for sampling, the train/eval split and training.", 42)
    num_proc: int = _help("Processes for tokenization (0 = one per CPU core, at most 8).", 0)

    def validate(self) -> None:
        collect(self.problems())

    def problems(self) -> list[tuple[str, str]]:
        """Every (problem, fix) of these settings; empty when they are valid."""
        problems: list[tuple[str, str]] = []
        if not self.dataset.strip():
            problems.append(("dataset is empty", f"pass a file, folder, s3:// or gs:// URI, hub id or {SAMPLE_DATASET}"))
        if self.max_length < 16:
            problems.append((f"max_length={self.max_length} is too small", "use at least 16 tokens, e.g. 2048"))
        if not 0.0 < self.eval_fraction < 1.0:
            problems.append(
                (f"eval_fraction={self.eval_fraction} is outside (0, 1)", "use a fraction such as 0.1 for 10% held out")
            )
        if self.max_samples < 0:
            problems.append((f"max_samples={self.max_samples} is negative", "use 0 for all rows or a positive count"))
        if self.max_eval_samples < 0:
            problems.append((f"max_eval_samples={self.max_eval_samples} is negative", "use 0 for no cap"))
        if self.num_proc < 0:
            problems.append((f"num_proc={self.num_proc} is negative", "use 0 for one process per CPU core"))
        _check_seed(self.seed, problems)
        _check_choices(self, problems)
        return problems


@dataclass
class QuantConfig:
    """How the base model is stored for training."""

    quantization: Quantization = _help("4-bit scheme: nf4, fp4, or none for plain bf16 LoRA.", "nf4")
    double_quant: bool = _help("Quantize the quantization constants too (saves about 0.4 bit per weight).", True)
    compute_dtype: ComputeDtype = _help(
        "Dtype of the 4-bit matmuls: auto picks bfloat16 where the hardware has it, float16 otherwise.", "auto"
    )

    def validate(self) -> None:
        collect(self.problems())

    def problems(self) -> list[tuple[str, str]]:
        """Every (problem, fix) of these settings; empty when they are valid."""
        problems: list[tuple[str, str]] = []
        _check_choices(self, problems)
        return problems


@dataclass
class LoraSettings:
    """The LoRA adapter."""

    lora_r: int = _help("LoRA rank.", 16)
    lora_alpha: int = _help("LoRA alpha (scale = alpha / r).", 32)
    lora_dropout: float = _help("Dropout on the LoRA input.", 0.0)
    target_modules: str = _help(
        f"Comma-separated module names to adapt, or {ALL_LINEAR} for every linear layer but the output head.",
        ALL_LINEAR,
    )

    def target_list(self) -> list[str] | str:
        if self.target_modules.strip() == ALL_LINEAR:
            return ALL_LINEAR
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def validate(self) -> None:
        collect(self.problems())

    def problems(self) -> list[tuple[str, str]]:
        """Every (problem, fix) of these settings; empty when they are valid."""
        problems: list[tuple[str, str]] = []
        if self.lora_r <= 0:
            problems.append((f"lora_r={self.lora_r} must be positive", "use a rank such as 8, 16 or 64"))
        elif self.lora_r > MAX_LORA_RANK:
            problems.append((f"lora_r={self.lora_r} is far larger than any useful LoRA rank",
                             f"use a rank such as 8, 16 or 64 (at most {MAX_LORA_RANK})"))
        _check_finite(self, ("lora_dropout",), problems)
        if self.lora_alpha <= 0:
            problems.append((f"lora_alpha={self.lora_alpha} must be positive", "use e.g. 2 x lora_r"))
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append((f"lora_dropout={self.lora_dropout} is outside [0, 1)", "use 0.0 to 0.1"))
        if not self.target_list():
            problems.append(("target_modules is empty", f"use {ALL_LINEAR} or names like q_proj,v_proj"))
        return problems


@dataclass
class TrainConfig:
    """The SFT run. Speed settings default to auto: decided from the hardware at run time."""

    learning_rate: float = _help("Peak learning rate.", 2e-4)
    lr_scheduler: LrScheduler = _help("Learning-rate schedule (linear, cosine, constant, ...).", "cosine")
    warmup_ratio: float = _help("Fraction of steps spent warming up.", 0.03)
    num_epochs: float = _help("Epochs over the training set (ignored when max_steps > 0).", 1.0)
    max_steps: int = _help("Stop after this many optimizer steps (0 = run num_epochs).", 0)
    batch_tokens: int = _help(
        "Tokens per packed micro-batch (0 = auto: sized from free GPU memory, 8x max_length on the CPU).", 0
    )
    gradient_accumulation: int = _help("Micro-batches per optimizer step.", 1)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    max_grad_norm: float = _help("Gradient clipping norm.", 1.0)
    packing: bool = _help("Pack samples into batches without padding, each sample attending only to itself.", True)
    attention: Attention = _help(
        "Attention kernel: auto (varlen with packing, else sdpa), varlen, flex_attention, sdpa or eager.", "auto"
    )
    gradient_checkpointing: GradientCheckpointing = _help(
        "Recompute activations in backward: auto turns it on only when free GPU memory needs it.", "auto"
    )
    fused_kernels: bool = _help(
        "Fuse the LoRA update into one GEMM per layer, and use Liger kernels (RMSNorm, SwiGLU, RoPE, linear+loss) "
        "when installed.",
        True,
    )
    lean: bool = _help(
        "Lean mode for small GPUs: checkpointing with CPU offload, input embedding in host memory, 8,192-token "
        "packed batches, 8-bit optimizer.",
        False,
    )
    optimizer: str = _help("Optimizer name as transformers knows it (auto = fused AdamW, 8-bit in lean mode).", "auto")
    logging_steps: int = _help("Log metrics every N optimizer steps.", 1)
    save_steps: int = _help("Checkpoint every N optimizer steps (0 = only at the end).", 50)
    save_total_limit: int = _help("Checkpoints kept in the checkpoint directory.", 2)
    seed: int = _help("Training seed.", 42)
    trust_remote_code: bool = _help("Allow model code from the hub (off: only architectures transformers ships).", False)

    def validate(self) -> None:
        collect(self.problems())

    def problems(self) -> list[tuple[str, str]]:
        """Every (problem, fix) of these settings; empty when they are valid."""
        problems: list[tuple[str, str]] = []
        _check_finite(self, ("learning_rate", "num_epochs", "warmup_ratio", "weight_decay", "max_grad_norm"), problems)
        _check_seed(self.seed, problems)
        if self.learning_rate <= 0:
            problems.append((f"learning_rate={self.learning_rate} must be positive", "use e.g. 2e-4 for LoRA"))
        if self.num_epochs <= 0 and self.max_steps <= 0:
            problems.append(("neither num_epochs nor max_steps is positive", "set num_epochs=1 or max_steps>0"))
        if self.max_steps < 0:
            problems.append((f"max_steps={self.max_steps} is negative", "use 0 to run num_epochs"))
        if self.batch_tokens < 0:
            problems.append((f"batch_tokens={self.batch_tokens} is negative", "use 0 for auto"))
        if self.gradient_accumulation < 1:
            problems.append((f"gradient_accumulation={self.gradient_accumulation} must be >= 1", "use 1 or more"))
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append((f"warmup_ratio={self.warmup_ratio} is outside [0, 1)", "use e.g. 0.03"))
        if self.save_steps < 0:
            problems.append((f"save_steps={self.save_steps} is negative", "use 0 to save only at the end"))
        if self.save_total_limit < 1:
            problems.append((f"save_total_limit={self.save_total_limit} keeps no checkpoint to resume from",
                             "keep at least 1 (2 survives a kill during a save)"))
        if self.logging_steps < 1:
            problems.append((f"logging_steps={self.logging_steps} must be >= 1", "use 1 to log every step"))
        _check_choices(self, problems)
        return problems


@dataclass
class EvalConfig:
    """Base-vs-tuned evaluation."""

    probe_questions: list[str] = _help(
        "Questions asked of both models besides the held-out prompts (the side-by-side check).",
        ["久咳不愈怎么治疗？", "How should a persistent cough be treated in Traditional Chinese Medicine?"],
    )
    max_new_tokens: int = _help("Cap on generated tokens per answer (after the thinking, for reasoning models).", 256)
    generation_batch_size: int = _help("Prompts generated together (0 = auto).", 0)
    max_generation_samples: int = _help("Held-out prompts to generate answers for (0 = all).", 32)
    train_probe_samples: int = _help(
        "Training rows also answered by both models, beside their reference answers: where fine-tuning shows first "
        "(the tuned answers move toward what was trained).", 0)
    eval_batch_tokens: int = _help("Tokens per batch for loss/perplexity (0 = auto).", 0)
    capability_check: str = _help(
        "Multiple-choice questions on general knowledge, answered by base and tuned model to catch what fine-tuning "
        "made it forget: a JSONL file (question, choices, answer), 'builtin' for the shipped set, or empty for none.",
        "")
    reasoning: Literal["auto", "on", "off"] = _help(
        "Whether the model thinks in <think>…</think> before answering (DeepSeek-R1 distills, QwQ, Qwen3): auto "
        "detects it from the chat template; then the trace is kept apart and only the final answer is scored.",
        "auto")
    thinking_budget: int = _help(
        "Reasoning models: tokens of thinking before the answer is asked for (</think> is written for an answer "
        "still thinking). R1-distill 7B thinks a few hundred to ~1,500 tokens on a domain question.", 1024)
    temperature: float = _help("Sampling temperature of the answers; 0 = greedy (reproducible comparisons).", 0.0)
    top_p: float = _help("Nucleus sampling share when temperature > 0.", 1.0)
    repetition_penalty: float = _help("Penalty on repeated tokens (1 = none).", 1.0)
    seed: int = _help("Seed for sampling, the train/eval split and training.", 42)
    fast_generation: bool = _help(
        "Generate on the 4-bit base dequantized once (same weights), adapter attached, when memory allows.",
        True)

    def validate(self) -> None:
        collect(self.problems())

    def problems(self) -> list[tuple[str, str]]:
        """Every (problem, fix) of these settings; empty when they are valid."""
        problems: list[tuple[str, str]] = []
        if self.max_new_tokens <= 0:
            problems.append((f"max_new_tokens={self.max_new_tokens} must be positive", "use e.g. 256"))
        if self.generation_batch_size < 0:
            problems.append((f"generation_batch_size={self.generation_batch_size} is negative", "use 0 for auto"))
        if self.train_probe_samples < 0:
            problems.append((f"train_probe_samples={self.train_probe_samples} is negative", "use 0 for none"))
        if self.max_generation_samples < 0:
            problems.append((f"max_generation_samples={self.max_generation_samples} is negative", "use 0 for all"))
        if self.eval_batch_tokens < 0:
            problems.append((f"eval_batch_tokens={self.eval_batch_tokens} is negative", "use 0 for auto"))
        if self.reasoning not in ("auto", "on", "off"):
            problems.append((f"reasoning={self.reasoning!r} is not auto, on or off", "use reasoning=auto"))
        if self.thinking_budget <= 0:
            problems.append((f"thinking_budget={self.thinking_budget} must be positive", "use e.g. 1024"))
        if self.temperature < 0:
            problems.append((f"temperature={self.temperature} is negative", "use 0 for greedy or e.g. 0.6"))
        if not 0 < self.top_p <= 1:
            problems.append((f"top_p={self.top_p} is outside (0, 1]", "use e.g. 0.95, or 1 for no cut"))
        if self.repetition_penalty <= 0:
            problems.append((f"repetition_penalty={self.repetition_penalty} must be positive", "use 1 for none"))
        _check_seed(self.seed, problems)
        return problems


@dataclass
class RunConfig:
    """Settings of a pipeline run that no single step's config holds: the base model, tracking, checkpoints."""

    base_model: str = _help("Base model: a local directory (e.g. on the cache volume, /cache/...) or a hub id.",
                            DEFAULT_BASE_MODEL)
    model_revision: str = _help("Hub revision (branch, tag or commit) of base_model; empty for the default branch.", "")
    columns: str = _help("Explicit column mapping, e.g. instruction=question,output=answer (empty = detect).", "")
    checkpoint_dir: str = _help(
        "Where SFT checkpoints go; a retried step resumes from the last one. Empty = /cache/checkpoints/<run id> "
        "when a cache volume is mounted, else beside the output (lost with the pod).",
        "",
    )
    mlflow_tracking_uri: str = _help(
        "MLflow tracking URI; empty = MLFLOW_TRACKING_URI of the pod, else a local sqlite store.", ""
    )
    mlflow_experiment: str = _help("MLflow experiment name.", "kubetune")
    mlflow_required: bool = _help(
        "On a cluster, stop the SFT and evaluation steps at start when they have no MLflow tracking server; false "
        "keeps their records in their mlflow_store output instead, to load later with `kubetune mlflow-import`.",
        True,
    )
    trust_remote_code: bool = _help("Allow model and tokenizer code from the hub.", False)

    def validate(self) -> None:
        collect(self.problems())

    def problems(self) -> list[tuple[str, str]]:
        """Every (problem, fix) of these settings; empty when they are valid."""
        problems: list[tuple[str, str]] = []
        if not self.base_model.strip():
            problems.append(("base_model is empty", "pass a local model directory or a hub id"))
        problems += tracking_uri_problems(self.mlflow_tracking_uri)
        return problems


def tracking_uri_problems(uri: str) -> list[tuple[str, str]]:
    """An MLflow tracking URI needs a scheme MLflow can store runs in (checked before anything runs)."""
    uri = uri.strip()
    fix = "use http(s)://host:port for a tracking server or sqlite:////abs/path/mlflow.db"
    if not uri or uri.startswith("databricks"):
        return []
    if "://" not in uri:
        return [("mlflow_tracking_uri has no scheme (http://, https://, sqlite:///...)", fix)]
    scheme = uri.split("://", 1)[0].lower().split("+", 1)[0]
    if scheme not in TRACKING_SCHEMES:
        return [(f"mlflow_tracking_uri has the scheme {scheme}://, which MLflow cannot store runs in",
                 f"{fix} (MLflow stores: {', '.join(TRACKING_SCHEMES)})")]
    return []


def to_dict(config: Any) -> dict[str, Any]:
    """A config's fields as a plain dict (for metadata and MLflow params)."""
    return dataclasses.asdict(config)


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build ``cls`` from the keys of ``values`` that it declares; other keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})
