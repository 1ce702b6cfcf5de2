#!/usr/bin/env bash
# The main job: set up .venv (if missing), then encode the bundled sample image with the
# shipped demo autoencoder and render it at 512², 2048² and a 4x zoomed-in box at 2048².
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OUT="${INFD_DEMO_OUT:-outputs/demo}"
CKPT="weights/demo-ae"
mkdir -p "$OUT"
infd info "$CKPT"
infd reconstruct assets/sample.jpg --ckpt "$CKPT" --size 512 --out "$OUT/sample-512.png"
infd reconstruct assets/sample.jpg --ckpt "$CKPT" --size 2048 --out "$OUT/sample-2048.png"
# The central quarter of the image (box y0,x0,y1,x1 in [-1, 1] units) at 2048²: a 4x zoom.
infd reconstruct assets/sample.jpg --ckpt "$CKPT" --size 2048 --box=-0.25,-0.25,0.25,0.25 --out "$OUT/sample-zoom4x-2048.png"
echo "infd demo: wrote $OUT/sample-512.png, $OUT/sample-2048.png and $OUT/sample-zoom4x-2048.png"
