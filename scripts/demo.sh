#!/usr/bin/env bash
# The main job: set up .venv (if missing), sample an image from the shipped demo pipeline
# (weights/wallpapers) and render it at 2048², then render a 4x zoomed-in box of the same
# sample at 2048², and reconstruct the bundled photo at 2048² with the same autoencoder.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT="${INFD_DEMO_OUT:-outputs/demo}"
PIPE="weights/wallpapers"
SEED="${INFD_DEMO_SEED:-106}"
mkdir -p "$OUT"
infd info "$PIPE"
infd sample --ckpt "$PIPE" --n 1 --seed "$SEED" --size 2048 --out "$OUT"
# The central quarter of the sample (box y0,x0,y1,x1 in [-1, 1] units) at 2048²: a 4x zoom.
infd render "$OUT/sample_0000.z.safetensors" --ckpt "$PIPE" --size 2048 --box=-0.25,-0.25,0.25,0.25 --out "$OUT/sample_0000_zoom4x.png"
infd reconstruct assets/sample.jpg --ckpt "$PIPE" --size 2048 --out "$OUT/photo-2048.png"
echo "infd demo: wrote $OUT/sample_0000.png (2048², seed $SEED), $OUT/sample_0000_zoom4x.png (its centre at 4x zoom) and $OUT/photo-2048.png"
