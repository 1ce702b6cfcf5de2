"""Any-scale inversion: find a latent whose field satisfies conditions on chosen regions.

    pipe = load_pipeline("runs/ldm")                            # or an autoencoder alone, without pipeline=
    result = invert(pipe.autoencoder, load_spec("examples/super-resolve.json"), pipeline=pipe)
    result.z                                                    # (1, C, h, w): render it at any size

    spec        the spec: canvas, conditions and solver settings (JSON)
    conditions  what a region must show: an image, a text (CLIP), a palette, ...
    solvers     "optimize" and "guided", rendering only the conditions' regions
    clip        CLIP from a local folder
"""

from infd.inversion.solvers import InversionResult, check_solvable, condition_losses, invert, render_conditions, render_region
from infd.inversion.spec import DEFAULT_CANVAS, PRIORS, SOLVERS, InversionSpec, SolverConfig, check_bounds, load_spec, spec_from_dict, spec_to_dict

__all__ = [
    "DEFAULT_CANVAS", "PRIORS", "SOLVERS", "InversionResult", "InversionSpec", "SolverConfig", "check_bounds", "check_solvable",
    "condition_losses", "invert", "load_spec", "render_conditions", "render_region", "spec_from_dict", "spec_to_dict",
]
