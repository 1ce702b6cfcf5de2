"""A picture strip: the same centre crop of the same samples from two renderings, side by side, enlarged 2x.

    python scripts/strip.py --a "INFD (CLIF)=runs/gen/infd" --b "fixed + bicubic=runs/gen/fixed" \\
        --seeds 3,9,15 --out benchmarks/results/eval-gen-wallpapers/strip-infd-vs-fixed.png

Each folder holds sample_NNNN.png files of one size (`infd sample`, and the same z with `--renderer fixed`).
"""

import argparse
from pathlib import Path

from PIL import Image

from infd.evaluation.autoencoders import comparison_strip
from infd.files import atomic_path
from infd.images import pil_to_tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="LABEL=FOLDER of the first rendering")
    parser.add_argument("--b", required=True, help="LABEL=FOLDER of the second rendering")
    parser.add_argument("--seeds", default="3,9,15", help="sample indices")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    crops = []
    for index in map(int, args.seeds.split(",")):
        for label, folder in (spec.split("=", 1) for spec in (args.a, args.b)):
            image = Image.open(Path(folder) / f"sample_{index:04d}.png").convert("RGB")
            left, top = (image.width - args.crop) // 2, (image.height - args.crop) // 2
            crop = image.crop((left, top, left + args.crop, top + args.crop)).resize((2 * args.crop,) * 2, Image.NEAREST)
            crops.append((f"sample {index}: {label}", pil_to_tensor(crop)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        Image.fromarray(comparison_strip(crops)).save(tmp)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
