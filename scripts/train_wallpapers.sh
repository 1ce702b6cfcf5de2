#!/usr/bin/env bash
# How the shipped demo pipeline (weights/wallpapers) is trained: on ../shared/data/wallpapers
# less the held-out split (infd.data.WALLPAPER_HOLDOUT), each stage stopped by a wall-clock
# budget (a stage resumes exactly where it stopped: run the script again with the same OUT).
#   1. the anchored CLIF autoencoder (configs/ae-wallpapers-cpu.json: latent = thumbnail +
#      residual, SR trunk, residual CLIF; AE_CONFIG to change it) at the config's rate;
#   2. its annealing: a new run from stage 1's last weights (--init, fresh Adam moments)
#      at ANNEAL_LR (default 2e-4); the learning curve flattens at the constant rate;
#   3. the decoder's fine-tune (configs/ae-wallpapers-cpu-finetune.json; FINETUNE_CONFIG): the
#      encoder frozen, crops drawn to cover the border as often as the interior, which
#      lowers the rim and adds a little everywhere;
#   4. the latent cache of the training images (the encoder is stage 2's, unchanged);
#   5. the latent diffusion model (configs/ldm-wallpapers-cpu.json; LDM_CONFIG); its last
#      checkpoint is an INFDPipeline folder.
# usage: scripts/train_wallpapers.sh DATA OUT AE_MINUTES ANNEAL_MINUTES FINETUNE_MINUTES LDM_MINUTES
#   (the shipped weights: 145, 10, 30 and 20 minutes on 2 CPU cores; see the model card)
# INFD names the command (default `infd`; e.g. INFD="python3 -m infd.cli"); AE_ARGS and
# LDM_ARGS add options to train-ae and train-ldm (e.g. AE_ARGS="--batch-size 4" for a dry run).
set -euo pipefail
DATA=$1 OUT=$2 AE_MINUTES=$3 ANNEAL_MINUTES=$4 FINETUNE_MINUTES=$5 LDM_MINUTES=$6
ANNEAL_LR=${ANNEAL_LR:-2e-4}
INFD=${INFD:-infd}
AE_CONFIG=${AE_CONFIG:-configs/ae-wallpapers-cpu.json}
FINETUNE_CONFIG=${FINETUNE_CONFIG:-configs/ae-wallpapers-cpu-finetune.json}
LDM_CONFIG=${LDM_CONFIG:-configs/ldm-wallpapers-cpu.json}
mkdir -p "$OUT"
resume() { [ -d "$1/checkpoints" ] && echo --resume || true; }
$INFD train-ae --config "$AE_CONFIG" --data "$DATA" --out "$OUT/ae" --holdout $(resume "$OUT/ae") \
    --time-limit "$AE_MINUTES" ${AE_ARGS:-} --no-progress >>"$OUT/ae.log" 2>&1 || { tail -n 20 "$OUT/ae.log"; exit 1; }
tail -n 2 "$OUT/ae.log"
if [ -d "$OUT/ae-anneal/checkpoints" ]; then anneal_start=--resume; else anneal_start="--init $OUT/ae --lr $ANNEAL_LR"; fi
$INFD train-ae --config "$AE_CONFIG" --data "$DATA" --out "$OUT/ae-anneal" --holdout $anneal_start \
    --time-limit "$ANNEAL_MINUTES" ${AE_ARGS:-} --no-progress >>"$OUT/ae-anneal.log" 2>&1 || { tail -n 20 "$OUT/ae-anneal.log"; exit 1; }
tail -n 2 "$OUT/ae-anneal.log"
if [ -d "$OUT/ae-finetune/checkpoints" ]; then finetune_start=--resume; else finetune_start="--init $OUT/ae-anneal"; fi
$INFD train-ae --config "$FINETUNE_CONFIG" --data "$DATA" --out "$OUT/ae-finetune" --holdout $finetune_start \
    --time-limit "$FINETUNE_MINUTES" ${AE_ARGS:-} --no-progress >>"$OUT/ae-finetune.log" 2>&1 || { tail -n 20 "$OUT/ae-finetune.log"; exit 1; }
tail -n 2 "$OUT/ae-finetune.log"
rm -rf "$OUT/latents" "$OUT/ldm"  # both belong to the autoencoder's newest weights
$INFD encode-latents --ae "$OUT/ae-finetune" --data "$DATA" --out "$OUT/latents" --holdout --no-progress
$INFD train-ldm --config "$LDM_CONFIG" --ae "$OUT/ae-finetune" --latents "$OUT/latents" \
    --out "$OUT/ldm" --time-limit "$LDM_MINUTES" ${LDM_ARGS:-} --no-progress >"$OUT/ldm.log" 2>&1 || { tail -n 20 "$OUT/ldm.log"; exit 1; }
tail -n 2 "$OUT/ldm.log"
# Ship it: fp16, no training state, the sampler's x0 clamped to the latents' range.
python scripts/export_pipeline.py "$OUT/ldm" weights/wallpapers --autoencoder weights/demo-ae --clip-sample-range 2.5
