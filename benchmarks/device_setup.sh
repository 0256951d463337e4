# Offline install of the GPU dependencies that the base image lacks, from wheels in .whl/
# (trl, datasets, bitsandbytes, liger-kernel, kfp, mlflow-skinny + its transformers flavor and sqlite store, and their
# missing deps; built by benchmarks/build_wheels.py), and, when .whl-unsloth/ travels too, the Unsloth set into its
# own folder ($KT_UNSLOTH_SITE, /tmp/site-unsloth), which only the benchmark's Unsloth process puts on PYTHONPATH.
# Usage, on the GPU machine, from the repo root (call `run` with carry: [".whl"] or [".whl", ".whl-unsloth"]):
#   source benchmarks/device_setup.sh || exit 1
_kt_setup() {
    local py=python3 unsloth_pid=""
    [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null || { echo "device_setup: no wheels in $PWD/.whl (carry .whl)" >&2; return 1; }
    export KT_UNSLOTH_SITE=${KT_UNSLOTH_SITE:-/tmp/site-unsloth}
    if compgen -G ".whl-unsloth/*.whl" >/dev/null; then  # in parallel with the project's set
        $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$KT_UNSLOTH_SITE" \
            .whl-unsloth/*.whl & unsloth_pid=$!
    fi
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "device_setup: installing .whl/*.whl into /tmp/site failed" >&2; return 1; }
    if [ -n "$unsloth_pid" ]; then
        wait "$unsloth_pid" || { echo "device_setup: installing .whl-unsloth/*.whl into $KT_UNSLOTH_SITE failed" >&2; return 1; }
        echo "device_setup: Unsloth set in $KT_UNSLOTH_SITE:" $(cd "$KT_UNSLOTH_SITE" && ls -d unsloth-*.dist-info trl-*.dist-info datasets-*.dist-info)
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    # kubetune maps kubetune.components -> components/ etc., so a plain PYTHONPATH entry is not enough: install it
    # editable into the image's own venv (its setuptools builds it offline; its .pth is read at every start,
    # also by the kfp.local step subprocesses).
    $py -m pip install -q --no-index --no-deps --no-build-isolation --no-compile -e . \
        || { echo "device_setup: editable install of kubetune failed" >&2; return 1; }
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    $py - <<'EOF' || { echo "device_setup: import check failed" >&2; return 1; }
import importlib
mods = ["torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "liger_kernel", "kfp", "mlflow",
        "google.protobuf", "kubetune"]
vers = []
for m in mods:
    mod = importlib.import_module(m)
    v = getattr(mod, "__version__", None)
    if v is None:
        from importlib.metadata import version
        v = version(m.replace("_", "-"))
    vers.append(f"{m}={v}")
# what the evaluation step's MLflow logging and the local sqlite store import
for m in ["mlflow.transformers", "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
          "kfp.local", "kfp.kubernetes", "sacrebleu"]:
    importlib.import_module(m)
print(" ".join(vers))
EOF
}
_kt_setup || { unset -f _kt_setup; return 1 2>/dev/null || exit 1; }
unset -f _kt_setup
