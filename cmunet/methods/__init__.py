"""Pre-training methods. ``build_method(cfg)`` maps ``cfg.method`` to its class (a plain dict)."""

from __future__ import annotations

from cmunet.methods.base import PretrainMethod
from cmunet.methods.cmunet import CMUNet


def build_method(cfg) -> PretrainMethod:
    """The method named by ``cfg.method`` (a PretrainConfig), built from its config section."""
    width, size = cfg.model.width, cfg.view_size
    builders = {
        "cmunet": lambda: CMUNet(cfg.cmunet, width, size),
    }
    return builders[cfg.method]()
