"""Base-vs-tuned evaluation component (GPU)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output
from kubetune.containers.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate_model(
    model: Input[Model],
    adapter: Input[Model],
    eval_data: Input[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    mlflow_store: Output[Artifact],
    training_mlflow_store: Input[Artifact] = None,
    train_data: Input[Dataset] = None,
    probe_questions: list = ["久咳不愈怎么治疗？", "How should a persistent cough be treated in Traditional Chinese Medicine?"],
    max_new_tokens: int = 256,
    max_generation_samples: int = 32,
    train_probe_samples: int = 0,
    capability_check: str = "",
    reasoning: str = "auto",
    thinking_budget: int = 1024,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    fast_generation: bool = True,
    mlflow_tracking_uri: str = "",
    mlflow_experiment: str = "kubetune",
    mlflow_required: bool = True,
    kfp_run_id: str = "",
    kfp_run_name: str = "",
    trust_remote_code: bool = False,
):
    """Compare the base model and the tuned adapter on the held-out set: loss, perplexity and chrF (works for
    Chinese and English), plus batched greedy answers to the held-out prompts and to the probe questions, shown
    side by side in an HTML report. Logs metrics, the answers table and the report to the training's MLflow run.

    Args:
        model: The 4-bit base model from quantize_model.
        adapter: The LoRA adapter from train_lora (its metadata names the MLflow run).
        eval_data: Held-out rows from prepare_dataset.
        training_mlflow_store: train_lora's mlflow_store: where evaluation carries on when training had no
            tracking server.
        train_data: The prepared training set from prepare_dataset (read only for train_probe_samples).
        probe_questions: Questions asked of both models besides the held-out prompts (the side-by-side check).
        max_new_tokens: Cap on generated tokens per answer (after the thinking, for reasoning models).
        max_generation_samples: Held-out prompts to generate answers for (0 = all).
        train_probe_samples: Training rows also answered by both models, beside their reference answers: where
            fine-tuning shows first (the tuned answers move toward what was trained).
        capability_check: Multiple-choice questions on general knowledge, answered by base and tuned model to catch
            what fine-tuning made it forget: a JSONL file (question, choices, answer), 'builtin' for the shipped
            set, or empty for none.
        reasoning: Whether the model thinks in <think>…</think> before answering (DeepSeek-R1 distills, QwQ,
            Qwen3): auto detects it from the chat template; then the trace is kept apart and only the final answer
            is scored.
        thinking_budget: Reasoning models: tokens of thinking before the answer is asked for (</think> is written
            for an answer still thinking). R1-distill 7B thinks a few hundred to ~1,500 tokens on a domain question.
        temperature: Sampling temperature of the answers; 0 = greedy (reproducible comparisons).
        top_p: Nucleus sampling share when temperature > 0.
        repetition_penalty: Penalty on repeated tokens (1 = none).
        fast_generation: Generate on the 4-bit base dequantized once (same weights), adapter attached, when memory
            allows.
        mlflow_tracking_uri: MLflow tracking URI; empty = MLFLOW_TRACKING_URI of the pod, else a local sqlite
            store.
        mlflow_experiment: MLflow experiment name.
        mlflow_required: On a cluster, stop the SFT and evaluation steps at start when they have no MLflow
            tracking server; false keeps their records in their mlflow_store output instead, to load later
            with `kubetune mlflow-import`.
        kfp_run_id: The KFP run id, tagged on the MLflow run.
        kfp_run_name: The KFP run name.
        trust_remote_code: Allow model and tokenizer code from the hub.

    Returns:
        metrics: Base vs tuned loss, perplexity and chrF, shown on the Kubeflow run page.
        report: The HTML report with base and tuned answers side by side, shown by the Kubeflow UI.
        mlflow_store: The MLflow store (training's and evaluation's records) when there was no tracking server,
            else a note naming the server.
    """
    from kubetune import steps
    from kubetune.config import EvalConfig
    from kubetune.errors import clear_errors
    from kubetune.tracking import Tracking

    with clear_errors():
        result = steps.evaluate(
            model.path, adapter.path, eval_data.path, report.path,
            EvalConfig(probe_questions=[str(q) for q in probe_questions], max_new_tokens=max_new_tokens,
                       max_generation_samples=max_generation_samples, train_probe_samples=train_probe_samples,
                       capability_check=capability_check,
                       reasoning=reasoning,
                       thinking_budget=thinking_budget, temperature=temperature, top_p=top_p,
                       repetition_penalty=repetition_penalty, fast_generation=fast_generation),
            tracking=Tracking(mlflow_tracking_uri, mlflow_experiment, "", kfp_run_id, kfp_run_name,
                              required=mlflow_required, store_dir=mlflow_store.path).for_evaluation(
                adapter.metadata, training_mlflow_store.path if training_mlflow_store else ""),
            data_metadata=dict(eval_data.metadata),
            train_path=train_data.path if train_data else "",
            trust_remote_code=trust_remote_code,
        )
    for name, value in steps.numbers(result).items():
        metrics.log_metric(name, value)
    report.metadata.update(steps.report_metadata(result))
    if result["tracking_report"]:
        print(result["tracking_report"], flush=True)
