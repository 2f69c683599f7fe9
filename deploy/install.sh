#!/bin/sh
# Installs seqsentinel from this source tree into a Python environment.
#
# The Dockerfile's only install step, kept in a script so that what an image holds can be built
# and checked without Docker (tests/deploy/test_docker_install.py does). pip reads its usual
# PIP_* variables, e.g. PIP_INDEX_URL for a mirror or PIP_NO_CACHE_DIR=1 in images.
set -eu

usage() {
    cat <<'EOF'
usage: install.sh [--runtime | --trainer] [--variant cpu|gpu] [--venv DIR] [--python PYTHON]

  --runtime         the detector only, with both Kafka clients (kafka-python and
                    confluent-kafka): onnxruntime, never torch (the default)
  --trainer         the detector and the trainer: adds torch and the export tools
  --variant gpu     onnxruntime-gpu in place of onnxruntime (the two share one module and must
                    never be installed together); cpu is the default
  --venv DIR        create a virtual environment in DIR and install into it
  --python PYTHON   the interpreter to install with or to create the environment from
                    (default: python3)
EOF
}

needs_value() {
    if [ $# -lt 2 ]; then
        echo "install.sh: $1 needs a value" >&2
        exit 2
    fi
}

target=""
variant=cpu
venv=""
python=python3
source_dir=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)

while [ $# -gt 0 ]; do
    case $1 in
        --runtime | --trainer)
            if [ -n "$target" ] && [ "$target" != "${1#--}" ]; then
                echo "install.sh: --runtime and --trainer exclude each other" >&2
                exit 2
            fi
            target=${1#--}
            ;;
        --variant) needs_value "$@" && variant=$2 && shift ;;
        --venv) needs_value "$@" && venv=$2 && shift ;;
        --python) needs_value "$@" && python=$2 && shift ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
    shift
done

case $variant in
    cpu | gpu) ;;
    *)
        echo "install.sh: --variant must be cpu or gpu, not '$variant'" >&2
        exit 2
        ;;
esac

if [ -n "$venv" ]; then
    "$python" -m venv "$venv"
    python=$venv/bin/python
fi

if [ "${target:-runtime}" = trainer ]; then
    "$python" -m pip install "${source_dir}[train]"
else
    "$python" -m pip install "${source_dir}[confluent]"
fi

if [ "$variant" = gpu ]; then
    # onnxruntime-gpu is released later than onnxruntime and may lag it: ask for the project's own
    # requirement (e.g. onnxruntime>=1.18) under the GPU name rather than the same release. Its
    # cuda and cudnn extras install the CUDA and cuDNN libraries of the CUDA release it was built
    # for (CUDA 13 for 1.31: a CUDA 12 base image could not run it); the detector loads them.
    requirement=$("$python" -c '
from importlib.metadata import requires
from packaging.requirements import Requirement
(spec,) = [Requirement(r).specifier for r in requires("seqsentinel") if Requirement(r).name == "onnxruntime"]
print(f"onnxruntime-gpu[cuda,cudnn]{spec}")')
    "$python" -m pip uninstall --yes onnxruntime
    "$python" -m pip install "$requirement"
fi

# The runtime's promise, checked where it is made: onnxruntime loads and torch is absent.
"$python" - "${target:-runtime}" <<'EOF'
import importlib.util
import sys

import onnxruntime

if sys.argv[1] == "runtime" and importlib.util.find_spec("torch") is not None:
    sys.exit("install.sh: torch ended up in a runtime environment")
print(f"seqsentinel installed; onnxruntime {onnxruntime.__version__}", onnxruntime.get_available_providers())
EOF
