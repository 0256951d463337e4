"""The kubetune fine-tuning pipeline: dataset prep → 4-bit model load → LoRA SFT → evaluation.

One pipeline, built by :func:`make_pipeline` from compile-time options (placement profile, images, volume,
secrets). Run-time settings are pipeline parameters, the names the Kubeflow UI shows.
"""


from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from kfp import dsl
from kfp.dsl import HTML, Model
from kubetune.components import evaluate_model, prepare_dataset, quantize_model, train_lora
from kubetune.pipelines.placement import Profile, apply_placement, load_profile

from kubetune.config import DEFAULT_PERSONA, SAMPLE_DATASET

PIPELINE_NAME = "kubetune-finetune"
DEFAULT_BASE_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
DEFAULT_PROBES = ["久咳不愈怎么治疗？", "How should a persistent cough be treated in Traditional Chinese Medicine?"]


@dataclass
class PipelineOptions:
    """Compile-time choices; everything else is a run-time pipeline parameter."""

    profile: Profile = field(default_factory=load_profile)
    cpu_image: str = ""
    gpu_image: str = ""
    retries: int = 2
    cache_prep_and_model: bool = True


class PipelineOutputs(NamedTuple):
    adapter: Model
    report: HTML


def make_pipeline(options: Optional[PipelineOptions] = None):  # noqa: UP045 - kfp reads annotations at runtime
    """Build the pipeline function for these options (compile it, or call it under kfp.local)."""
    options = options or PipelineOptions()
    steps = options.profile.steps

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="QLoRA fine-tuning: dataset prep (CPU) → 4-bit model load (CPU) → LoRA SFT (GPU) → "
        "base-vs-tuned evaluation (GPU), logged to MLflow.",
    )
    def finetune(
        dataset: str = SAMPLE_DATASET,
        base_model: str = DEFAULT_BASE_MODEL,
        model_revision: str = "",
        dataset_format: str = "auto",
        columns: str = "",
        prompt_style: str = "expert",
        persona: str = DEFAULT_PERSONA,
        max_length: int = 2048,
        length_policy: str = "truncate",
        max_samples: int = 0,
        eval_fraction: float = 0.1,
        max_eval_samples: int = 200,
        quantization: str = "nf4",
        double_quant: bool = True,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        target_modules: str = "all-linear",
        learning_rate: float = 2e-4,
        lr_scheduler: str = "cosine",
        warmup_ratio: float = 0.03,
        num_epochs: float = 1.0,
        max_steps: int = 0,
        batch_tokens: int = 0,
        gradient_accumulation: int = 1,
        lean: bool = False,
        save_steps: int = 50,
        checkpoint_dir: str = "",
        seed: int = 42,
        probe_questions: list = DEFAULT_PROBES,
        max_new_tokens: int = 256,
        max_generation_samples: int = 32,
        mlflow_tracking_uri: str = "",
        mlflow_experiment: str = "kubetune",
        trust_remote_code: bool = False,
    ) -> PipelineOutputs:
        prep = prepare_dataset(
            dataset=dataset, base_model=base_model, model_revision=model_revision, dataset_format=dataset_format,
            columns=columns, prompt_style=prompt_style, persona=persona, max_length=max_length,
            length_policy=length_policy, max_samples=max_samples, eval_fraction=eval_fraction,
            max_eval_samples=max_eval_samples, seed=seed, trust_remote_code=trust_remote_code,
        ).set_display_name("Prepare dataset")
        load = quantize_model(
            base_model=base_model, model_revision=model_revision, quantization=quantization,
            double_quant=double_quant, trust_remote_code=trust_remote_code,
        ).set_display_name("Load model in 4-bit")
        sft = train_lora(
            model=load.outputs["model"], train_data=prep.outputs["train_data"], lora_r=lora_r,
            lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
            learning_rate=learning_rate, lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio,
            num_epochs=num_epochs, max_steps=max_steps, batch_tokens=batch_tokens,
            gradient_accumulation=gradient_accumulation, lean=lean, save_steps=save_steps, seed=seed,
            checkpoint_dir=checkpoint_dir, mlflow_tracking_uri=mlflow_tracking_uri,
            mlflow_experiment=mlflow_experiment, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        ).set_display_name("LoRA SFT")
        evaluation = evaluate_model(
            model=load.outputs["model"], adapter=sft.outputs["adapter"], eval_data=prep.outputs["eval_data"],
            probe_questions=probe_questions, max_new_tokens=max_new_tokens,
            max_generation_samples=max_generation_samples, mlflow_tracking_uri=mlflow_tracking_uri,
            mlflow_experiment=mlflow_experiment, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        ).set_display_name("Evaluate base vs tuned")

        for task, name in ((prep, "prepare_dataset"), (load, "quantize_model"), (sft, "train_lora"),
                           (evaluation, "evaluate_model")):
            apply_placement(task, steps[name])
            image = options.gpu_image if steps[name].uses_gpu else options.cpu_image
            if image:
                task.set_container_image(image)
        for task in (prep, load):
            task.set_caching_options(options.cache_prep_and_model)
        for task in (sft, evaluation):
            # A new MLflow run per pipeline run: the tracked steps are never served from the cache.
            task.set_caching_options(False)
            if options.retries:
                task.set_retry(num_retries=options.retries, backoff_duration="60s", backoff_factor=2.0)
        return PipelineOutputs(adapter=sft.outputs["adapter"], report=evaluation.outputs["report"])

    return finetune


finetune_pipeline = make_pipeline()


def compile_pipeline(output_path: str, options: Optional[PipelineOptions] = None) -> str:  # noqa: UP045
    """Compile to KFP IR YAML (what the Kubeflow UI uploads)."""
    from kfp import compiler

    compiler.Compiler().compile(make_pipeline(options), package_path=output_path)
    return output_path
