#!/usr/bin/env python
"""Turn folders of angiograms (PNG/JPEG/TIFF 8/16-bit, DICOM) into WebDataset shards.

    python tools/shard.py --images DIR [--masks DIR] [--meta FILE] --out OUT [--size S]
                          [--workers N] [--skip-bad] [--test-list FILE] [--require-patient]
                          [key=value ...]

Writes OUT/shard-*.tar, OUT/manifest.json, OUT/splits.json and OUT/config.yaml. OUT may be an
object-store URL (s3://bucket/xca512, gs://...): the set is built locally, then uploaded. Any key
of the shard config can also be set as key=value, e.g. preprocess.unsharp_amount=3
preprocess.fit=crop. See docs/data.md.
"""

from __future__ import annotations

import sys

from cmunet.cli.common import add_common, apply_common, command_parser, start
from cmunet.config import ConfigError, dump_config, load_config
from cmunet.data.io import BadInput
from cmunet.data.sharding import ShardConfig, build_shards
from cmunet.outdir import OutputError

FLAGS = {  # command-line flag -> config key
    "images": "images", "masks": "masks", "meta": "meta", "out": "out",
    "size": "preprocess.size", "workers": "workers", "shard_size": "shard_size",
    "test_list": "test_list", "seed": "split_seed", "dicom_frames": "dicom_frames",
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
    parser.add_argument("--dicom-frames", choices=["all", "first", "middle"],
                        help="frames taken from multi-frame DICOM (default all)")
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
    add_common(parser, "cmunet-shard")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    apply_common(args)
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in FLAGS.items()
                 if getattr(args, flag) is not None]
    overrides += [f"{flag}=true" for flag in ("skip_bad", "overwrite", "require_patient")
                  if getattr(args, flag)]
    try:
        cfg = load_config(ShardConfig, args.config, overrides + args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        manifest = build_shards(cfg, salt=args.salt, log=lambda m: print(m, file=sys.stderr))
    except (ConfigError, BadInput, OutputError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _summary(cfg, manifest)
    return 0


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
