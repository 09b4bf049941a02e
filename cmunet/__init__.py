"""cmunet: contrastive masked pre-training (CM-UNet) and few-label fine-tuning for coronary angiograms."""

__version__ = "0.1.0"
