"""Compile-time flags shared by ``compile``, ``submit`` and ``argo``: placement (profile, GPU type and count,
node selector, tolerations, images) and cluster options (volume, Secrets, security, retries), generated from
:class:`kubetune.pipelines.PipelineOptions` so a flag's default and help are the option's own."""

from __future__ import annotations

import argparse
import dataclasses

from kubetune.containers.images import resolve_images
from kubetune.errors import KubetuneError
from kubetune.pipelines import PipelineOptions
from kubetune.pipelines.placement import load_profile, override, profile_names

SECRET_OPTIONS = ("hub_secret", "mlflow_secret", "object_store_secret", "gcs_secret")
TRACKING_OPTIONS = ("mlflow_uri",)
VOLUME_OPTIONS = ("cache_volume", "cache_volume_size", "cache_volume_storage_class", "cache_volume_access_mode")


def add_placement_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("placement (GPU steps: train_lora, evaluate_model)")
    group.add_argument("--profile", default="default", choices=profile_names(), help="placement profile")
    group.add_argument("--gpu-type", default="", help="accelerator resource, e.g. nvidia.com/gpu")
    group.add_argument("--gpu-count", type=int, default=0, help="GPUs per GPU step")
    group.add_argument("--gpu-node-selector", action="append", default=[], metavar="KEY=VALUE")
    group.add_argument("--gpu-toleration", action="append", default=[], metavar="KEY[=VALUE]:EFFECT")
    group.add_argument("--cpu-image", default="", help="image for CPU steps (default: KUBETUNE_CPU_IMAGE or built-in)")
    group.add_argument("--gpu-image", default="", help="image for GPU steps (default: KUBETUNE_GPU_IMAGE or built-in)")


def add_option_flags(group, names: tuple[str, ...]) -> None:
    """``--name-with-dashes`` for each named PipelineOptions field, with its default and help."""
    fields = {f.name: f for f in dataclasses.fields(PipelineOptions)}
    for name in names:
        f = fields[name]
        extra = {key: f.metadata[key] for key in ("choices", "metavar") if key in f.metadata}
        if isinstance(f.default, int):
            extra["type"] = int
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=f.default,
                           help=f"{f.metadata['help']} (default: %(default)r)", **extra)


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """Volume, Secrets, security and retries."""
    group = parser.add_argument_group("cluster (volume, secrets, security)")
    add_option_flags(group, VOLUME_OPTIONS + TRACKING_OPTIONS + SECRET_OPTIONS)
    group.add_argument("--static-gpu-node-selector", action="store_true",
                       help="compile the GPU node selector as fixed labels, without the gpu_node_selector parameter "
                       "(for KFP backends without nodeSelectorJson)")
    add_option_flags(group, ("run_as_user",))
    group.add_argument("--no-run-as-user", action="store_true",
                       help="leave the uid to the cluster (e.g. OpenShift's restricted SCC)")
    add_option_flags(group, ("retries",))


def placement_options(args: argparse.Namespace) -> PipelineOptions:
    """PipelineOptions from the placement flags, and from whichever option flags the command has."""
    profile = override(
        load_profile(args.profile),
        gpu_type=args.gpu_type,
        gpu_count=args.gpu_count,
        node_selector=dict(_key_value(item, "--gpu-node-selector") for item in args.gpu_node_selector),
        tolerations=[_toleration(item) for item in args.gpu_toleration],
    )
    images = resolve_images(args.cpu_image or None, args.gpu_image or None)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(PipelineOptions)
             if "help" in f.metadata and hasattr(args, f.name)}
    if "cache_volume" in given:
        given["cache_volume"] = given["cache_volume"].strip()
    if getattr(args, "static_gpu_node_selector", False):
        given["runtime_gpu_node_selector"] = False
    if getattr(args, "no_run_as_user", False):
        given["run_as_user"] = None
    options = PipelineOptions(profile=profile, cpu_image=images.cpu, gpu_image=images.gpu, **given)
    options.validate()
    return options


def _key_value(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise KubetuneError(f"{flag} {item!r} is not KEY=VALUE", f"write e.g. {flag} nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3")
    return key, value


def _toleration(item: str) -> dict[str, str]:
    """``KEY[=VALUE]:EFFECT`` like kubectl taint syntax; no value means operator Exists."""
    spec, _, effect = item.rpartition(":")
    if not spec or effect not in {"NoSchedule", "PreferNoSchedule", "NoExecute"}:
        raise KubetuneError(
            f"--gpu-toleration {item!r} is not KEY[=VALUE]:EFFECT", "write e.g. --gpu-toleration nvidia.com/gpu:NoSchedule"
        )
    key, sep, value = spec.partition("=")
    return {"key": key, "operator": "Equal" if sep else "Exists", "effect": effect, **({"value": value} if sep else {})}
