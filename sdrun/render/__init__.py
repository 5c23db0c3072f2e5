"""The render: its plan (plan.py, memory.py), its stages (stages.py), the denoising loop (sampling.py) and tiled diffusion (tiling.py)."""
