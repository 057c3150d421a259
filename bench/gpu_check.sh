#!/bin/bash
# The GPU checks of docs/benchmarks.md ("On a GPU"), in one go, sized for one 10-minute command on a lent
# machine with this project importable (pip install -e . or PYTHONPATH=.). Logs and JSON go to $OUT (default:
# gpu-check/). Checks that already ran on an H200 (whole digits pipeline, node loss) are in bench/ to re-run
# by hand: `python -m cad_ray.cli run --config jobs/configs/digits.yaml`, `python bench/node_loss.py`.
#   bash bench/gpu_check.sh
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi -L
python3 -c "import torch, ray, diffusers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'ray', ray.__version__, 'diffusers', diffusers.__version__)" || exit 1
# SD 1.4 at its real size and latent size (64 x 64 = 512 px), end to end through `cad-ray run` (issue 11): its
# probe (in-process, before the run) gives attribution seconds per sample, peak GPU memory and the ratio to the
# one-trajectory limit; the JSON is rewritten after each step, so a cut-short run keeps what it measured
work=$(mktemp -d)
s=$(date +%s)
timeout 450 python3 bench/sd_scale.py --latent 64 --device cuda --steps 10 --samples 2 \
    --workdir "$work/sd" --keep --json "$OUT/sd-scale.json" > "$OUT/sd-scale.log" 2>&1
echo "SD-sized run (64 x 64 latents): rc=$? $(( $(date +%s) - s )) s"
pkill -f "cad_ray.cli run"; pkill -f "ray::"; pkill -f gcs_server; pkill -f raylet
cp "$work/sd/run.log" "$OUT/sd-scale-run.log" 2>/dev/null
python3 -c "import json, sys; f = json.load(open(sys.argv[1])); \
print(json.dumps({k: f.get(k) for k in ('build_s', 'probe', 'stage_s', 'run_s', 'total_s', 'peak_rss_gb', \
'bytes_per_score', 'written_over_tables', 'top100_s')}, indent=1))" "$OUT/sd-scale.json" || tail -20 "$OUT/sd-scale.log"
grep -E "complete in|Error|error" "$OUT/sd-scale-run.log" | tail -8
# the digits model on one GPU against the one-trajectory limit (after the one-sample warm-up and per-chunk copies)
timeout 90 python3 bench/attribution_speed.py --device cuda --skip-reference > "$OUT/speed-digits.json" 2>&1
echo "digits speed: rc=$?"; tail -15 "$OUT/speed-digits.json"
rm -rf "$work"
