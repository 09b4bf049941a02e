"""Pre-training methods. ``build_method(cfg)`` maps ``cfg.method`` to its class (a plain dict).

``cmunet-rec`` and ``cmunet-con`` are CM-UNet with one branch: they read the ``cmunet:`` section,
whose branch flags ``PretrainConfig`` sets from the method name (:data:`CMUNET_ABLATIONS`).
"""

from __future__ import annotations

from cmunet.methods.base import PretrainMethod
from cmunet.methods.cmunet import CMUNet
from cmunet.methods.genesis import Genesis
from cmunet.methods.mae import MAE
from cmunet.methods.moco import MoCo
from cmunet.methods.none import RandomInit
from cmunet.methods.spark import SparK
from cmunet.models.sync_bn import use_global_batch_norm

# method name -> the CM-UNet branch flags it stands for
CMUNET_ABLATIONS = {
    "cmunet-rec": {"reconstruction": True, "contrastive": False},  # reconstruction only
    "cmunet-con": {"reconstruction": False, "contrastive": True},  # contrastive only
}


def build_method(cfg) -> PretrainMethod:
    """The method named by ``cfg.method`` (a PretrainConfig), built from its config section."""
    width, size = cfg.model.width, cfg.view_size
    builders = {
        "cmunet": lambda: CMUNet(cfg.cmunet, width, size),
        "cmunet-rec": lambda: CMUNet(cfg.cmunet, width, size),
        "cmunet-con": lambda: CMUNet(cfg.cmunet, width, size),
        "none": lambda: RandomInit(width),
        "mae": lambda: MAE(cfg.mae, width, size),
        "genesis": lambda: Genesis(cfg.genesis, width, size),
        "spark": lambda: SparK(cfg.spark, width, size),
        "moco": lambda: MoCo(cfg.moco, width, size),
    }
    method = builders[cfg.method]()
    if cfg.model.sync_batch_norm:  # the heads' batch norm is global in any case
        use_global_batch_norm(method)
    return method
