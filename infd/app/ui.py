"""The web page of `infd app` (Gradio): tabs Generate, Explore, Reconstruct and Layout over a `Workspace`.

Every handler turns an `InfdError` into the CLI's sentence shown on the page (`gr.Error`),
so bad input never stops the server; the work runs one request at a time (the queue's
concurrency limit), and Cancel stops the running one within one sampler step or tile.
"""

from __future__ import annotations

import functools
import html
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves this machine

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from infd.app.workspace import LAYOUT_NEEDS_CLIP, MAX_MAGNIFICATION, Cancelled, Job, Picture, Workspace  # noqa: E402
from infd.errors import InfdError  # noqa: E402
from infd.geometry import Box  # noqa: E402

EXPLORE_PREVIEW = 1024  # the side of the picture Explore shows to click on
WORK = {"concurrency_id": "work", "concurrency_limit": 1}  # one request renders at a time; the others wait in the queue
LAYOUT_EXAMPLE = [[-1.0, -1.0, -0.2, 1.0, "a blue sky with white clouds"], [-0.2, -1.0, 1.0, 1.0, "a green meadow with flowers"]]


def shows_errors(handler):
    """Show a user error as its one sentence on the page (and a cancel as a note); the server carries on."""

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except InfdError as error:
            raise gr.Error(str(error), title="infd") from None
        except Cancelled:
            raise gr.Error("Cancelled; nothing was changed.", title="infd") from None

    return wrapper


class Jobs:
    """The running job of each browser session, so that its Cancel button can stop it."""

    def __init__(self):
        self.running: dict[str, Job] = {}

    def start(self, request: gr.Request, progress: gr.Progress) -> Job:
        job = Job(report=lambda fraction, text: progress(fraction, desc=text))
        self.running[request.session_hash] = job
        return job

    def cancel(self, request: gr.Request) -> None:
        job = self.running.get(request.session_hash)
        if job is not None:
            job.cancel.set()


def describe(picture: Picture) -> str:
    """The lines under a result: what it is, the viewer link, how to get it again."""
    h, w = picture.render.shape[:2]
    size = f"{w}x{h}" if picture.file is None else f"preview {w}x{h}; the full image is the .tif below"
    return (
        f"**{html.escape(picture.label)}** ({size}) · <a href=\"{picture.viewer}\" target=\"_blank\">open in the zoom viewer</a>\n\n"
        f"`{picture.reproduce}`"
    )


def preview(picture: Picture) -> np.ndarray:
    """The picture at most EXPLORE_PREVIEW a side, for clicking on (every pixel of it maps to a point of the image)."""
    from PIL import Image

    h, w = picture.render.shape[:2]
    if max(h, w) <= EXPLORE_PREVIEW:
        return picture.render
    scale = EXPLORE_PREVIEW / max(h, w)
    return np.asarray(Image.fromarray(picture.render).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX))


def build_ui(space: Workspace, clip: str | None = None, clip_arch: str | None = None) -> gr.Blocks:
    """The page (see the module docstring)."""
    jobs = Jobs()
    pipelines = space.pipelines
    names = list(space.slots)
    first = pipelines[0] if pipelines else names[0]
    first_steps = space.slots[first].pipe.default_steps if space.slots[first].pipe is not None else 50

    with gr.Blocks(title="infd", analytics_enabled=False) as ui:
        picture = gr.State(None)  # the session's current Picture
        centre = gr.State((0.0, 0.0))  # where Explore zooms, (y, x) in image units
        gr.Markdown(
            "## infd: images that render at any resolution\n"
            "Generate an image, click on it in **Explore** to zoom up to 64x with real detail (and make a zoom video), "
            "or **Reconstruct** your own image at its own aspect."
        )
        model = gr.Dropdown(names, value=first, label="Model", info="Pipelines generate; every model reconstructs.")

        with gr.Tab("Generate"):
            with gr.Row():
                seed = gr.Number(0, precision=0, label="Seed", minimum=0)
                random_seed = gr.Checkbox(False, label="Random seed")
                width = gr.Number(2048, precision=0, label="Width", minimum=1)
                height = gr.Number(1152, precision=0, label="Height", minimum=1)
                steps = gr.Slider(1, 1000, value=first_steps, step=1, label="Steps")
            gr.Markdown("Up to 8192x8192 renders here; larger sizes (to 32768 a side) stream to a .tif to download.")
            with gr.Row():
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                cancel_generate = gr.Button("Cancel", elem_id="cancel-generate")
            generated = gr.Image(label="Result", type="numpy", format="png", interactive=False, elem_id="generated")
            generated_info = gr.Markdown(elem_id="generated-info")
            generated_file = gr.File(label="Full size (.tif)", visible=False)

        with gr.Tab("Explore"):
            gr.Markdown("Click on the image where to zoom, choose the magnification, then render the region: beside it, the same region cut from the full render and upsampled.")
            with gr.Row():
                explore_source = gr.Image(label="Click where to zoom", type="numpy", interactive=False, elem_id="explore-source")
                with gr.Column():
                    magnification = gr.Slider(1, MAX_MAGNIFICATION, value=16, step=1, label="Magnification")
                    region_side = gr.Number(1024, precision=0, label="Output size (long side)", minimum=1)
                    explore_button = gr.Button("Render region", variant="primary", elem_id="explore")
                    where = gr.Markdown("Zooms into the centre until you click.", elem_id="explore-where")
            with gr.Row():
                from_field = gr.Image(label="Rendered from the field", type="numpy", format="png", interactive=False, elem_id="from-field")
                upsampled = gr.Image(label="Cut from the full render, upsampled (bicubic)", type="numpy", format="png", interactive=False, elem_id="upsampled")
            with gr.Row():
                frames = gr.Slider(2, 600, value=48, step=1, label="Video frames (24 fps)")
                video_side = gr.Number(512, precision=0, label="Video size (long side)", minimum=2)
                video_button = gr.Button("Zoom video", elem_id="zoom-video")
                cancel_explore = gr.Button("Cancel")
            zoom_video = gr.Video(label="From the whole image into the region, every frame rendered from the field", elem_id="video")

        with gr.Tab("Reconstruct"):
            gr.Markdown("Upload any image: it is encoded, then rendered at its own aspect at the scale you choose, beside the model-free floors with their PSNR.")
            with gr.Row():
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
                with gr.Column():
                    scale = gr.Number(1024, precision=0, label="Scale (long side; 0: the image's own)", minimum=0)
                    reconstruct_button = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct")
                    cancel_reconstruct = gr.Button("Cancel")
            with gr.Row():
                labels = ("infd", "thumbnail floor", "input floor")
                reconstructions = [gr.Image(label=label, type="numpy", format="png", interactive=False, elem_id=f"reconstruction-{i}") for i, label in enumerate(labels)]
            scores = gr.Markdown(elem_id="psnr")

        with gr.Tab("Layout"):
            gr.Markdown(
                "Boxes with prompts (y0, x0, y1, x1 in [-1, 1], top-left to bottom-right): any-scale inversion finds an image whose "
                "every box matches its prompt, scored by CLIP (only the boxes are rendered, at CLIP's size)."
            )
            clip_note = f"CLIP: `{html.escape(clip)}`" if clip else f"**{LAYOUT_NEEDS_CLIP}**"
            gr.Markdown(clip_note, elem_id="clip-note")
            regions = gr.Dataframe(value=LAYOUT_EXAMPLE, headers=["y0", "x0", "y1", "x1", "prompt"], datatype=["number", "number", "number", "number", "str"], label="Boxes", interactive=True)
            with gr.Row():
                clip_path = gr.Textbox(clip or "", label="CLIP weights (path)")
                clip_architecture = gr.Textbox(clip_arch or "", label="open_clip architecture (for a checkpoint file)")
            with gr.Row():
                layout_width = gr.Number(512, precision=0, label="Width", minimum=1)
                layout_height = gr.Number(512, precision=0, label="Height", minimum=1)
                layout_steps = gr.Number(100, precision=0, label="Steps", minimum=1)
                layout_seed = gr.Number(0, precision=0, label="Seed", minimum=0)
            with gr.Row():
                layout_button = gr.Button("Run layout", variant="primary", elem_id="layout")
                cancel_layout = gr.Button("Cancel")
            layout_image = gr.Image(label="Result", type="numpy", format="png", interactive=False)
            layout_info = gr.Markdown()

        # ------------------------------------------------------------ handlers

        def on_model(name):
            slot = space.slot(name)
            return gr.update(value=slot.pipe.default_steps) if slot.pipe is not None else gr.update()

        @shows_errors
        def on_generate(name, seed_value, random_value, width_value, height_value, steps_value, request: gr.Request, progress=gr.Progress()):
            job = jobs.start(request, progress)
            result = space.generate(name, None if random_value else _number(seed_value, "the seed"), width_value, height_value, _number(steps_value, "the steps"), job)
            shown = result.render
            file = gr.update(value=str(result.file), visible=True) if result.file else gr.update(value=None, visible=False)
            return shown, describe(result), file, result, result.seed, preview(result), (0.0, 0.0)

        @shows_errors
        def on_click(current: Picture | None, event: gr.SelectData):
            if current is None:
                raise InfdError("generate or reconstruct an image first.")
            x, y = event.index
            h, w = preview(current).shape[:2]
            point = (-1 + 2 * (y + 0.5) / h, -1 + 2 * (x + 0.5) / w)
            return point, f"Zooms around y={point[0]:.3f}, x={point[1]:.3f} (image units)."

        @shows_errors
        def on_explore(current: Picture | None, point, magnification_value, side, request: gr.Request, progress=gr.Progress()):
            if current is None:
                raise InfdError("generate or reconstruct an image first.")
            job = jobs.start(request, progress)
            rendered, cut, box = space.explore(current, tuple(point), magnification_value, side, job)
            h, w = rendered.shape[:2]
            corners = f"{box.y0:.4f},{box.x0:.4f},{box.y1:.4f},{box.x1:.4f}"
            text = f"Region y0,x0,y1,x1 = {corners} ({magnification_value:g}x), {w}x{h}: `infd render --box={corners} --size {max(w, h)}`"
            return rendered, cut, text

        @shows_errors
        def on_video(current: Picture | None, point, magnification_value, frames_value, side, request: gr.Request, progress=gr.Progress()):
            from infd.app.workspace import zoom_region

            if current is None:
                raise InfdError("generate or reconstruct an image first.")
            job = jobs.start(request, progress)
            return str(space.zoom_video(current, zoom_region(tuple(point), magnification_value), side, _number(frames_value, "the frames"), job))

        @shows_errors
        def on_reconstruct(name, path, scale_value, request: gr.Request, progress=gr.Progress()):
            if not path:
                raise InfdError("upload an image first.")
            job = jobs.start(request, progress)
            try:
                result, rows = space.reconstruct(name, path, _number(scale_value, "the scale") or None, job)
            except InfdError as error:  # say the file's name, not where the upload was kept
                raise InfdError(str(error).replace(str(path), Path(path).name)) from None
            table = "| render | PSNR |\n| --- | --- |\n" + "".join(f"| {label} | {_decibels(value)} |\n" for label, _, value in rows)
            h, w = result.render.shape[:2]
            text = f"{w}x{h}, PSNR against the image resized to that size:\n\n{table}\n{describe(result)}"
            return (*(gr.update(value=pixels, label=f"{label}: {_decibels(value)}") for label, pixels, value in rows), text, result, preview(result), (0.0, 0.0))

        @shows_errors
        def on_layout(name, table, clip_value, arch_value, width_value, height_value, steps_value, seed_value, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            job = jobs.start(request, progress)
            boxes = _regions(table)
            result = space.layout(name, boxes, width_value, height_value, steps_value, _number(seed_value, "the seed"), clip_value.strip() or None, arch_value.strip() or None, job)
            return result.render, describe(result), result, preview(result), (0.0, 0.0)

        model.change(on_model, model, steps, queue=False)
        generate_event = generate_button.click(
            on_generate, [model, seed, random_seed, width, height, steps], [generated, generated_info, generated_file, picture, seed, explore_source, centre], **WORK
        )
        explore_source.select(on_click, picture, [centre, where], queue=False)
        explore_event = explore_button.click(on_explore, [picture, centre, magnification, region_side], [from_field, upsampled, where], **WORK)
        video_event = video_button.click(on_video, [picture, centre, magnification, frames, video_side], zoom_video, **WORK)
        reconstruct_event = reconstruct_button.click(on_reconstruct, [model, upload, scale], [*reconstructions, scores, picture, explore_source, centre], **WORK)
        layout_event = layout_button.click(
            on_layout, [model, regions, clip_path, clip_architecture, layout_width, layout_height, layout_steps, layout_seed], [layout_image, layout_info, picture, explore_source, centre], **WORK
        )
        for button, events in ((cancel_generate, [generate_event]), (cancel_explore, [explore_event, video_event]), (cancel_reconstruct, [reconstruct_event]), (cancel_layout, [layout_event])):
            button.click(_cancel(jobs), None, None, queue=False, cancels=events)
    return ui


def _cancel(jobs: Jobs):
    def cancel(request: gr.Request) -> None:
        jobs.cancel(request)

    return cancel


def _number(value, what: str) -> int:
    """A whole number from a numeric field (Gradio gives None for an empty one)."""
    if value is None:
        raise InfdError(f"{what} is empty; type a whole number.")
    if value != int(value):
        raise InfdError(f"{what} must be a whole number, got {value}.")
    return int(value)


def _decibels(value: float | None) -> str:
    return "n/a (larger than the image)" if value is None else f"{value:.2f} dB"


def _regions(table) -> list[tuple[Box, str]]:
    """The Layout table's rows as (box, prompt); empty rows are skipped."""
    rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
    regions = []
    for number, row in enumerate(rows, 1):
        if not any(str(cell).strip() for cell in row):
            continue
        try:
            y0, x0, y1, x1 = (float(cell) for cell in row[:4])
        except (TypeError, ValueError):
            raise InfdError(f"row {number} of the boxes needs four numbers y0, x0, y1, x1.") from None
        regions.append((Box(y0, x0, y1, x1), str(row[4]).strip()))
    return regions
