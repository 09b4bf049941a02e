"""What every pre-training method provides to the shared training loop.

A method is an ``nn.Module`` that owns its networks. Per optimizer step the loop calls
``forward(images, gen)`` -> ``(loss, logs)``, under bf16 autocast when ``autocast_device`` is set
(the method enters autocast itself, see ``__call__``); after each optimizer step
``after_step(progress)`` (EMA updates, queues) -> logs. ``export_state()`` returns the weights
fine-tuning loads (``encoder.*``/``decoder.*`` in UNet naming) and ``gallery(images, gen)``
returns rows of named 2-D arrays for the reconstruction figure. Parameters with
``requires_grad=False`` (momentum copies) are never given to the optimizer.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class PretrainMethod(nn.Module):
    name = "base"
    parts = {"encoder": "encoder", "decoder": "decoder"}  # UNet part -> attribute exported
    no_weight_decay: tuple[str, ...] = ()  # parameter-name prefixes kept out of weight decay
    autocast_device: str | None = None  # "cuda" / "cpu": forward runs under bf16 autocast there

    def __call__(self, *args, **kwargs):
        """``forward`` under bf16 autocast when ``autocast_device`` is set. Autocast is entered
        here, inside DeepSpeed's ``engine.forward``: the engine turns an autocast entered outside
        it off when ``torch.is_autocast_enabled()`` (which looks at CUDA) is true and its config
        has no ``torch_autocast`` section (deepspeed/runtime/torch_autocast.py), so an outer
        autocast runs bf16 on CPU but silently fp32 on GPUs. Weights stay fp32."""
        if self.autocast_device is None:
            return super().__call__(*args, **kwargs)
        with torch.autocast(device_type=self.autocast_device, dtype=torch.bfloat16):
            return super().__call__(*args, **kwargs)

    def forward(self, images: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_step(self, progress: float) -> dict[str, float]:
        return {}

    def export_state(self) -> dict[str, torch.Tensor]:
        """``{"encoder.<name>": tensor, "decoder.<name>": tensor}`` of the online networks."""
        state = {}
        for part, attribute in self.parts.items():
            module = getattr(self, attribute)
            state.update({f"{part}.{k}": v for k, v in module.state_dict().items()})
        return state

    @torch.no_grad()
    def gallery(self, images: torch.Tensor, gen: torch.Generator) -> list[dict[str, np.ndarray]]:
        return []


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()
