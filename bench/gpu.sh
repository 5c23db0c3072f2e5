#!/bin/bash
# One device call: JIT-build the kernel (tuning build with SDRUN_TUNE=1), run the GPU tests, self-test, the
# attention benchmark (ATTENTION=0 skips it), the end-to-end flags benchmark (FLAGS=1 runs it) and the 4K render
# benchmark (RENDER=1), the end-to-end benchmark (E2E=1, E2E_ARGS) and the memory benchmark (MEMORY=1,
# MEMORY_ARGS, and MEMORY_ONLY: row labels, which hold spaces, for its --only), the GroupNorm kernel's benchmark and
# the UNet's profile without and with sdrun's kernels (NORMS=1), the fusions of the eleventh session measured one by
# one (FUSIONS=1: the LayerNorm kernel, the UNet forward with each convolution's bias in a pass of its own, as
# --xformers --channels-last runs it now, with packed projections, with the fused LayerNorms; the VAE decode); with
# AOT=1 also build the extension ahead of time through setup.py (sm_90a only) and check it loads as prebuilt.
# Usage on the device machine:
#   [SDRUN_TUNE=1 VARIANTS=0,1,2 BENCH_ARGS=--check] bash bench/gpu.sh [pytest args, default: the kernel tests]
#   ATTENTION=0 FLAGS=1 bash bench/gpu.sh -m cuda tests/       # every GPU test, then bench/flags.py
#   ATTENTION=0 RENDER=1 bash bench/gpu.sh tests/test_gpu_render.py tests/test_gpu_pipeline.py   # the render engine
#   ATTENTION=0 FUSIONS=1 bash bench/gpu.sh tests/test_layer_norm_op.py tests/test_pointwise.py
set -o pipefail
export PYTHONUNBUFFERED=1 SDRUN_CACHE=${SDRUN_CACHE:-/tmp/sdrun-cache}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if [ -d .whl ]; then  # diffusers for the processor tests
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee $OUT/gpu.txt
( time python3 -c "import sdrun.ops as o; o.load(); print(o.build_info())" ) 2>&1 | tee $OUT/build.log || exit 1
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider ${@:-tests/test_attention_op.py} 2>&1 | tee $OUT/tests.log | tail -8
fi
python3 -c "import sdrun.ops as o; print(o.selftest())" 2>&1 | tee $OUT/selftest.log
if [ "${ATTENTION:-1}" = 1 ]; then
  python3 bench/attention.py --variants ${VARIANTS:-0} ${BENCH_ARGS:-} 2>&1 | tee $OUT/bench.log
fi
if [ "${FLAGS:-0}" = 1 ]; then
  python3 bench/flags.py ${FLAGS_ARGS:-} 2>&1 | grep -v '^\[transformers\]' | tee $OUT/flags.log
fi
if [ "${RENDER:-0}" = 1 ]; then
  python3 bench/render4k.py ${RENDER_ARGS:-} 2>&1 | grep -v '^\[transformers\]' | tee $OUT/render4k.log
fi
if [ "${E2E:-0}" = 1 ]; then
  python3 bench/e2e.py ${E2E_ARGS:-} 2>&1 | grep -v '^\[transformers\]' | tee $OUT/e2e.log
fi
if [ "${MEMORY:-0}" = 1 ]; then
  python3 bench/memory.py ${MEMORY_ARGS:-} ${MEMORY_ONLY:+--only "$MEMORY_ONLY"} 2>&1 | grep -v '^\[transformers\]' \
    | tee $OUT/memory.log
fi
if [ "${NORMS:-0}" = 1 ]; then
  python3 bench/group_norm.py 2>&1 | tee $OUT/group_norm.log
  for kernels in "" "--xformers --fused-norms --fused-geglu --nhwc-outputs"; do
    python3 bench/unet_profile.py $kernels 2>&1 | grep -v '^\[transformers\]' | tee -a $OUT/unet_profile.log
  done
fi
if [ "${FUSIONS:-0}" = 1 ]; then
  python3 bench/layer_norm.py 2>&1 | tee $OUT/layer_norm.log
  base="--xformers --fused-norms --fused-geglu --nhwc-outputs"
  for added in "--biases-apart" "--pointwise-gemms" "--pointwise-gemms --packed-projections" \
               "--pointwise-gemms --packed-projections --fused-layer-norms --top 30"; do
    python3 bench/unet_profile.py $base $added --cases 512x2cl,1024x2cl 2>&1 | grep -v Warning | tee -a $OUT/fusions.log
  done
  python3 bench/vae_profile.py 2>&1 | grep -v Warning | tee $OUT/vae_profile.log
fi
if [ "${AOT:-0}" = 1 ]; then
  ( time SDRUN_CUDA_ARCHS=9.0a NVCC_THREADS=4 python3 setup.py -q build_ext --inplace ) > $OUT/aot.log 2>&1 || tail -20 $OUT/aot.log
  python3 -c "import sdrun.ops as o; print(o.selftest()); print(o.build_info())" 2>&1 | tee -a $OUT/aot.log
  grep real $OUT/aot.log
fi
