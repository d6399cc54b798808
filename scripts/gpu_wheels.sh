#!/usr/bin/env bash
# The Python packages a GPU run of scripts/gpu_report.py needs that the device machine's image lacks, as
# wheels in wheels/gpu/ (ignored by git; name it in the device tool's `carry`). The image has jax, flax,
# optax, torch, scikit-learn, matplotlib, scipy, absl-py, attrs and mpmath, and no network.
#
# Only dp-accounting is missing: DP-SGD's epsilon (jaxbatch/privacy.py). Without it the report's dp-mnist
# DP epoch runs clipping only. It is pure Python; of its requirements only dm-tree is absent there, and
# only dp-accounting's own tests import it, so it is not fetched. tensorflow-datasets and array_record,
# also absent there, are imported only to read TFDS-prepared datasets, which the report does not.
#
#     scripts/gpu_wheels.sh            # then: gpu_report.py installs them offline into a temporary folder
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p wheels/gpu
# The version tested here (pyproject asks for dp-accounting >= 0.4).
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d wheels/gpu "dp-accounting==0.6.0"
du -ch wheels/gpu/*.whl | tail -n 1
