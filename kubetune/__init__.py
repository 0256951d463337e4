"""kubetune: QLoRA fine-tuning of LLMs as reusable Kubeflow Pipelines components.

The core (this package, minus the ``components`` and ``pipelines`` subpackages and the CLI) is plain Python
with no kfp import: every step is a function that can be called and tested on a CPU.
"""

__version__ = "0.1.0"
