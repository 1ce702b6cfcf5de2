"""Stable Diffusion parts: converting SD autoencoders (`convert`) and the text-to-image pipeline (`pipeline`)."""
