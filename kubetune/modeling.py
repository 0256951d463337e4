"""Resolve, load and quantize base models; load the 4-bit model back for training and evaluation."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.config import QuantConfig, to_dict
from kubetune.errors import KubetuneError
from kubetune.storage import atomic_dir, file_sha256

WEIGHT_SUFFIXES = (".safetensors",)
METADATA_FILE = "kubetune_model.json"
# Set (to the accelerator resource, e.g. nvidia.com/gpu) on steps whose placement gives them a GPU: a step that
# then sees no CUDA device stops at once instead of training a 7B model on the CPU for days.
REQUIRE_GPU_ENV = "KUBETUNE_REQUIRE_GPU"
REQUIRE_GPU_ANNOTATION = "kubetune.io/require-gpu"  # the pod annotation the pipeline maps onto REQUIRE_GPU_ENV
_OFF = {"", "0", "false", "no", "off"}
MIN_VOCABULARY = 16  # fewer tokens than this is no tokenizer (the tiny test model has 256 and up)


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from: a local directory, or a hub id with a revision."""

    location: str
    is_local: bool
    revision: str | None = None

    def describe(self) -> str:
        if self.is_local:
            return self.location
        return f"{self.location}@{self.revision or 'main'}"


def resolve_model_source(source: str, revision: str | None = None) -> ModelSource:
    """Classify ``source`` as a local directory or a hub id, and check a local one holds safetensors weights."""
    source = source.strip()
    if not source:
        raise KubetuneError("base_model is empty", "pass a local model directory or a hub id such as Qwen/Qwen2.5-7B")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise KubetuneError(
                f"base model path {source} is a file, not a model directory",
                "pass the directory that holds config.json and the *.safetensors weights",
            )
        if not (path / "config.json").is_file():
            raise KubetuneError(
                f"model directory {source} has no config.json",
                "point base_model at a directory written by save_pretrained (config.json + *.safetensors)",
            )
        if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
            found = sorted(p.name for p in path.iterdir())[:20]
            raise KubetuneError(
                f"model directory {source} holds no *.safetensors weights (found: {', '.join(found) or 'nothing'})",
                "save the model with save_pretrained(safe_serialization=True); pickled .bin weights are not loaded "
                "for safety",
            )
        return ModelSource(str(path.resolve()), is_local=True)
    # "org/name" (one slash, no leading dot or slash) is a hub id; anything else path-like is a missing directory.
    parts = source.split("/")
    if source.startswith((".", "/", "~")) or len(parts) > 2 or any(not p for p in parts):
        raise KubetuneError(
            f"base model path {source} does not exist",
            "check the path (on a cluster: that the volume holding it is mounted), or pass a hub id like org/name",
        )
    return ModelSource(source, is_local=False, revision=revision or None)


def content_hash(directory: str | Path) -> str:
    """sha256 over the names and bytes of the files that define a model (config, tokenizer, weights)."""
    return file_sha256(directory, exclude=frozenset({METADATA_FILE}))


def pick_compute_dtype(requested: str = "auto"):
    """bfloat16 where the hardware runs it natively (Ampere+ GPUs, CPUs), float16 on older GPUs."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def bnb_config(quant: QuantConfig):
    """The BitsAndBytesConfig for ``quant``, or None for plain (unquantized) LoRA."""
    if quant.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quantization,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=pick_compute_dtype(quant.compute_dtype),
        bnb_4bit_quant_storage="uint8",
    )


def load_tokenizer(source: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """Load a tokenizer from a local directory or hub id; make sure it has a pad token for batching."""
    from transformers import AutoTokenizer

    resolved = resolve_model_source(source, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolved.location, revision=resolved.revision, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise KubetuneError(
            f"could not load a tokenizer from {resolved.describe()}: {str(exc).splitlines()[0]}",
            "check the model id and revision, network access to the hub (HF_TOKEN for gated models), "
            "or point base_model at a local directory with tokenizer files",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - mapped to a clear error where recognised, else re-raised
        _raise_for_model(exc, resolved)
        raise
    if len(tokenizer) < MIN_VOCABULARY:  # transformers builds an empty tokenizer from a folder without its files
        raise KubetuneError(
            f"the tokenizer of {resolved.describe()} has {len(tokenizer)} token(s): the model has no tokenizer files "
            "(tokenizer.json or vocab/merges, tokenizer_config.json)",
            "copy the base model's tokenizer files into that folder, or point base_model at the complete model",
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _cuda_unavailable_reason() -> str:
    import torch

    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - the driver's own words say most (version mismatch, no device)
        return str(exc).splitlines()[0][:300]
    return "no CUDA device is visible"


def check_gpu_requirement(environ: dict[str, str] | None = None) -> None:
    """Fail with the fix when the step's placement demands a GPU (``KUBETUNE_REQUIRE_GPU``) and there is none.

    The pipeline sets the variable only where placement is applied (Kubernetes), so ``kfp.local`` runs, which
    ignore placement, train on the CPU as designed.
    """
    import torch

    environ = os.environ if environ is None else environ
    wanted = environ.get(REQUIRE_GPU_ENV, "").strip()
    if wanted.lower() in _OFF or torch.cuda.is_available():
        return
    visible = ", ".join(
        f"{name}={environ[name]!r}" for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES") if name in environ
    )
    raise KubetuneError(
        f"this step was placed on a GPU ({REQUIRE_GPU_ENV}={wanted}) but PyTorch sees none: "
        f"{_cuda_unavailable_reason()} (torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"
        f"{', ' + visible if visible else ''})",
        "run the step on a node with a working NVIDIA driver and device plugin (`nvidia-smi` in the pod must list "
        "the GPU) and the GPU image, whose CUDA version the driver must support; to run it on the CPU on purpose, "
        f"set {REQUIRE_GPU_ENV}=0",
    )


def _device_map() -> dict[str, Any]:
    import torch

    check_gpu_requirement()
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return {"": "cpu"}


def quantize_model(
    source: str,
    output_dir: str,
    quant: QuantConfig,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Load ``source`` (4-bit with bitsandbytes unless quantization is none) and save it with its tokenizer.

    Runs on a CPU node as well as a GPU node. The directory is written under a temporary name and moved into
    place when complete. Returns the metadata also written to ``output_dir/kubetune_model.json``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    quant.validate()
    resolved = resolve_model_source(source, revision)
    tokenizer = load_tokenizer(source, revision=revision, trust_remote_code=trust_remote_code)
    started = time.time()
    quantization_config = bnb_config(quant)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location,
            revision=resolved.revision,
            dtype=pick_compute_dtype(quant.compute_dtype),
            quantization_config=quantization_config,
            device_map=_device_map(),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            low_cpu_mem_usage=True,
        )
    except OSError as exc:
        raise KubetuneError(
            f"could not load model weights from {resolved.describe()}: {str(exc).splitlines()[0]}",
            "check the model id/revision and hub access, or that the directory holds *.safetensors weights",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - mapped to a clear error where recognised, else re-raised
        _raise_for_model(exc, resolved)
        raise
    commit = getattr(model.config, "_commit_hash", None)
    metadata: dict[str, Any] = {
        "source": resolved.location,
        "source_is_local": resolved.is_local,
        "revision": resolved.revision or "",
        "resolved_commit": commit or "",
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "quantized_on": "cuda" if torch.cuda.is_available() else "cpu",
        **{f"quant_{k}": v for k, v in to_dict(quant).items()},
        "compute_dtype_resolved": str(pick_compute_dtype(quant.compute_dtype)).removeprefix("torch."),
        "load_seconds": round(time.time() - started, 2),
    }
    if resolved.is_local:
        metadata["source_sha256"] = content_hash(resolved.location)
    with atomic_dir(output_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        metadata["output_sha256"] = content_hash(staging)
        (Path(staging) / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    del model
    return metadata


def read_model_metadata(model_dir: str | Path) -> dict[str, Any]:
    """Metadata written by :func:`quantize_model`; empty for a plain model directory."""
    path = Path(model_dir) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_model(
    model_dir: str,
    *,
    attention: str = "sdpa",
    compute_dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """Load a model saved by :func:`quantize_model` (pre-quantized 4-bit or plain) onto this process's device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    resolved = resolve_model_source(model_dir)
    device_map = _device_map()
    dtype = pick_compute_dtype(compute_dtype)
    try:
        config = AutoConfig.from_pretrained(resolved.location, trust_remote_code=trust_remote_code)
        saved = getattr(config, "quantization_config", None)
        if saved:
            # A pre-quantized checkpoint keeps its 4-bit layout; only the compute dtype follows this machine.
            saved = saved if isinstance(saved, dict) else saved.to_dict()
            config.quantization_config = {**saved, "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch.")}
        return AutoModelForCausalLM.from_pretrained(
            resolved.location,
            dtype=dtype,
            attn_implementation=attention,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            config=config,
        )
    except Exception as exc:  # noqa: BLE001 - mapped to a clear error where recognised, else re-raised
        _raise_for_model(exc, resolved)
        raise


def _raise_for_model(exc: Exception, resolved: ModelSource) -> None:
    """Turn what transformers and safetensors raise for a model that cannot be loaded into one error naming the
    model and the fix: code it would have to run, an architecture it does not know, damaged or mismatched weights.
    Anything else is left to propagate."""
    _raise_if_remote_code(exc, resolved)
    text = str(exc)
    if "does not recognize this architecture" in text or "Unrecognized model" in text:
        raise KubetuneError(
            f"model {resolved.describe()} has a model_type that this transformers ({_transformers_version()}) does "
            "not know",
            "check model_type in its config.json, or use a model of an architecture transformers ships",
        ) from None
    if type(exc).__name__ == "SafetensorError":
        raise KubetuneError(f"the weights of {resolved.describe()} are damaged or incomplete: {text[:200]}",
                            "copy or download the model again (a transfer may have been cut short)") from None
    if "size mismatch" in text:
        raise KubetuneError(f"the weights of {resolved.describe()} do not match its config.json: {text[:300]}",
                            "use the config.json that was saved with these weights") from None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _raise_if_remote_code(exc: Exception, resolved: ModelSource) -> None:
    """transformers refuses a model that ships its own Python code unless trust_remote_code is on: say so."""
    if "trust_remote_code" in str(exc):
        raise KubetuneError(
            f"model {resolved.describe()} ships its own Python code (auto_map in config.json), and "
            "trust_remote_code is off, so it is not run",
            "use a model whose architecture transformers ships (the usual case: Qwen2, Llama, ...), or, only if you "
            "trust its author and have read the code, set trust_remote_code=true",
        ) from None
