#!/usr/bin/env bash
# Wheels for the Ray step of benchmarks/run_gpu.sh, for a GPU machine with no network and no Ray
# (Python 3.12 on x86-64, with torch, pyarrow, pandas, fsspec, aiohttp, grpcio, protobuf, click,
# requests... already there). Fills .whl/ (git-ignored) from PyPI at constraints.txt's versions:
#
#   bash benchmarks/gpu_wheels.sh
#
# Ray's wheel is 76 MiB, 31 of them Java jars (ray/jars/) that only Java workers load; the copy made
# here leaves them out (and their RECORD lines), so Ray and what it needs fit one 64 MiB transfer:
# about 50 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
# Ray, and what Ray Core, Data and Train import that the GPU image lacks.
NAMES=(ray jsonschema jsonschema-specifications referencing rpds-py pydantic pydantic_core annotated-types
    typing-inspection typing_extensions tensorboardX)
mkdir -p .whl
for name in "${NAMES[@]}"; do
    pin=$(grep -i -m1 "^${name}==" constraints.txt) || { echo "gpu_wheels: $name is not in constraints.txt" >&2; exit 1; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$pin"
done
python3 - <<'EOF'
import glob
import os
import zipfile

(source,) = [p for p in glob.glob(".whl/ray-*.whl")]
slim = source + ".slim"
with zipfile.ZipFile(source) as wheel, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as out:
    for item in wheel.infolist():
        if item.filename.startswith("ray/jars/"):
            continue
        data = wheel.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(True) if not line.startswith(b"ray/jars/"))
        out.writestr(item, data)
os.replace(slim, source)
EOF
du -ch .whl/*.whl | tail -1
