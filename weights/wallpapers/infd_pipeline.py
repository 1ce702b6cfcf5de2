"""diffusers' custom-pipeline entry of this folder; the pipeline class is infd's own (pip install infd).

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="infd_pipeline", trust_remote_code=True)
"""

from infd.diffusion.pipeline import INFDPipeline  # noqa: F401
