"""KFP components of kubetune, one thin shell per step around the core in ``kubetune.steps``.

Use them in your own pipeline::

    from kubetune.components import prepare_dataset, quantize_model, train_lora, evaluate_model

``resolve_sources`` finds the versions that key the cache of the first two; ``finish_run`` is the exit handler
that closes the MLflow run with the pipeline's final state.

or load the compiled YAML files shipped in ``kubetune/components/yaml`` with
``kfp.components.load_component_from_file``.
"""

from kubetune.components.evaluate_model import evaluate_model
from kubetune.components.finish_run import finish_run
from kubetune.components.prepare_dataset import prepare_dataset
from kubetune.components.quantize_model import quantize_model
from kubetune.components.resolve_sources import resolve_sources
from kubetune.components.train_lora import train_lora

__all__ = ["resolve_sources", "prepare_dataset", "quantize_model", "train_lora", "evaluate_model", "finish_run"]
