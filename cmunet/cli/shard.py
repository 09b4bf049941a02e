#!/usr/bin/env python
"""Turn folders of angiograms (PNG/JPEG/TIFF 8/16-bit, DICOM) into WebDataset shards.

    python tools/shard.py --images DIR [--masks DIR] [--meta FILE] --out OUT [--size S]
                          [--workers N] [--skip-bad] [--test-list FILE] [--require-patient]
                          [--dicom-frames all|first|middle|contrast] [--dicom-stride N]
                          [--contrast-keep FRACTION] [--dicom-max-frames K] [key=value ...]

    python tools/shard.py ... --out PART_i --part i/N --salt S   (machine i of N), then
    python tools/shard.py --merge PART_1 ... PART_N --out OUT     (see cmunet/data/parts.py)
    python tools/shard.py --append SET --images DIR [--masks DIR] [--meta FILE] [--salt S]
    python tools/shard.py --upgrade SET   (a set of the older format: see cmunet/data/upgrade.py)

Writes OUT/shard-*.tar, OUT/index.npz, OUT/manifest.json, OUT/splits.json and OUT/config.yaml.
OUT may be an object-store URL (s3://bucket/xca512, gs://...): the set is built locally, then
uploaded. Any key of the shard config can also be set as key=value, e.g.
preprocess.unsharp_amount=3 preprocess.fit=crop. See docs/data.md.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from cmunet.cli.common import add_common, apply_common, command_parser, start
from cmunet.config import ConfigError, dump_config, load_config
from cmunet.data.cine import FRAME_CHOICES
from cmunet.data.io import BadInput
from cmunet.data.sharding import ShardConfig, build_shards
from cmunet.outdir import OutputError

FLAGS = {  # command-line flag -> config key
    "images": "images", "masks": "masks", "meta": "meta", "out": "out",
    "size": "preprocess.size", "workers": "workers", "shard_size": "shard_size",
    "test_list": "test_list", "seed": "split_seed", "dicom_frames": "dicom_frames",
    "dicom_stride": "dicom_stride", "contrast_keep": "contrast_keep",
    "dicom_max_frames": "dicom_max_frames",
}


def main(argv: list[str] | None = None) -> int:
    argv = start("cmunet-shard", argv)
    parser = command_parser(__doc__)
    parser.add_argument("--images", help="folder of images (PNG, JPEG, TIFF, DICOM)")
    parser.add_argument("--masks", help="folder of binary masks named like their images")
    parser.add_argument("--meta", help="CSV (image,patient[,spacing_mm]) or JSON metadata")
    parser.add_argument("--out", help="output folder or object-store URL (s3://, gs://): must "
                        "not exist, unless --overwrite")
    parser.add_argument("--size", type=int, help="output side in pixels (default: the first image's shorter side)")
    parser.add_argument("--workers", type=int, help="processes (default: every core)")
    parser.add_argument("--shard-size", type=int, help="samples per shard (default: auto)")
    parser.add_argument("--test-list", help="file of image names: an official test split")
    parser.add_argument("--seed", type=int, help="seed of the patient split (default 0)")
    parser.add_argument("--dicom-frames", choices=FRAME_CHOICES,
                        help="frames taken from multi-frame DICOM (cine loops): all (default), "
                             "first, middle, or contrast (the contrast phase, see "
                             "--contrast-keep)")
    parser.add_argument("--dicom-stride", type=int, metavar="N",
                        help="then keep every N-th of those frames (default 1: each)")
    parser.add_argument("--contrast-keep", type=float, metavar="FRACTION",
                        help="with --dicom-frames contrast: keep the frames scoring at least "
                             "FRACTION of the way from the loop's lowest vessel-contrast score "
                             "to its highest (default 0.4)")
    parser.add_argument("--dicom-max-frames", type=int, metavar="K",
                        help="then at most K frames per file, evenly spaced (default 0: no "
                             "limit)")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad files and list them")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out written by this tool (never "
                        "an input or a folder of other files)")
    parser.add_argument("--require-patient", action="store_true",
                        help="stop if an image has no patient (no --meta entry, no DICOM "
                             "PatientID) instead of warning and counting it as its own patient")
    parser.add_argument("--salt", help="secret for hashing DICOM patient ids (default: "
                                       "$CMUNET_SALT, else random per run); never stored")
    parser.add_argument("--config", help="YAML file of shard settings (keys: docs/configuration.md, ShardConfig)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved shard config (flags, --config and key=value) "
                             "and exit")
    parser.add_argument("--part", metavar="I/N",
                        help="shard only the I-th of N equal runs of the images into --out, a "
                             "part for --merge (one machine of N)")
    parser.add_argument("--merge", nargs="+", metavar="PART",
                        help="join the parts 1/N..N/N written with --part into the set --out")
    parser.add_argument("--append", metavar="SET",
                        help="add the images of --images (with --masks, --meta) to the shard set "
                             "SET, with its settings, in new shards: its patients keep their "
                             "splits, new ones are placed by a hash of their name "
                             "(cmunet/data/append.py)")
    parser.add_argument("--upgrade", metavar="SET",
                        help="rewrite the shard set SET of the older format (every sample in "
                             "manifest.json) in the current one (index.npz), and exit")
    add_common(parser, "cmunet-shard")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    apply_common(args)
    if args.upgrade:
        return _upgrade(args.upgrade)
    if args.append:
        return _append(args)
    if args.merge:
        return _merge(args)
    try:
        part = _part(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in FLAGS.items()
                 if getattr(args, flag) is not None]
    overrides += [f"{flag}=true" for flag in ("skip_bad", "overwrite", "require_patient")
                  if getattr(args, flag)]
    try:
        cfg = load_config(ShardConfig, args.config, overrides + args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        manifest = build_shards(cfg, salt=args.salt, log=lambda m: print(m, file=sys.stderr),
                                part=part)
    except (ConfigError, BadInput, OutputError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if part:
        print(f"wrote part {part[0]}/{part[1]}: {manifest['count']} samples of files "
              f"{manifest['first_file'] + 1}.. of {manifest['files']} to {cfg.out}")
        return 0
    _summary(cfg, manifest)
    return 0


def _part(args) -> tuple[int, int] | None:
    """``--part I/N`` as (I, N); a part without --meta needs the same --salt on every machine."""
    if not args.part:
        return None
    number, _, of = args.part.partition("/")
    if not (number.isdigit() and of.isdigit() and 1 <= int(number) <= int(of)):
        raise ValueError(f"--part {args.part}: give I/N with 1 <= I <= N, e.g. --part 2/8")
    if not (args.meta or args.salt or os.environ.get("CMUNET_SALT")):
        raise ValueError("--part without --meta needs --salt (or $CMUNET_SALT), the same on "
                         "every machine: DICOM patient pseudonyms must agree between the parts")
    return int(number), int(of)


def _merge(args) -> int:
    from cmunet.data.parts import merge_parts

    if not args.out:
        print("error: --merge PART... needs --out OUT (the set to write)", file=sys.stderr)
        return 2

    def merge():
        manifest = merge_parts(args.merge, args.out, overwrite=args.overwrite, log=_stderr)
        part = load_config(ShardConfig, os.path.join(args.merge[0], "config.yaml"))
        _summary(replace(part, out=args.out), manifest)
    return _reported(merge)


def _append(args) -> int:
    from cmunet.data.append import append_images

    if not args.images:
        print("error: --append SET needs --images DIR (the images to add)", file=sys.stderr)
        return 2
    return _reported(lambda: append_images(
        args.append, args.images, args.masks, args.meta, workers=args.workers or 0,
        skip_bad=args.skip_bad, salt=args.salt, log=_stderr))


def _upgrade(folder: str) -> int:
    from cmunet.data.upgrade import upgrade_set

    return _reported(lambda: upgrade_set(folder, log=_stderr))


def _reported(action) -> int:
    """0 once ``action()`` is done; 2 with its error in one line."""
    try:
        action()
    except (ConfigError, BadInput, OutputError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _summary(cfg: ShardConfig, m: dict) -> None:
    rate = m["count"] / max(m["seconds"], 1e-9)
    print(f"wrote {m['count']} samples ({m['labelled']} labelled, {m['patients']} patients) "
          f"in {len(m['shards'])} shards to {cfg.out} ({m['seconds']:.1f} s, {rate:.1f} img/s)")
    print(f"size {m['size']}x{m['size']} {m['dtype']}, mean {m['mean']:.2f}, std {m['std']:.2f} "
          f"(over {m['stats_over']})")
    if m["skipped"]:
        print(f"skipped {len(m['skipped'])} bad files:")
        for item in m["skipped"]:
            print(f"  {item['file']}: {item['problem']}")
    if m.get("orphan_masks"):
        print(f"ignored {len(m['orphan_masks'])} masks without an image:")
        for item in m["orphan_masks"]:
            print(f"  {item}")
    if m["dropped_masks"]:
        print(f"kept {len(m['dropped_masks'])} images unlabelled (bad masks):")
        for item in m["dropped_masks"]:
            print(f"  {item['file']}: {item['problem']}")


if __name__ == "__main__":
    sys.exit(main())
