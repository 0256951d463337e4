"""A plain (unquantized) copy of a 4-bit model for generation: the nf4 weights dequantized once, the LoRA adapter
attached unmerged as it is.

Why: decoding is a long chain of small steps, and a 4-bit base pays a dequantisation kernel per linear layer per
step (plus the adapter's own matmuls); with the weights dequantized once, a step is a plain matmul per layer.
The copy computes what the 4-bit model computes: for a whole prompt exactly (bitsandbytes then dequantizes to the
compute dtype and runs the same matmul), for a decode step within bf16 rounding (bitsandbytes then multiplies in
its own fused kernel, summing in another order). The adapter is not merged into the weights: a merged bf16 weight
rounds the adapter's small update away in part (on the 7B shape, 7.5% relative error in the logits).
"""

from __future__ import annotations

import logging

from kubetune.decoding import register_decode_attention

log = logging.getLogger(__name__)

HEADROOM = 1.25  # the copy may take this share of free memory at most: the KV cache and activations need the rest


def _base_of(model):
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def copy_bytes(model) -> int:
    """Bytes the plain copy of ``model`` needs: every weight at its compute dtype (2 bytes for a 4-bit weight)."""
    total = 0
    for module in _base_of(model).modules():
        if hasattr(module, "lora_A"):  # the adapter is attached, not copied into the weights
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


def _source_tensor(base, name: str):
    """The weight or buffer ``name`` of the plain model, read from ``base`` (a model with LoRA layers inside, or
    none): the base layer's, dequantized when 4-bit. None for a layout this copy does not handle (8-bit)."""
    import torch

    path, _, attribute = name.rpartition(".")
    module = base.get_submodule(path) if path else base
    if hasattr(module, "lora_A"):
        module = module.get_base_layer()
    if hasattr(module, "original_module"):  # peft's modules_to_save wrapper: the base model's own layer
        module = module.original_module
    tensor = getattr(module, attribute)
    if hasattr(tensor, "SCB"):  # bitsandbytes 8-bit: not handled
        return None
    # a 4-bit layer's weight and bias at the activations' dtype, which bitsandbytes casts its output back to
    activations = base.get_input_embeddings().weight.dtype
    if hasattr(tensor, "quant_state"):
        tensor = _dequantized(module).to(activations)
    elif attribute == "bias" and hasattr(getattr(module, "weight", None), "quant_state"):
        tensor = tensor.to(activations)
    return tensor.detach() if isinstance(tensor, torch.Tensor) else tensor


def _with_adapter(plain, model):
    """``plain`` with ``model``'s active LoRA adapter attached as it is (unmerged, its own weights and dtype): the
    tuned model computes exactly as on the 4-bit base, only the base matmuls differ."""
    import copy

    from peft import get_peft_model

    name = model.active_adapter
    config = copy.deepcopy(model.peft_config[name])
    config.inference_mode = True
    tuned = get_peft_model(plain, config, adapter_name=name)
    adapter_state = {k: v for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    result = tuned.load_state_dict(adapter_state, strict=False)
    if result.unexpected_keys or any("lora_" in k or "modules_to_save" in k for k in result.missing_keys):
        log.info("generation uses the 4-bit model: the adapter did not fit the plain copy (%s)",
                 (result.unexpected_keys or result.missing_keys)[:3])
        return None
    return tuned.eval()


def plain_copy(model, *, adapter: bool):
    """A plain model with ``model``'s weights (see the module doc), on ``model``'s device, in eval mode: with
    ``model``'s LoRA adapter attached when ``adapter`` (a PeftModel), else the base model alone. None, with the
    reason logged, when the layout is not one it handles; the caller then generates with ``model`` itself."""
    import copy

    import torch

    base = _base_of(model)
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    device = base.get_input_embeddings().weight.device
    with torch.device("meta"):  # attention that reads a grouped-query KV cache once per decode step
        plain = type(base)._from_config(config, attn_implementation=register_decode_attention())
    plain = plain.to_empty(device=device)
    sources = dict(plain.named_parameters(remove_duplicate=False)) | dict(plain.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, target in sources.items():
            tensor = _source_tensor(base, name)
            if tensor is None:
                log.info("generation uses the 4-bit model: %s has a layout a plain copy does not handle", name)
                return None
            if tuple(tensor.shape) != tuple(target.shape):
                log.info("generation uses the 4-bit model: %s is %s, expected %s", name, tuple(tensor.shape),
                         tuple(target.shape))
                return None
            target.data = tensor.to(device)  # the source's dtype, exactly (norms may be float32)
    plain.generation_config = copy.deepcopy(base.generation_config)
    if adapter and hasattr(model, "peft_config"):
        return _with_adapter(plain, model)
    return plain.eval()
