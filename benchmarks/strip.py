"""A picture strip: the same centre crop of the same samples from two renderings, side by side.

    python benchmarks/strip.py --a "INFD (CLIF)=runs/gen/infd" --b "fixed + bicubic=runs/gen/fixed" \\
        --seeds 3,9,15 --out benchmarks/results/eval-gen-wallpapers/strip-infd-vs-fixed.png

Each folder holds sample_NNNN.png files of the same size (e.g. `infd sample` and the same
z rendered with `--renderer fixed`); crops are shown enlarged 2x with nearest neighbours.
"""

import argparse
from pathlib import Path

from PIL import Image, ImageDraw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="LABEL=FOLDER of the first rendering")
    parser.add_argument("--b", required=True, help="LABEL=FOLDER of the second rendering")
    parser.add_argument("--seeds", default="3,9,15", help="sample indices")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sources = [tuple(spec.split("=", 1)) for spec in (args.a, args.b)]
    crop, pad = args.crop, 18
    tiles = []
    for index in (int(s) for s in args.seeds.split(",")):
        for label, folder in sources:
            image = Image.open(Path(folder) / f"sample_{index:04d}.png").convert("RGB")
            w, h = image.size
            box = ((w - crop) // 2, (h - crop) // 2, (w + crop) // 2, (h + crop) // 2)
            tiles.append((f"sample {index}: {label}", image.crop(box).resize((2 * crop, 2 * crop), Image.NEAREST)))
    strip = Image.new("RGB", (len(tiles) * (2 * crop + 4), 2 * crop + pad), "white")
    draw = ImageDraw.Draw(strip)
    for i, (label, tile) in enumerate(tiles):
        strip.paste(tile, (i * (2 * crop + 4), pad))
        draw.text((i * (2 * crop + 4) + 2, 2), label, fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
