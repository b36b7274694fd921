#!/usr/bin/env bash
# Prepare .devbundle/: what a session lent a GPU machine (the `device` tool) carries there to run
# slimc's CUDA checks. That machine's image has Python 3.12, torch, onnx and onnxruntime but no
# TVM, cannot reach a package index, and a call carries at most 64 MiB with the repository,
# while TVM's wheel is 100 MB. So libtvm_compiler.so travels xz-compressed with the x86 BCJ
# filter (259 MB -> ~58 MB, 4 s to unpack there), the rest of the tvm package as a tar.xz
# (~3 MB, without its 26 MB of CUTLASS headers), tvm-ffi and onnx-graphsurgeon as wheels.
#
#   scripts/make_gpu_bundle.sh            # ~4 min (the xz -9e of TVM's compiler library)
#   then, with the device tool:  run  command="bash .devbundle/gpu_check.sh"  carry=[".devbundle"]
#
# gpu_check.sh runs: an artifact compiled here (no GPU: kernels precompiled to an sm_90 fatbin)
# against torch's reference outputs, tests/test_cuda_offline.py on the GPU, and
# bench/gpu_cuda.py (BERT-base numerics, latency vs torch, a CUDA tuning run of $TUNE seconds,
# default 300). Session 3 measured with this on an H200 (README, "CUDA on a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
SITE=$($PY -c 'import tvm, os; print(os.path.dirname(os.path.dirname(tvm.__file__)))')
OUT=.devbundle
grep -qx "/$OUT/" .git/info/exclude 2>/dev/null || echo "/$OUT/" >> .git/info/exclude
rm -rf "$OUT" && mkdir -p "$OUT"

TVM_VERSION=$($PY -c 'import importlib.metadata as m; print(m.version("apache-tvm"))')
FFI_VERSION=$($PY -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')
GS_VERSION=$($PY -c 'import importlib.metadata as m; print(m.version("onnx-graphsurgeon"))')
echo "make_gpu_bundle: tvm $TVM_VERSION, tvm-ffi $FFI_VERSION (cp312), graphsurgeon $GS_VERSION"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$OUT" "apache-tvm-ffi==$FFI_VERSION" "onnx-graphsurgeon==$GS_VERSION"
tar -C "$SITE" --exclude=tvm/3rdparty --exclude=tvm/lib/libtvm_compiler.so \
    --exclude=__pycache__ -cf - tvm | xz -9 -T2 > "$OUT/tvmpkg.tar.xz"
echo "make_gpu_bundle: compressing libtvm_compiler.so (xz -9e, x86 BCJ; a few minutes)"
xz --x86 --lzma2=preset=9e,dict=256MiB -T1 -c "$SITE/tvm/lib/libtvm_compiler.so" \
    > "$OUT/libtvm_compiler.so.xz"

# an artifact built here, without a GPU, and torch's outputs for its inputs
$PY - <<'EOF'
import sys
import numpy as np
sys.path.insert(0, "tests")
from zoo import ZOO
import slimc
module, inputs, _ = ZOO["bert"]()
g = slimc.capture(module, inputs)
slimc.compile(g, "cuda", target_options={"arch": "sm_90"}).save(".devbundle/prebuilt_art")
ins = g.example_inputs
np.savez(".devbundle/prebuilt_ref.npz", **{f"input{i}": x for i, x in enumerate(ins)},
         **{f"output{i}": o for i, o in enumerate(g.run(*ins))})
EOF

cat > "$OUT/gpu_check.sh" <<'EOF'
# runs on the GPU machine, in the repository root
date
if [ ! -f /tmp/site/tvm/lib/libtvm_compiler.so ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .devbundle/*.whl || exit 3
  tar -xJf .devbundle/tvmpkg.tar.xz -C /tmp/site || exit 3
  xz -dc .devbundle/libtvm_compiler.so.xz > /tmp/site/tvm/lib/libtvm_compiler.so || exit 3
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
CUDART=$(find /usr/local /opt /usr/lib -name 'libcudart.so.13*' 2>/dev/null | head -1)
export LD_LIBRARY_PATH=$(dirname "$CUDART"):/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
echo "== artifact built without a GPU"
timeout 120 python3 bench/gpu_cuda.py --prebuilt .devbundle/prebuilt_art \
    --expect .devbundle/prebuilt_ref.npz 2>&1 | grep -v Warning | tee $OUT/prebuilt.log
echo "== tests/test_cuda_offline.py on the GPU"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_offline.py 2>&1 \
    | tee $OUT/pytest_cuda.log | tail -5
echo "== BERT-base: numerics, latency, tuning ${TUNE:-300} s"
timeout 540 python3 bench/gpu_cuda.py --model bert-base --tune-seconds ${TUNE:-300} --runs 50 \
    --json $OUT/bert.json 2>&1 | grep -v "Warning\|return cls" | tee $OUT/bert.log | tail -30
date
EOF
du -cb "$OUT" | tail -1 | awk '{printf "make_gpu_bundle: %.1f MB in .devbundle (a call carries 64 MiB with the repository)\n", $1 / 1e6}'
