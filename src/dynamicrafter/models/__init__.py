"""The networks: the 3D UNet, the Resampler, and the CLIP/VAE wrappers."""
