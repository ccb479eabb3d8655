#!/usr/bin/env bash
# Every quick benchmark script run once on tiny inputs (CPU, offline, ~3 min on 2 cores): a refactor
# that breaks a script shows here, not on a lent GPU machine or in a session that needs its figures.
# The figures printed are meaningless; only each script's exit status is checked.
#   make bench-smoke            (= bash benchmarks/smoke.sh, PY=.venv/bin/python)
# tests/test_benchmark_scripts.py checks the scripts' adtrain names statically in every `make test`;
# `DRY=1 bash benchmarks/gpu_suite.sh PART ...` rehearses the GPU suite's parts on the CPU.
set -u
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/adtrain_bench_smoke}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} MPLBACKEND=Agg WANDB_MODE=disabled
rm -rf "$WORK" && mkdir -p "$WORK"
R=$WORK/run  # a small PatchCore run on synthetic textures with the offline EfficientNet-Lite0 weights
"$PY" -m adtrain.bench method=patchcore method.center_crop=null backbone=efficientnet_lite0 data=synthetic \
  data.size=128 data.num_train=24 data.num_test_normal=4 data.num_test_anomalous=4 data.num_workers=0 \
  data.eval_batch_size=4 paths.cache_dir="$WORK/cache" bench.run_dir="$R" bench.out="$WORK/run.json" \
  > "$WORK/run.log" 2>&1 || { echo "FAILED: the small run (log: $WORK/run.log)"; tail -5 "$WORK/run.log"; exit 1; }
failed=0
while IFS= read -r cmd; do
  [ -z "$cmd" ] && continue
  start=$SECONDS
  if timeout 300 "$PY" $cmd > "$WORK/out.log" 2>&1; then
    echo "ok     $((SECONDS - start))s  $cmd"
  else
    echo "FAILED $((SECONDS - start))s  $cmd"; tail -4 "$WORK/out.log" | sed 's/^/       /'; failed=$((failed + 1))
  fi
done <<EOF
benchmarks/bank_search_run.py $R --images 1
benchmarks/batch_faults.py $R --batch 4 --rounds 1
benchmarks/certified_share.py $R --images 1
benchmarks/inference_parts.py $R --batch 4 --rounds 1
benchmarks/lowp_rerank_width.py $R --images 1
benchmarks/map_parts.py $R --batch 4 --rounds 1
benchmarks/search_parts.py $R --repeat 1 --batch 4
benchmarks/window_density.py $R --images 1
benchmarks/nearest_pass.py --run-dir $R --images 1 --repeat 1
benchmarks/gpu_model_parts.py $R --device cpu --batch 4 --batches 1
benchmarks/profile_test.py $R --repeat 1 --top 3
benchmarks/export_speed.py --checkpoint $R/checkpoints/model.ckpt --batch-size 2 --batches 1 --formats onnx torchscript
benchmarks/exact_distances_speed.py --repeat 1
benchmarks/region_labels.py --masks 8 --repeat 1
benchmarks/search_select.py --repeat 1 --shapes 256:2000:64:1
benchmarks/graph_search_forms.py --queries 256 --chunk 128 --k 3
benchmarks/resize_rules.py --sizes 300 --to 256
benchmarks/pixel_exact.py --images 4 --size 64 --rounds 1
benchmarks/pixel_update.py --batch 4 --repeat 1
benchmarks/gemm_rate.py --queries 256 --items 2048 --dim 264 --repeat 1
benchmarks/bank_build_rss.py --index flat --rows 5000 --dim 64
benchmarks/memory_bank.py --device cpu --sizes 5000 --dim 64 --queries 256 --backends torch:flat torch:host --coreset-max 5000
benchmarks/patch_descriptor.py --batch 2 --repeat 1
benchmarks/fuse_speed.py --backbones resnet18 --batch 2 --size 64 --repeat 1
benchmarks/gathered_chunk.py --repeat 1
benchmarks/hetmm_speed.py --backbone resnet18 --num-templates 8 --k 4 --batch-sizes 1 --dtypes float32 --iters 1 --image-size 64 --device cpu
EOF
echo "$failed failed (not run here, each a whole experiment: anomalib_baseline, dfm_*, export_resize_check, export_split, graph_resize_ab, stfpm_seeds, sweep_coreset, throughput, val_pass_parts, vs_anomalib)"
[ "$failed" -eq 0 ]
