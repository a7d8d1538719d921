#!/usr/bin/env bash
# The whole GPU run in one command (BENCHMARKS.md, "GPU"):
#
#   bash benchmarks/gpu_suite.sh OUTDIR [PART ...]
#
# PARTS (default: all, in this order):
#   env       date, nvidia-smi, versions                                   -> env.json, nvidia-smi.txt
#   headline  ResNet-50 bf16 batch 256: library, minimal Flax, library with two-pass BatchNorm,
#             PyTorch torch.compile default and max-autotune ($TORCH_MODES), interleaved in one process, plus a
#             5-step profile (top ops, time per kind of work)                 -> headline.json
#   loop      python -m train on configs/synthetic_benchmark.py (300 steps)   -> loop.json
#   profile   the library step without command buffers, profiled (op names visible) -> tries_no_command_buffer.json
#   numerics  bf16 logits against PyTorch (+ its own bf16 error)              -> numerics.json
#   digits    float16 with loss scaling and float32, 100 steps each on the digits -> digits_float16.json, ..
#   cache     cold vs warm start through the persistent compilation cache    -> cache.json
#   sweep     ResNet-50 at batch 128 and 512, ResNet-18 and ResNet-101 at 256 (library) -> sweep_*.json
#   input     JPEG preprocessing on all host cores (Pillow; TensorFlow absent) -> input.json
#   grain     the image-folder pipeline (Grain, simplejpeg; the default worker count, and from 3
#             cores on also no workers, read threads in one process) and the same per-image work
#             alone, on 1, 2, 4, 8 and all host cores; JPEGs written by Pillow -> grain.json
#   tries     one XLA flag or library setting per run, library step only    -> tries_*.json
#   tries_pool_bn issue 25's first two tries (elementwise max-pool backward, fused BatchNorm + add +
#             ReLU) against the library step, alternating in one process     -> tries_pool_bn.json
#   jax011    the sharding and NNX tests, and NNX parity at float64 (resnet18, labml.ai's
#             bottleneck ResNetBase), on the host's jax                       -> jax011_parity_*.json
#   nnx       ResNet-50 bf16 batch 256: Linen vs NNX (split + jax.jit, and nnx.jit), alternating -> nnx.json
#
# Every result is JSON in OUTDIR; logs go to OUTDIR/logs. The summary of everything in OUTDIR
# is printed at the end (python -m benchmarks.gpu_summary OUTDIR). Missing packages
# (ml_collections: the training program's configs; grain, array_record, simplejpeg, cloudpickle
# and portpicker: the grain part) are installed from benchmarks/wheels/ when present. The host
# runs Python 3.12, so fetch them for it:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d benchmarks/wheels \
#     ml_collections grain==0.2.18 array_record==0.8.6 simplejpeg==1.9.0 cloudpickle portpicker
set -uo pipefail
if [[ $# -lt 1 ]]; then
  sed -n '2,34p' "$0"
  exit 2
fi
OUT_DIR=$(mkdir -p "$1" && cd "$1" && pwd)
shift
PARTS=${*:-env headline profile loop numerics digits cache sweep input grain nnx}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR/logs"

if ! "$PY" -c "import ml_collections, grain, simplejpeg" 2>/dev/null && ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/resnet_jax_wheels benchmarks/wheels/*.whl
  export PYTHONPATH=/tmp/resnet_jax_wheels${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export RESNET_JAX_CACHE_DIR=${RESNET_JAX_CACHE_DIR:-$OUT_DIR/xla_cache}

# step NAME SECONDS CMD...: run with a time limit; stdout to logs/NAME.out, stderr to logs/NAME.err.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "[gpu_suite] $name: $*" >&2
  timeout --signal=TERM --kill-after=20 "$limit" "$@" >"$OUT_DIR/logs/$name.out" 2>"$OUT_DIR/logs/$name.err"
  local rc=$?
  echo "[gpu_suite] $name: exit $rc after $((SECONDS - t0)) s" >&2
  echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - t0))}" >>"$OUT_DIR/steps.jsonl"
  [[ $rc -ne 0 ]] && tail -5 "$OUT_DIR/logs/$name.err" >&2
  return 0
}

R50="--arch resnet50 --batch 256 --dtype bfloat16 --image-size 224"
TS="$PY -m benchmarks.train_step"

for part in $PARTS; do
  case $part in
  env)
    nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1
    "$PY" - "$OUT_DIR/env.json" <<'EOF'
import json, subprocess, sys
from benchmarks.report import host_environment
env = host_environment()
for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "torch", "torchvision", "timm", "numpy"):
    try:
        env[mod] = __import__(mod, fromlist=["_"]).__version__
    except Exception as e:
        env[mod] = f"unavailable: {type(e).__name__}"
import jax, torch
env["jax_devices"] = [d.device_kind for d in jax.devices()]
env["torch_cuda"], env["cudnn"] = torch.version.cuda, torch.backends.cudnn.version()
env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                                    "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
EOF
    ;;
  headline)
    step headline 540 $TS $R50 --steps 30 --warmup 5 --rounds 3 --compare-minimal --compare-bn-two-pass \
      --compare-torch --torch-compile-mode "${TORCH_MODES:-default,max-autotune}" --torch-compile-timeout 240 \
      --pipelined --profile "$OUT_DIR/profile" --output "$OUT_DIR/headline.json"
    ;;
  profile)
    # Command buffers hide the ops they launch from the profiler: this run turns them off, so the
    # time per op (and per kind of work) is attributed; it doubles as the "no command buffers" try.
    XLA_FLAGS="--xla_gpu_enable_command_buffer=" step profile 240 $TS $R50 --steps 30 --warmup 5 --pipelined \
      --profile "$OUT_DIR/profile_nocb" --output "$OUT_DIR/tries_no_command_buffer.json"
    ;;
  loop)
    step loop 420 "$PY" -m train --config=configs/synthetic_benchmark.py --workdir="$OUT_DIR/loop_workdir" \
      --config.num_train_steps=300 --config.progress_bar=False
    "$PY" -m benchmarks.gpu_summary --loop "$OUT_DIR/loop_workdir" >"$OUT_DIR/loop.json" 2>>"$OUT_DIR/logs/loop.err"
    step loop_bare 300 $TS $R50 --steps 30 --warmup 5 --pipelined --output "$OUT_DIR/loop_bare.json"
    ;;
  numerics)
    step numerics 300 "$PY" -m benchmarks.bf16_numerics --arch resnet50 --batch 32 --output "$OUT_DIR/numerics.json"
    ;;
  digits)
    for dt in float16 float32; do
      step "digits_$dt" 300 "$PY" -m train --config=configs/default.py --workdir="$OUT_DIR/digits_$dt" \
        --config.dtype=$dt --config.num_train_steps=100 --config.log_every_steps=10 --config.progress_bar=False
      "$PY" -m benchmarks.gpu_summary --loop "$OUT_DIR/digits_$dt" >"$OUT_DIR/digits_$dt.json" 2>>"$OUT_DIR/logs/digits_$dt.err"
    done
    ;;
  cache)
    RESNET_JAX_CACHE_DIR= step cache 420 $TS $R50 --measure-cache --output "$OUT_DIR/cache.json"
    ;;
  sweep)
    for spec in "b128:--batch 128" "b512:--batch 512" "r18:--arch resnet18" "r101:--arch resnet101"; do
      step "sweep_${spec%%:*}" 300 $TS $R50 ${spec#*:} --steps 30 --warmup 5 --pipelined \
        --output "$OUT_DIR/sweep_${spec%%:*}.json"
    done
    ;;
  input)
    rate=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['jax']['images_per_s'])" "$OUT_DIR/headline.json" 2>/dev/null || echo 7200)
    step input 300 "$PY" -m benchmarks.input_host --cores 1,all --model-rate "$rate" --output "$OUT_DIR/input.json"
    ;;
  grain)
    cores=1; for n in 2 4 8; do [[ $n -lt $(nproc) ]] && cores+=",$n"; done
    step grain 480 "$PY" -m benchmarks.input_pipeline --total-images 2048 --cores "$cores,all" --grain-workers=-1,0 \
      --variants grain,work_only,grain,work_only,grain,work_only --jpeg-dir "$OUT_DIR/jpegs" --output "$OUT_DIR/grain.json"
    ;;
  tries)
    # One change per run against the library's default step (the profile part is the
    # "no command buffers" try; the sweep part covers batch size).
    base="$TS $R50 --steps 30 --warmup 5 --pipelined --no-compilation-cache"
    step tries_baseline 240 $base --output "$OUT_DIR/tries_baseline.json"
    step tries_bn_recompute 240 $base --bn-recompute --output "$OUT_DIR/tries_bn_recompute.json"
    step tries_stem_pad8 240 $base --stem-pad-channels 8 --output "$OUT_DIR/tries_stem_pad8.json"
    step tries_recompute_pad8 240 $base --bn-recompute --stem-pad-channels 8 --output "$OUT_DIR/tries_recompute_pad8.json"
    step tries_no_donate 240 $base --no-donate --output "$OUT_DIR/tries_no_donate.json"
    # Issue 25's first try: the stem max-pool's backward as elementwise ops, alternating with the
    # library's step in one process (maxpool_elementwise_over_xla_images_per_s).
    step tries_maxpool_elementwise 360 $TS $R50 --steps 30 --warmup 5 --rounds 3 --pipelined \
      --compare-maxpool-elementwise --output "$OUT_DIR/tries_maxpool_elementwise.json"
    # The second: BatchNorm + add + ReLU as one custom VJP with BatchNorm's closed-form backward
    # (ResNet(bn_fused=True)), alternating likewise (bn_fused_over_unfused_images_per_s).
    step tries_bn_fused 360 $TS $R50 --steps 30 --warmup 5 --rounds 3 --pipelined \
      --compare-bn-fused --output "$OUT_DIR/tries_bn_fused.json"
    ;;
  tries_pool_bn)
    # Each try compiles once; the three steps then alternate (3 rounds x 30 steps), so the two
    # ratios (maxpool_elementwise_over_xla_images_per_s, bn_fused_over_unfused_images_per_s) share
    # one process, one device state and one baseline.
    step tries_pool_bn 420 $TS $R50 --steps 30 --warmup 5 --rounds 3 --pipelined --compare-maxpool-elementwise \
      --compare-bn-fused --output "$OUT_DIR/tries_pool_bn.json"
    ;;
  jax011)
    # Issue 25, part 1: on jax 0.11 (tests/conftest.py runs the tests on the host's CPU devices).
    step jax011_tests 420 "$PY" -m pytest -q -n 4 -p no:cacheprovider tests/test_sharding.py tests/test_nnx.py
    step jax011_parity_resnet18 240 "$PY" -m resnet_jax.parity --arch resnet18 --dtype float64 --api nnx --json
    cp "$OUT_DIR/logs/jax011_parity_resnet18.out" "$OUT_DIR/jax011_parity_resnet18.json"
    step jax011_parity_labml 240 "$PY" -m resnet_jax.parity --arch resnetbase_bottleneck --labml --dtype float64 \
      --api nnx --json
    cp "$OUT_DIR/logs/jax011_parity_labml.out" "$OUT_DIR/jax011_parity_labml.json"
    ;;
  nnx)
    step nnx 360 $TS $R50 --steps 30 --warmup 5 --rounds 3 --compare-nnx --pipelined --output "$OUT_DIR/nnx.json"
    ;;
  *)
    echo "unknown part $part" >&2
    ;;
  esac
done

"$PY" -m benchmarks.gpu_summary "$OUT_DIR" | tee "$OUT_DIR/summary.txt"
