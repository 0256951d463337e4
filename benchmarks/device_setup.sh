# Offline install of the GPU dependencies that the base image lacks, from wheels in .whl/
# (trl, datasets, bitsandbytes, liger-kernel, kfp, mlflow-skinny + sqlite store, and their missing deps).
# Usage, on the GPU machine, from the repo root (call `run` with carry: [".whl"]):
#   source benchmarks/device_setup.sh || exit 1
_kt_setup() {
    local py=python3
    [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null || { echo "device_setup: no wheels in $PWD/.whl (carry .whl)" >&2; return 1; }
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "device_setup: installing .whl/*.whl into /tmp/site failed" >&2; return 1; }
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
mods = ["torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "liger_kernel", "kfp", "mlflow", "kubetune"]
vers = []
for m in mods:
    mod = importlib.import_module(m)
    v = getattr(mod, "__version__", None)
    if v is None:
        from importlib.metadata import version
        v = version(m.replace("_", "-"))
    vers.append(f"{m}={v}")
print(" ".join(vers))
EOF
}
_kt_setup || { unset -f _kt_setup; return 1 2>/dev/null || exit 1; }
unset -f _kt_setup
