"""The kubetune pipeline and its placement helper."""

from kubetune.pipelines.finetune import PipelineOptions, compile_pipeline, finetune_pipeline, make_pipeline

__all__ = ["PipelineOptions", "compile_pipeline", "finetune_pipeline", "make_pipeline"]
