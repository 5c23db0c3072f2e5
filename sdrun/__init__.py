"""sdrun: Stable Diffusion text-to-image from the command line, built for small GPUs and big batches."""

__version__ = "0.1.0"
