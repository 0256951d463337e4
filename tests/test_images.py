"""The image map (kubetune.containers.images), the Dockerfiles and the hashed lock files behind them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from kubetune.containers import images
from kubetune.containers.images import Images, check_image, default_image, resolve_images
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import kubetune
from kubetune.errors import KubetuneError

VERSION = kubetune.__version__
CONTAINERS = Path(str(resources.files("kubetune.containers")))
DIGEST = "sha256:" + "0123456789abcdef" * 4
IMAGE_ENV = ("KUBETUNE_CPU_IMAGE", "KUBETUNE_GPU_IMAGE", "KUBETUNE_IMAGE_REGISTRY")


@pytest.fixture(autouse=True)
def _no_image_env(monkeypatch):
    for name in IMAGE_ENV:
        monkeypatch.delenv(name, raising=False)


# -- image references ------------------------------------------------------------------------------------------
def test_defaults_carry_the_package_version():
    resolved = resolve_images()
    assert resolved == Images(
        cpu=f"ghcr.io/kubetune/kubetune-cpu:{VERSION}", gpu=f"ghcr.io/kubetune/kubetune-gpu:{VERSION}"
    )
    assert resolve_images(env={}) == resolved
    assert not resolved.cpu.endswith(":latest")


def test_module_constants_follow_env_at_import():
    code = "from kubetune.containers.images import CPU_IMAGE, GPU_IMAGE; print(CPU_IMAGE); print(GPU_IMAGE)"
    base = {k: v for k, v in os.environ.items() if k not in IMAGE_ENV}

    def constants(**env: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True
        )
        return out.stdout.split()

    assert constants() == [
        f"ghcr.io/kubetune/kubetune-cpu:{VERSION}",
        f"ghcr.io/kubetune/kubetune-gpu:{VERSION}",
    ]
    assert constants(KUBETUNE_IMAGE_REGISTRY="registry.local:5000/ml", KUBETUNE_GPU_IMAGE="my/gpu:1.0") == [
        f"registry.local:5000/ml/kubetune-cpu:{VERSION}",
        "my/gpu:1.0",
    ]


def test_module_constants_match_resolve_images():
    assert (resolve_images().cpu, resolve_images().gpu) == (images.CPU_IMAGE, images.GPU_IMAGE)


def test_env_overrides_each_image(monkeypatch):
    monkeypatch.setenv("KUBETUNE_CPU_IMAGE", "registry.example.com/team/cpu:2.0")
    assert resolve_images() == Images(
        cpu="registry.example.com/team/cpu:2.0", gpu=f"ghcr.io/kubetune/kubetune-gpu:{VERSION}"
    )
    monkeypatch.setenv("KUBETUNE_GPU_IMAGE", f"registry.example.com/team/gpu@{DIGEST}")
    assert resolve_images().gpu == f"registry.example.com/team/gpu@{DIGEST}"


def test_empty_env_counts_as_unset():
    assert resolve_images(env={"KUBETUNE_CPU_IMAGE": "", "KUBETUNE_IMAGE_REGISTRY": " "}) == resolve_images(
        env={}
    )


def test_registry_prefix_replaces_default_registry():
    resolved = resolve_images(env={"KUBETUNE_IMAGE_REGISTRY": "registry.example.com:443/ml/"})
    assert resolved.cpu == f"registry.example.com:443/ml/kubetune-cpu:{VERSION}"
    assert resolved.gpu == f"registry.example.com:443/ml/kubetune-gpu:{VERSION}"


def test_whole_reference_beats_registry_prefix_and_argument_beats_env():
    env = {"KUBETUNE_IMAGE_REGISTRY": "mirror.local/ml", "KUBETUNE_GPU_IMAGE": "other/gpu:3"}
    assert resolve_images(env=env).gpu == "other/gpu:3"
    assert resolve_images(gpu="cli/gpu:4", env=env) == Images(
        cpu=f"mirror.local/ml/kubetune-cpu:{VERSION}", gpu="cli/gpu:4"
    )
    assert resolve_images(cpu="cli/cpu:5", env={"KUBETUNE_CPU_IMAGE": "bad:latest"}).cpu == "cli/cpu:5"


@pytest.mark.parametrize(
    "reference",
    [
        f"ghcr.io/kubetune/kubetune-cpu:{VERSION}",
        "localhost:5000/kubetune-gpu:0.1.0-cu128",
        "registry.example.com:443/team/ml/kubetune:1.2.3",
        "python:3.11.14-slim-bookworm",
        f"ghcr.io/kubetune/kubetune-gpu@{DIGEST}",
        f"ghcr.io/kubetune/kubetune-gpu:latest@{DIGEST}",  # the digest pins it, whatever the tag says
    ],
)
def test_pinned_references_are_accepted(reference):
    assert check_image(reference) == reference
    assert resolve_images(cpu=reference, gpu=reference) == Images(reference, reference)


@pytest.mark.parametrize(
    "reference",
    [
        "ghcr.io/kubetune/kubetune-cpu:latest",
        "ghcr.io/kubetune/kubetune-cpu:main",
        "ghcr.io/kubetune/kubetune-cpu:master",
        "ghcr.io/kubetune/kubetune-cpu:Latest",
        "ghcr.io/kubetune/kubetune-cpu",
        "localhost:5000/kubetune-cpu",
        "ubuntu",
    ],
)
def test_moving_tags_are_rejected(reference):
    with pytest.raises(KubetuneError) as raised:
        check_image(reference, "KUBETUNE_CPU_IMAGE")
    assert "KUBETUNE_CPU_IMAGE" in raised.value.problem
    assert "tag" in raised.value.problem
    assert "digest" in raised.value.fix


@pytest.mark.parametrize(
    "reference",
    [
        "",
        " ",
        "ghcr.io/Kubetune/Kubetune-cpu:1.0",
        "ghcr.io/kubetune/kubetune cpu:1.0",
        "ghcr.io/kubetune/kubetune-cpu:",
        "https://ghcr.io/kubetune/kubetune-cpu:1.0",
        "ghcr.io//kubetune-cpu:1.0",
        "ghcr.io/kubetune/-cpu:1.0",
        "ghcr.io/kubetune/kubetune-cpu:1.0/x",
        "ghcr.io/kubetune/kubetune-cpu:" + "x" * 129,
        "ghcr.io/kubetune/kubetune-cpu@sha256:abc",
        "ghcr.io/kubetune/kubetune-cpu@md5:" + "0" * 32,
    ],
)
def test_malformed_references_are_rejected(reference):
    with pytest.raises(KubetuneError) as raised:
        resolve_images(cpu=reference)
    assert "--cpu-image" in raised.value.problem
    assert "not a container image reference" in raised.value.problem or "no tag" in raised.value.problem


def test_bad_env_is_named_and_every_problem_is_reported_at_once():
    with pytest.raises(KubetuneError) as raised:
        resolve_images(env={"KUBETUNE_CPU_IMAGE": "ghcr.io/x/cpu:latest", "KUBETUNE_GPU_IMAGE": "Not A Ref"})
    message = str(raised.value)
    assert "2 problems" in message
    assert "KUBETUNE_CPU_IMAGE" in message and "KUBETUNE_GPU_IMAGE" in message


def test_bad_registry_prefix_is_rejected():
    with pytest.raises(KubetuneError, match="KUBETUNE_IMAGE_REGISTRY"):
        resolve_images(env={"KUBETUNE_IMAGE_REGISTRY": "https://registry.example.com"})


def test_images_dataclass_is_frozen_and_validates():
    pinned = Images(cpu="a/cpu:1", gpu="a/gpu:1")
    with pytest.raises(AttributeError):
        pinned.cpu = "a/cpu:2"  # type: ignore[misc]
    with pytest.raises(KubetuneError):
        Images(cpu="a/cpu:latest", gpu="a/gpu:1")


def test_local_versions_become_valid_tags():
    reference = default_image("kubetune-gpu", version="0.2.0.dev3+g1a2b3c")
    assert reference == "ghcr.io/kubetune/kubetune-gpu:0.2.0.dev3-g1a2b3c"
    assert check_image(reference) == reference


def test_images_module_does_not_import_kfp():
    code = "import sys, kubetune.containers.images; sys.exit('kfp' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- Dockerfiles -----------------------------------------------------------------------------------------------
def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with backslash continuations joined and comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (s.split(None, 1) for s in logical)
    ]


@pytest.fixture(params=["cpu", "gpu"])
def dockerfile(request) -> tuple[str, list[tuple[str, str]]]:
    path = CONTAINERS / f"Dockerfile.{request.param}"
    assert path.is_file(), f"{path} is missing"
    return request.param, _instructions(path.read_text())


def test_dockerfile_installs_the_hashed_lock(dockerfile):
    kind, instructions = dockerfile
    copies = " ".join(args for op, args in instructions if op == "COPY")
    runs = [args for op, args in instructions if op == "RUN"]
    assert f"containers/requirements-{kind}.txt" in copies
    assert any(
        "--require-hashes" in run and "--no-deps" in run and "-r /tmp/requirements.txt" in run for run in runs
    )
    assert any("pip install --no-deps" in run and "/src" in run for run in runs), (
        "kubetune itself is installed"
    )


def test_dockerfile_runs_as_non_root(dockerfile):
    _, instructions = dockerfile
    users = [args.strip() for op, args in instructions if op == "USER"]
    assert users, "no USER instruction"
    uid = users[-1].split(":")[0]
    assert uid == "1000", f"last USER is {users[-1]!r}: use the numeric non-root uid 1000"


def test_dockerfile_base_images_are_pinned(dockerfile):
    _, instructions = dockerfile
    bases = [args.split()[0] for op, args in instructions if op == "FROM"]
    assert bases
    for base in bases:
        check_image(base, "FROM")  # raises on :latest, a missing tag or a malformed reference
        tag = base.split("@")[0].rsplit(":", 1)[-1]
        assert re.search(r"\d+\.\d+", tag), f"{base}: pin a version tag, not a moving alias"


def test_dockerfile_environment_and_metadata(dockerfile):
    kind, instructions = dockerfile
    env = " ".join(args for op, args in instructions if op == "ENV")
    labels = " ".join(args for op, args in instructions if op == "LABEL")
    assert "PYTHONUNBUFFERED=1" in env
    assert "HF_HOME=/cache/huggingface" in env
    assert "org.opencontainers.image.version" in labels and "KUBETUNE_VERSION" in labels
    assert f"kubetune-{kind}" in labels
    assert any(op == "WORKDIR" for op, _ in instructions)


def test_dockerfile_bakes_in_no_secrets(dockerfile):
    _, instructions = dockerfile
    for op, args in instructions:
        if op in {"ENV", "ARG"}:
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY)", args, re.IGNORECASE), args


def test_dockerfiles_document_the_build_command():
    for kind in ("cpu", "gpu"):
        head = (CONTAINERS / f"Dockerfile.{kind}").read_text()[:1500]
        assert f"docker build -f containers/Dockerfile.{kind}" in head
        assert "digest" in head


# -- lock files ------------------------------------------------------------------------------------------------
def _lock_entries(path: Path) -> list[str]:
    """Each requirement of a pip lock file as one logical line (continuations joined, comments dropped)."""
    entries, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line and not current:
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip() and not current.lstrip().startswith("-"):  # options such as --find-links
            entries.append(" ".join(current.split()))
        current = ""
    assert not current, f"{path} ends inside a continued line"
    return entries


def _pins(path: Path) -> dict[str, Version]:
    return {
        canonicalize_name(entry.split("==")[0]): Version(entry.split("==")[1].split()[0])
        for entry in _lock_entries(path)
    }


@pytest.fixture(params=["cpu", "gpu"])
def lock(request) -> tuple[str, Path]:
    path = CONTAINERS / f"requirements-{request.param}.txt"
    assert path.is_file(), f"{path} is missing"
    return request.param, path


def test_every_locked_package_is_pinned_and_hashed(lock):
    _, path = lock
    entries = _lock_entries(path)
    assert len(entries) > 50
    for entry in entries:
        requirement = entry.split(" --hash=")[0]
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==\S+", requirement), f"not an exact pin: {entry}"
        hashes = re.findall(r"--hash=(\S+)", entry)
        assert hashes, f"no --hash for {requirement}"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), f"bad hash for {requirement}"


def test_lock_entry_parser_sees_continuation_lines(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text(
        "--find-links https://x\nfoo==1.0 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via bar\nbaz==2.0\n"
    )
    assert _lock_entries(path) == ["foo==1.0 --hash=sha256:" + "a" * 64, "baz==2.0"]


def test_lock_pins_the_supported_stack(lock):
    kind, path = lock
    pins = _pins(path)
    assert pins["kfp"].release[:2] == (2, 17)
    assert pins["kfp-kubernetes"].release[:2] == (2, 17)
    assert pins["trl"].major == 1
    for name in (
        "peft",
        "transformers",
        "datasets",
        "accelerate",
        "bitsandbytes",
        "mlflow",
        "torch",
        "sacrebleu",
    ):
        assert name in pins, f"{name} missing from {path.name}"
    if kind == "cpu":
        assert pins["torch"].local == "cpu", "the CPU image takes the CPU build of torch"
        assert "--find-links https://download.pytorch.org/whl/cpu/torch/" in path.read_text()
    else:
        assert pins["torch"].local is None, "the GPU image takes PyPI's CUDA build of torch"
        assert "liger-kernel" in pins
        assert pins["torch"] == Version(_pins(CONTAINERS / "requirements-cpu.txt")["torch"].public)


def test_gpu_lock_cuda_matches_the_base_image():
    runtime = {
        name: v
        for name, v in _pins(CONTAINERS / "requirements-gpu.txt").items()
        if name.startswith("nvidia-cuda-runtime")
    }
    assert len(runtime) == 1, f"expected one CUDA runtime wheel in the GPU lock, found {runtime}"
    (cuda,) = runtime.values()
    bases = [args for op, args in _instructions((CONTAINERS / "Dockerfile.gpu").read_text()) if op == "FROM"]
    base = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.", bases[-1])
    assert base, f"the GPU image's base is not an nvidia/cuda image: {bases[-1]}"
    assert (int(base[1]), int(base[2])) == cuda.release[:2], (
        f"base CUDA {base[1]}.{base[2]} vs runtime wheel {cuda}"
    )


def test_lock_satisfies_the_package_requirements(lock):
    tomllib = pytest.importorskip("tomllib")
    kind, path = lock
    pyproject = Path(kubetune.__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["cloud"]
    if kind == "gpu":
        wanted += project["optional-dependencies"]["fast"]
    pins = _pins(path)
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} (a kubetune dependency) is not in {path.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {text}"
