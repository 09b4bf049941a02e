#!/usr/bin/env python
"""Segment the coronary vessels of new angiograms with a fine-tuned UNet.

    python launch/segment.py --model OUT --input IMAGES --out SEG
    python launch/segment.py --model models:/cmunet@champion --input scan.dcm --out SEG --tta \
        --min-component 50

--model: a launch/finetune.py output folder, a .safetensors file with preprocessing.json beside
it, an MLflow run id, runs:/RUN_ID/PATH, models:/NAME/VERSION or models:/NAME@ALIAS.
Writes SEG/masks/*.png, SEG/overlays/*.png, SEG/diameters.csv and SEG/errors.csv; with
--probabilities SEG/probabilities/*, with --dicom-seg SEG/dicom_seg/*.dcm for DICOM inputs.
Exit status: 0 every input segmented; 3 some inputs failed (named, and listed in errors.csv) and
the others were written; 2 nothing was segmented (model, arguments or inputs unusable).
See docs/segment.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from cmunet import extras
from cmunet.cli.common import add_common, apply_common, command_parser, start
from cmunet.config import ConfigError
from cmunet.inference.model import load_model
from cmunet.inference.predict import MODES, SegmentOptions
from cmunet.inference.segment import (EXIT_NOTHING, PROBABILITY_FORMATS, SEG_TYPES,
                                      OutputOptions, run_segment)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, SegmentOptions,
                                                OutputOptions]:
    parser = command_parser(__doc__)
    parser.add_argument("--model", required=True,
                        help="fine-tuning output folder, .safetensors file, MLflow run id, "
                             "runs:/..., models:/NAME/VERSION or models:/NAME@ALIAS")
    parser.add_argument("--input", required=True,
                        help="an image file or a folder of PNG/JPEG/TIFF/DICOM images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--mode", choices=MODES, default="resize",
                        help="resize: whole image at the training scale (default); window: "
                             "overlapping training-size windows, Gaussian-blended")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="window mode: overlap of neighbouring windows (default 0.5)")
    parser.add_argument("--tta", action="store_true",
                        help="average the probabilities over horizontal and vertical flips")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="vessel probability threshold (default 0.5)")
    parser.add_argument("--min-component", type=int, default=0, metavar="PX",
                        help="drop vessel components smaller than PX pixels (original size)")
    parser.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                        help="pixel spacing in mm (one value, or row and column) for images "
                             "whose file gives none")
    parser.add_argument("--batch-size", type=int, default=8, help="network inputs per pass")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 autocast where the device runs it fast (default)")
    parser.add_argument("--device", default="",
                        help="cpu, cuda or cuda:N (default: a GPU when there is one, else cpu)")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow tracking URI for runs:/ and models:/ "
                             "(default $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db)")
    parser.add_argument("--probabilities", choices=PROBABILITY_FORMATS, default="",
                        help="also write the vessel probability: npy (float32) or png16 (uint16, "
                             "p x 65535), in probabilities/")
    parser.add_argument("--dicom-seg", choices=SEG_TYPES, default="",
                        help="also write a DICOM Segmentation object of each DICOM input, in "
                             "dicom_seg/: binary (the mask) or fractional (the probability)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common(parser, "cmunet-segment")
    args = parser.parse_args(argv)
    apply_common(args)
    if args.spacing is not None and (len(args.spacing) > 2 or min(args.spacing) <= 0):
        parser.error("--spacing takes one or two positive numbers (mm per pixel)")
    try:
        options = SegmentOptions(mode=args.mode, tta=args.tta, threshold=args.threshold,
                                 min_component=args.min_component, batch_size=args.batch_size,
                                 overlap=args.overlap)
    except ConfigError as err:
        parser.error(f"--{err.key.replace('_', '-')} {err.message}")
    return args, options, OutputOptions(args.probabilities, args.dicom_seg)


def device_of(name: str) -> torch.device | None:
    """``--device``: None (the default device) for "", else the named device, checked."""
    if not name:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine sees {torch.cuda.device_count()} GPU(s)")
    return device


def main(argv: list[str] | None = None) -> int:
    args, options, outputs = parse_args(start("cmunet-segment", argv))
    spacing = None if args.spacing is None else (args.spacing[0], args.spacing[-1])
    try:
        if outputs.dicom_seg:
            extras.check("cmunet-segment --dicom-seg", "dicom-seg")
        model = load_model(args.model, args.tracking_uri, args.precision,
                           device_of(args.device))
        print(f"model: {model.describe()}")
        report = run_segment(model, args.input, args.out, options, spacing,
                             progress=not args.no_progress, outputs=outputs)
    except (ValueError, FileNotFoundError) as err:  # BadInput is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NOTHING
    print(report.summary(Path(args.out)), file=sys.stderr if report.errors else sys.stdout)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
