"""The `infd` commands, one module per stage; `infd.cli` puts them in one typer app.

    common            errors as one sentence, verbatim messages, shared option help
    train             train-ae, encode-latents, train-ldm
    render            reconstruct, sample, render, info
    evaluate          eval-ae, eval-gen
    viewer            serve
    video             zoom-video
    invert            invert
    stable_diffusion  convert-vae, txt2img
    official          convert-official (the paper's released checkpoints)
    doctor            doctor (what a bug report needs: versions, CPU, GPUs, weights)

The modules import nothing from `infd.cli`, and heavy libraries only inside each command.
"""
