"""The `infd` command line (typer + rich): one table of every command, each defined in `infd.commands`.

Every command reports a user error as one sentence on stderr and exits with status 1
(usage errors, from typer, with status 2); outputs are written to a temporary name and
renamed, so a failed command leaves nothing (`infd.commands.common`).
"""

from __future__ import annotations

import typer

from infd.app.command import app_command
from infd.commands import doctor, evaluate, invert, official, render, stable_diffusion, train, video, viewer

app = typer.Typer(
    name="infd",
    help="Image neural field diffusion: autoencoders and latent diffusion models whose images render at any resolution, region and aspect ratio.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMANDS = {
    "train-ae": train.train_ae,
    "reconstruct": render.reconstruct,
    "encode-latents": train.encode_latents,
    "train-ldm": train.train_ldm,
    "sample": render.sample,
    "render": render.render_latent,
    "info": render.info,
    "eval-ae": evaluate.eval_ae,
    "eval-gen": evaluate.eval_gen,
    "serve": viewer.serve,
    "zoom-video": video.zoom_video,
    "app": app_command,
    "invert": invert.invert_command,
    "convert-vae": stable_diffusion.convert_vae,
    "convert-official": official.convert_official,
    "txt2img": stable_diffusion.txt2img,
    "doctor": doctor.doctor,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
