#!/bin/bash
# The GPU checks of docs/benchmarks.md ("On a GPU"), in one go, on a machine with one or more GPUs and this
# project importable (pip install -e . or PYTHONPATH=.). Logs go to $OUT (default: gpu-check/).
#   bash bench/gpu_check.sh
# Not yet run as a whole: its parts ran on an H200 separately (docs/benchmarks.md).
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi -L
python3 -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__)" || exit 1
root=$(mktemp -d)
s=$(date +%s)
timeout 600 python3 -m cad_ray.cli run --config jobs/configs/digits.yaml --root "$root/digits" > "$OUT/pipeline.log" 2>&1
echo "whole pipeline (digits.yaml): rc=$? $(( $(date +%s) - s )) s"; grep "complete in" "$OUT/pipeline.log"
timeout 300 python3 bench/attribution_speed.py --device cuda --skip-reference > "$OUT/speed-digits.json" 2>&1
echo "digits speed: rc=$?"; cat "$OUT/speed-digits.json"
# SD 1.x-shaped UNet at 32 x 32 latents: gradients of 148.7M ff components, sums kept on the GPU
timeout 300 python3 bench/attribution_speed.py --sd-shaped 32 --samples 2 --steps 10 --device cuda --skip-reference \
    > "$OUT/speed-sd-shaped.json" 2>&1
echo "SD-shaped speed: rc=$?"; tail -12 "$OUT/speed-sd-shaped.json"
# SD 1.4 at its real size and latent size (64 x 64 = 512 px), end to end through `cad-ray run` (issue 11): attribution
# seconds per sample, peak GPU memory and the ratio to the one-trajectory limit come from its "probe" (in-process)
timeout 600 python3 bench/sd_scale.py --latent 64 --device cuda --steps 10 --samples 2 --json "$OUT/sd-scale.json" \
    > "$OUT/sd-scale.log" 2>&1
echo "SD-sized run (64 x 64 latents): rc=$?"; python3 -c "import json, sys; f = json.load(open(sys.argv[1])); \
print(json.dumps({k: f.get(k) for k in ('probe', 'stage_s', 'total_s', 'peak_rss_gb', 'bytes_per_score', \
'written_over_tables', 'top100_s')}, indent=1))" "$OUT/sd-scale.json" || tail -20 "$OUT/sd-scale.log"
timeout 300 python3 bench/node_loss.py --cpus-per-node 4 --repeats 2 > "$OUT/node-loss.log" 2>&1
echo "node loss: rc=$?"; tail -30 "$OUT/node-loss.log"
rm -rf "$root"
