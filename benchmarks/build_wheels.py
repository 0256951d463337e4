"""Build the wheel folders that a GPU call carries: .whl/ (what the project needs beyond the GPU image) and
.whl-unsloth/ (Unsloth and its own pins, the speed peer of the SFT benchmark).

The GPU image (Python 3.12, torch 2.11 cu130, transformers 5.17, peft 0.21, accelerate 1.15, protobuf 7, ...) has
no network, so every missing package travels as a wheel for CPython 3.12 on x86-64 Linux. Versions follow the
project's development environment; protobuf 6 because kfp 2.17 needs < 7. One version of each package per folder
(pip refuses two); .whl-unsloth/ overrides trl and datasets with Unsloth's pins and is put in front of .whl/ on
PYTHONPATH only in the Unsloth process.

Two wheels are slimmed to keep what travels under the 64 MiB limit: bitsandbytes keeps only the CUDA 13.0 library
(torch cu130 loads exactly that one) and the CPU library (a process that sees no GPU), dropping the other CUDA,
ROCm and XPU builds; unsloth drops ``studio/`` (its web UI, read only by Studio and the Decision models). diffusers
and hf_transfer are left out of the Unsloth set: Unsloth never imports diffusers, and only probes hf_transfer with
``find_spec`` (downloads, which an offline run does not make).

    python3 benchmarks/build_wheels.py [--only project|unsloth]

Needs pip and PyPI on this machine; run from the repository root. Prints each folder's size and what it holds.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PROJECT = [
    # training
    "trl==1.16.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "bitsandbytes==0.50.2",
    "liger-kernel==0.8.5",
    # Kubeflow Pipelines (kfp-server-api is published as an sdist only: built here into a wheel)
    "kfp==2.17.3", "kfp-kubernetes==2.17.3", "kfp-pipeline-spec==2.17.3", "kfp-server-api==2.17.3",
    "protobuf==6.33.6", "docstring-parser==0.18.0", "click-option-group==0.5.7", "requests-toolbelt==1.0.0",
    "kubernetes==30.1.0", "websocket-client==1.9.2", "oauthlib==4.0.1", "requests-oauthlib==2.0.0",
    "google-api-core==2.44.0", "google-auth==2.63.0", "google-cloud-storage==3.17.1", "google-cloud-core==2.8.0",
    "google-crc32c==1.9.0", "google-resumable-media==2.11.0", "googleapis-common-protos==1.76.0",
    "proto-plus==1.29.0", "pyasn1==0.6.5", "pyasn1-modules==0.4.2", "cryptography==50.0.2", "cffi==2.1.1",
    "pycparser==3.12",
    # MLflow: the client, the transformers flavor and the sqlite tracking store (SQLAlchemy + alembic migrations)
    "mlflow-skinny==3.17.2", "sqlalchemy==2.1.9", "alembic==1.20.1", "mako==1.4.3", "sqlparse==0.6.1",
    "cachetools==7.3.3", "databricks-sdk==0.162.0", "fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.54.0",
    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "gitpython==3.2.1", "gitdb==4.0.12", "smmap==5.0.3", "importlib-metadata==9.1.0", "python-dotenv==1.2.4",
    "opentelemetry-api==1.45.2", "opentelemetry-sdk==1.45.2", "opentelemetry-proto==1.45.2",
    "opentelemetry-semantic-conventions==0.66b2",
]
SDIST_ONLY = {"kfp-server-api"}

UNSLOTH = [
    "unsloth==2026.10.9", "unsloth-zoo==2026.10.9", "trl==1.15.0", "datasets==4.8.5", "torchao==0.18.0",
    "cut-cross-entropy==25.1.1", "msgspec==0.23.0", "tyro==1.0.17", "typeguard==4.6.1", "structlog==26.1.0",
    "json5==0.17.3", "nest-asyncio==1.6.0",
]

# wheel name prefix -> archive members to drop
SLIM = {
    "bitsandbytes-": re.compile(r"bitsandbytes/libbitsandbytes_(?!cuda130\.so$|cpu\.so$)[^/]+\.so$"),
    "unsloth-20": re.compile(r"studio/"),
}

PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--platform",
            "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_24_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--platform",
            "manylinux1_x86_64"]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q"], check=True)


def download(pins: list[str], folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    binary = [p for p in pins if p.split("==")[0] not in SDIST_ONLY]
    pip("download", "--no-deps", *PLATFORM, "-d", str(folder), *binary)
    for pin in pins:
        if pin.split("==")[0] in SDIST_ONLY:  # pure Python: a wheel built here installs there
            pip("wheel", "--no-deps", "--no-binary", ":all:", "-w", str(folder), pin)


def slim(wheel: Path, drop: re.Pattern) -> None:
    """Rewrite ``wheel`` in place without the members that ``drop`` matches (RECORD rewritten to match)."""
    with zipfile.ZipFile(wheel) as src:
        names = [n for n in src.namelist() if not drop.match(n)]
        if len(names) == len(src.namelist()):
            return
        with tempfile.NamedTemporaryFile(dir=wheel.parent, suffix=".tmp", delete=False) as tmp, \
                zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
            for name in names:
                data = src.read(name)
                if name.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if not drop.match(line.split(",", 1)[0])).encode()
                dst.writestr(src.getinfo(name), data)
    Path(tmp.name).replace(wheel)
    wheel.chmod(0o644)


def project_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def check(folder: Path, pins: list[str]) -> None:
    """One wheel per package, and exactly the pinned ones (leftovers of older builds are removed)."""
    wanted = {re.sub(r"[-_.]+", "-", p.split("==")[0]).lower(): p.split("==")[1] for p in pins}
    seen: dict[str, Path] = {}
    for wheel in sorted(folder.glob("*.whl")):
        name, version = project_name(wheel), wheel.name.split("-")[1]
        if wanted.get(name) != version:
            print(f"removing {wheel.name} (not pinned)")
            wheel.unlink()
            continue
        if name in seen:
            raise SystemExit(f"two wheels of {name}: {seen[name].name}, {wheel.name}")
        seen[name] = wheel
    missing = sorted(set(wanted) - set(seen))
    if missing:
        raise SystemExit(f"{folder}: no wheel for {missing}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["project", "unsloth"])
    args = parser.parse_args()
    sets = {"project": (Path(".whl"), PROJECT), "unsloth": (Path(".whl-unsloth"), UNSLOTH)}
    for key, (folder, pins) in sets.items():
        if args.only not in (None, key):
            continue
        download(pins, folder)
        for wheel in folder.glob("*.whl"):
            for prefix, drop in SLIM.items():
                if wheel.name.startswith(prefix):
                    slim(wheel, drop)
        check(folder, pins)
        size = sum(w.stat().st_size for w in folder.glob("*.whl"))
        print(f"{folder}: {len(pins)} wheels, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
