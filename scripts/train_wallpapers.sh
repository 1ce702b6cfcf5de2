#!/usr/bin/env bash
# How the shipped demo models were trained: on ../shared/data/wallpapers less the held-out
# split (infd.data.WALLPAPER_HOLDOUT), each stage stopped by a wall-clock budget.
#   1. the CLIF autoencoder (with the fixed-resolution baseline head on its trunk) and the
#      LIIF autoencoder, side by side with the same budget (one GPU holds both);
#   2. the latent cache of the training images under the CLIF autoencoder;
#   3. the latent diffusion model; its last checkpoint is an INFDPipeline folder.
# usage: scripts/train_wallpapers.sh DATA OUT AE_MINUTES LDM_MINUTES
# INFD names the command (default `infd`; e.g. INFD="python3 -m infd.cli"); AE_ARGS and
# LDM_ARGS add options to train-ae and train-ldm (e.g. AE_ARGS="--batch-size 4" for a dry run).
set -euo pipefail
DATA=$1 OUT=$2 AE_MINUTES=$3 LDM_MINUTES=$4
INFD=${INFD:-infd}
mkdir -p "$OUT"
for name in clif liif; do
    config=configs/ae-wallpapers.json
    [ "$name" = liif ] && config=configs/ae-wallpapers-liif.json
    $INFD train-ae --config "$config" --data "$DATA" --out "$OUT/ae-$name" --holdout \
        --time-limit "$AE_MINUTES" ${AE_ARGS:-} --no-progress >"$OUT/ae-$name.log" 2>&1 &
    eval "pid_$name=\$!"
done
status=0
wait "$pid_clif" || status=$?
wait "$pid_liif" || status=$?
tail -n 3 "$OUT/ae-clif.log" "$OUT/ae-liif.log"
[ "$status" = 0 ] || { echo "autoencoder training failed"; exit "$status"; }
$INFD encode-latents --ae "$OUT/ae-clif" --data "$DATA" --out "$OUT/latents" --holdout --no-progress
$INFD train-ldm --config configs/ldm-wallpapers.json --ae "$OUT/ae-clif" --latents "$OUT/latents" \
    --out "$OUT/ldm" --time-limit "$LDM_MINUTES" ${LDM_ARGS:-} --no-progress >"$OUT/ldm.log" 2>&1 || { tail -n 20 "$OUT/ldm.log"; exit 1; }
tail -n 2 "$OUT/ldm.log"
