"""4-bit model load component (CPU or GPU node)."""

from kfp import dsl
from kfp.dsl import Model, Output
from kubetune.containers.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def quantize_model(
    model: Output[Model],
    base_model: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    model_revision: str = "",
    quantization: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "auto",
    trust_remote_code: bool = False,
    model_version: str = "",
    cache_root: str = "",
):
    """Load a base model in 4-bit with bitsandbytes and save the pre-quantized model (safetensors) and tokenizer.

    Runs on a CPU node so downloads never hold a GPU; KFP's cache reuses the output while the model's version
    (from resolve_sources) and the settings are unchanged. The artifact's metadata records the source, revision, content hash and quantization settings.

    Args:
        base_model: Base model: a local directory (e.g. on the cache volume, /cache/...) or a hub id.
        model_revision: Hub revision (branch, tag or commit) of base_model; empty for the default branch.
        quantization: 4-bit scheme: nf4, fp4, or none for plain bf16 LoRA.
        double_quant: Quantize the quantization constants too (saves about 0.4 bit per weight).
        compute_dtype: Dtype of the 4-bit matmuls: auto picks bfloat16 where the hardware has it, float16
            otherwise.
        trust_remote_code: Allow model and tokenizer code from the hub.
        model_version: The base model's current version (resolve_sources): part of the cache key, recorded in
            the metadata.
        cache_root: Volume directory for the hub download (HF_HOME=<cache_root>/huggingface); empty = the
            image's HF_HOME.

    Returns:
        model: The pre-quantized model and tokenizer; metadata: source, revision, hash, quantization.
    """
    from kubetune.config import QuantConfig
    from kubetune.errors import clear_errors
    from kubetune.steps import quantize

    with clear_errors():
        metadata = quantize(
            base_model, model.path,
            QuantConfig(quantization=quantization, double_quant=double_quant, compute_dtype=compute_dtype),
            revision=model_revision, trust_remote_code=trust_remote_code, cache_root=cache_root,
        )
    metadata["model_version"] = model_version
    model.metadata.update(metadata)
