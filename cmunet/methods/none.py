"""No pre-training: the seeded random initialisation of the UNet (the paper's supervised baseline).

The method owns an ``Encoder`` and a ``Decoder`` built in the order that
:class:`~cmunet.models.unet.UNet` builds them, so after ``torch.manual_seed(seed)`` (the loop
seeds before building the method) its export holds exactly the weights that
``torch.manual_seed(seed); UNet(width)`` starts from: fine-tuning from it is training from
scratch, and the study treats "none" like every other method (one export per seed, through the
same launcher). It has no settings and no config section.

There is nothing to train, so nothing is trained: ``method: none`` resolves to ``train.epochs: 0``
(and ZeRO stage 0, which is all that accepts a model without trainable parameters) in
:class:`~cmunet.training.pretrain_config.PretrainConfig`, whatever the command line says; the shared
loop then runs no step and writes the export. Training the networks on a zero loss instead would
not leave them unchanged (DeepSpeed gives parameters without a gradient a zero one, and AdamW then
applies weight decay), and a module without trainable parameters cannot take an optimizer step.
"""

from __future__ import annotations

import torch

from cmunet.methods.base import PretrainMethod
from cmunet.models.unet import Decoder, Encoder


class RandomInit(PretrainMethod):
    name = "none"

    def __init__(self, width: int):
        super().__init__()
        self.encoder = Encoder(width)
        self.decoder = Decoder(width)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise RuntimeError("method 'none' has no pre-training step: its config resolves to "
                           "train.epochs=0 and the export is the seeded initialisation")
