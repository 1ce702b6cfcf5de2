"""Evaluation: reconstruction at every scale (`eval-ae`) and patch-FID of generated images (`eval-gen`).

    inputs        the scales and the images an evaluation reads
    autoencoders  `evaluate_autoencoders`: every model and floor at every scale
    generated     `evaluate_generated`: FID and patch-FID of generated images
    metrics       PSNR, SSIM, LPIPS, spectral distance, FID, blockiness, ...
    report        the machine record, markdown, goals, JSON and plots

Results are JSON (machine, settings, rows, per-image values), a markdown table and a PNG
plot, each written atomically.
"""

from infd.evaluation import metrics
from infd.evaluation.autoencoders import AE_METRICS, ZOOM, EvalModel, Floor, ModelSpec, ae_markdown, evaluate_autoencoders, evaluate_image, floors_for, load_models, reconstruction, write_ae_report
from infd.evaluation.generated import evaluate_generated, gen_markdown, scale_patches, write_gen_report
from infd.evaluation.inputs import MIN_SCALE, parse_scales, scaled_size, select_images
from infd.evaluation.report import goals_markdown, machine_summary, markdown_table

__all__ = [
    "AE_METRICS", "MIN_SCALE", "ZOOM", "EvalModel", "Floor", "ModelSpec", "ae_markdown", "evaluate_autoencoders", "evaluate_generated",
    "evaluate_image", "floors_for", "gen_markdown", "goals_markdown", "load_models", "machine_summary", "markdown_table", "metrics",
    "parse_scales", "reconstruction", "scale_patches", "scaled_size", "select_images", "write_ae_report", "write_gen_report",
]
