"""A plain (unquantized) copy of a 4-bit model for generation: the nf4 weights dequantized once, the LoRA adapter
optionally merged in.

Why: decoding is a long chain of small steps, and a 4-bit base pays a dequantisation kernel per linear layer per
step (plus the adapter's own matmuls); with the weights dequantized once, a step is a plain matmul per layer.
For the base model the copy computes exactly what the 4-bit model computes for batched prompts (bitsandbytes
dequantizes to the compute dtype and runs the same matmul); the adapter, merged, adds ``B @ A * scale`` to the
weight in float32 before one rounding to the compute dtype.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

HEADROOM = 1.25  # the copy may take this share of free memory at most: the KV cache and activations need the rest


def _base_of(model):
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def copy_bytes(model) -> int:
    """Bytes the plain copy of ``model`` needs: every weight at its compute dtype (2 bytes for a 4-bit weight)."""
    total = 0
    for module in _base_of(model).modules():
        if hasattr(module, "lora_A"):  # the adapter is merged or left out, never copied
            continue
        for parameter in module.parameters(recurse=False):
            if hasattr(parameter, "quant_state"):  # a packed 4-bit tensor: 2 weights a byte, copied at 2 bytes each
                total += 2 * parameter.quant_state.shape.numel()
            else:
                total += parameter.numel() * parameter.element_size()
    return total


def fits_in_memory(model) -> tuple[bool, str]:
    """Whether a plain copy of ``model`` fits beside it on its device, and why not when it does not."""
    import torch

    device = _base_of(model).get_input_embeddings().weight.device
    need = copy_bytes(model) * HEADROOM
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    if need > free:
        return False, f"a plain copy needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on {device}"
    return True, ""


def _dequantized(layer):
    """The weight a 4-bit linear layer multiplies by, read through the layer itself: rows of an identity matrix in
    give the rows of W^T out, exactly (one nonzero product per sum), whatever packing bitsandbytes uses on this
    device (its CPU layout differs from its CUDA one)."""
    import torch

    dtype = getattr(layer, "compute_dtype", None) or torch.bfloat16
    device = layer.weight.device
    bias, layer.bias = layer.bias, None
    try:
        rows = []
        for start in range(0, layer.in_features, _EYE_ROWS):
            count = min(_EYE_ROWS, layer.in_features - start)
            eye = torch.zeros(count, layer.in_features, dtype=dtype, device=device)
            eye[torch.arange(count), torch.arange(start, start + count)] = 1
            rows.append(layer(eye))
    finally:
        layer.bias = bias
    return torch.cat(rows).t().contiguous()


_EYE_ROWS = 4096  # identity rows per call: bounds the transient memory for wide layers


def _source_tensor(base, name: str, merge: bool):
    """The weight or buffer ``name`` of the plain model, read from ``base`` (a model with LoRA layers inside, or
    none): dequantized when 4-bit, with the active adapters added when ``merge``. None when the layout is one this
    copy does not handle (8-bit weights, DoRA)."""
    import torch

    path, _, attribute = name.rpartition(".")
    module = base.get_submodule(path) if path else base
    lora = module if hasattr(module, "lora_A") else None
    if lora is not None:
        module = lora.get_base_layer()
    if hasattr(module, "modules_to_save"):  # a layer the adapter trained whole (peft's modules_to_save)
        active = [a for a in module.active_adapters if a in module.modules_to_save] if merge else []
        module = module.modules_to_save[active[0]] if active else module.original_module
    tensor = getattr(module, attribute)
    if hasattr(tensor, "SCB"):  # bitsandbytes 8-bit: not handled
        return None
    # a 4-bit layer's weight and bias at the activations' dtype, which bitsandbytes casts its output back to
    activations = base.get_input_embeddings().weight.dtype
    if hasattr(tensor, "quant_state"):
        tensor = _dequantized(module).to(activations)
    elif attribute == "bias" and hasattr(getattr(module, "weight", None), "quant_state"):
        tensor = tensor.to(activations)
    if merge and lora is not None and attribute == "weight":
        merged = tensor.float()
        for adapter in lora.active_adapters:
            if adapter not in lora.lora_A:
                continue
            if lora.use_dora.get(adapter, False):
                return None
            merged += lora.get_delta_weight(adapter).float()
        tensor = merged.to(tensor.dtype)
    return tensor.detach() if isinstance(tensor, torch.Tensor) else tensor


def plain_copy(model, *, merge_adapter: bool):
    """A plain model with ``model``'s weights (see the module doc), on ``model``'s device, in eval mode; the adapter
    merged when ``merge_adapter``, left out otherwise (the base model). None, with the reason logged, when the
    layout is not one it handles; the caller then generates with ``model`` itself."""
    import copy

    import torch

    base = _base_of(model)
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    device = base.get_input_embeddings().weight.device
    with torch.device("meta"):
        plain = type(base)._from_config(config)
    plain = plain.to_empty(device=device)
    sources = dict(plain.named_parameters(remove_duplicate=False)) | dict(plain.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, target in sources.items():
            tensor = _source_tensor(base, name, merge_adapter)
            if tensor is None:
                log.info("generation uses the 4-bit model: %s has a layout a plain copy does not handle", name)
                return None
            if tuple(tensor.shape) != tuple(target.shape):
                log.info("generation uses the 4-bit model: %s is %s, expected %s", name, tuple(tensor.shape),
                         tuple(target.shape))
                return None
            target.data = tensor.to(device)  # the source's dtype, exactly (norms may be float32)
    plain.generation_config = copy.deepcopy(base.generation_config)
    return plain.eval()
