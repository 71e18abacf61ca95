"""dynamicrafter: animate a still photo into a short video with the DynamiCrafter video-diffusion model."""

__version__ = "0.1.0"
