"""dynamicrafter: animate a still photo into a short video with the DynamiCrafter video-diffusion model.

The public API (see :mod:`dynamicrafter.api`)::

    from dynamicrafter import Animator
    anim = Animator.load("512")
    anim.animate("photo.jpg", "a man waving", seed=1).save("waving.mp4")

Names are imported on first use, so ``import dynamicrafter`` (and starting the CLI) does not import torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Animator": "api",
    "Result": "api",
    "Request": "request",
    "make_request": "request",
    "SamplingSettings": "settings",
    "SettingsError": "errors",
    "ImageScale": "models.context",
    "SweepResult": "sweep",
    "get_preset": "presets",
    "load_presets": "presets",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dynamicrafter' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
