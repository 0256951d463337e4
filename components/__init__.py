"""KFP components of kubetune, one thin shell per step around the core in ``kubetune.steps``.

Use them in your own pipeline::

    from kubetune.components import prepare_dataset, quantize_model, train_lora, evaluate_model

or load the compiled YAML files shipped in ``kubetune/components/yaml`` with
``kfp.components.load_component_from_file``.
"""

from kubetune.components.evaluate_model import evaluate_model
from kubetune.components.prepare_dataset import prepare_dataset
from kubetune.components.quantize_model import quantize_model
from kubetune.components.train_lora import train_lora

__all__ = ["prepare_dataset", "quantize_model", "train_lora", "evaluate_model"]
