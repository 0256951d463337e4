"""The one place that names kubetune's container images.

Two images: the CPU image (dataset prep, model download and 4-bit quantization, every CPU-only step) and the
GPU image (CUDA: LoRA SFT and evaluation). Both are tagged with the package version, so a pipeline compiled by
kubetune X runs the code of kubetune X. Which reference is used, highest first:

1. an explicit argument to :func:`resolve_images` (the CLI's ``--cpu-image`` / ``--gpu-image``);
2. ``KUBETUNE_CPU_IMAGE`` / ``KUBETUNE_GPU_IMAGE``: a whole reference;
3. the default ``<registry>/kubetune-cpu:<version>``, where ``KUBETUNE_IMAGE_REGISTRY`` replaces the registry
   ``ghcr.io/kubetune`` (for a mirror or a private registry).

Every reference must pin what it runs: a version tag or a digest. Moving tags (``latest``, ``main``, ...) and
references without a tag are rejected, since a step retried tomorrow could run different code.
This module is plain Python: no kfp import.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from kubetune import __version__
from kubetune.errors import collect

DEFAULT_REGISTRY = "ghcr.io/kubetune"
CPU_IMAGE_NAME = "kubetune-cpu"
GPU_IMAGE_NAME = "kubetune-gpu"

CPU_IMAGE_ENV = "KUBETUNE_CPU_IMAGE"
GPU_IMAGE_ENV = "KUBETUNE_GPU_IMAGE"
REGISTRY_ENV = "KUBETUNE_IMAGE_REGISTRY"

# Tags that conventionally move to newer builds; compared case-insensitively.
MOVING_TAGS = frozenset({"latest", "main", "master", "head", "dev", "develop", "nightly", "edge"})

# The grammar of github.com/distribution/reference: [host[:port]/]path[:tag][@digest], lower-case path.
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(
    rf"^(?P<name>(?:{_HOST}(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}))?$"
)
_MAX_NAME = 255


@dataclass(frozen=True)
class Images:
    """Image references for the two kinds of step: ``cpu`` (prep, download, quantize) and ``gpu`` (SFT, eval)."""

    cpu: str
    gpu: str

    def __post_init__(self) -> None:
        collect(image_problems(self.cpu, "Images.cpu") + image_problems(self.gpu, "Images.gpu"))


def version_tag(version: str = __version__) -> str:
    """The image tag for a package version; a local version's ``+`` (not allowed in tags) becomes ``-``."""
    return version.replace("+", "-")


def default_image(name: str, registry: str | None = None, version: str = __version__) -> str:
    """``<registry>/<name>:<version>``, the registry defaulting to ``ghcr.io/kubetune``."""
    registry = (registry or DEFAULT_REGISTRY).strip().rstrip("/")
    return f"{registry}/{name}:{version_tag(version)}"


def image_problems(reference: str, source: str) -> list[tuple[str, str]]:
    """The (problem, fix) pairs that make ``reference`` unusable, empty when it is a pinned image reference.

    ``source`` names where the value came from (an argument or an environment variable) for the message.
    """
    example = default_image(CPU_IMAGE_NAME)
    match = _REFERENCE.match(reference)
    if not match or len(match["name"]) > _MAX_NAME:
        return [
            (
                f"{source} is not a container image reference: {reference!r}",
                f"give a reference like {example!r} or 'registry/name@sha256:<64 hex digits>' (lower-case path).",
            )
        ]
    tag, digest = match["tag"], match["digest"]
    if digest:  # a digest names exact bytes, whatever tag stands beside it
        return []
    if tag is None:
        return [
            (
                f"{source} has no tag or digest: {reference!r} (the registry would serve ':latest')",
                f"pin it with a version tag or a digest, e.g. {match['name']}:{version_tag()}.",
            )
        ]
    if tag.lower() in MOVING_TAGS:
        return [
            (
                f"{source} uses the moving tag {tag!r}: {reference!r}",
                f"use a version tag (e.g. {match['name']}:{version_tag()}) or a digest (@sha256:...), so a "
                "retried step runs the same code.",
            )
        ]
    return []


def check_image(reference: str, source: str = "image reference") -> str:
    """Return ``reference`` unchanged when it is a pinned image reference; raise :class:`KubetuneError` if not."""
    collect(image_problems(reference, source))
    return reference


def _from_env(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None  # an empty variable counts as unset, as in `KUBETUNE_GPU_IMAGE= kubetune ...`


def resolve_images(
    cpu: str | None = None, gpu: str | None = None, *, env: Mapping[str, str] | None = None
) -> Images:
    """The images to run: explicit arguments, else ``KUBETUNE_CPU_IMAGE``/``KUBETUNE_GPU_IMAGE``, else defaults.

    Defaults live under ``KUBETUNE_IMAGE_REGISTRY`` when set. Every problem (both images) is reported in one
    :class:`KubetuneError`. ``env`` defaults to ``os.environ``.
    """
    env = os.environ if env is None else env
    registry = _from_env(env, REGISTRY_ENV)
    problems: list[tuple[str, str]] = []
    chosen: dict[str, str] = {}
    for kind, explicit, env_name, image_name in (
        ("cpu", cpu, CPU_IMAGE_ENV, CPU_IMAGE_NAME),
        ("gpu", gpu, GPU_IMAGE_ENV, GPU_IMAGE_NAME),
    ):
        if explicit is not None:
            value, source = explicit.strip(), f"the {kind} image argument (--{kind}-image)"
        elif (from_env := _from_env(env, env_name)) is not None:
            value, source = from_env, env_name
        else:
            value = default_image(image_name, registry)
            source = (
                f"the default {kind} image under {REGISTRY_ENV}" if registry else f"the default {kind} image"
            )
        problems += image_problems(value, source)
        chosen[kind] = value
    collect(problems)
    return Images(cpu=chosen["cpu"], gpu=chosen["gpu"])


_IMAGES = resolve_images()
CPU_IMAGE: str = _IMAGES.cpu
"""The CPU image at import time: ``KUBETUNE_CPU_IMAGE``, else the default (under ``KUBETUNE_IMAGE_REGISTRY``)."""
GPU_IMAGE: str = _IMAGES.gpu
"""The GPU image at import time: ``KUBETUNE_GPU_IMAGE``, else the default (under ``KUBETUNE_IMAGE_REGISTRY``)."""

__all__ = [
    "CPU_IMAGE",
    "GPU_IMAGE",
    "Images",
    "check_image",
    "default_image",
    "resolve_images",
]
