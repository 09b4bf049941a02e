"""Figure: synthetic angiograms next to real ones, each with its vessel mask outlined.

Rows: synthetic images of four patients, the same with their mask outlines, four real images,
the same with their mask outlines, and four frames of one synthetic patient.  The real frames are read from a local copy of the CADML XCA data set at figure
time and are never copied into the repository.

    python tools/figures/synth_vs_real.py [--real /work/shared/data/xca-cadml]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from numpy.typing import NDArray  # noqa: E402
from PIL import Image  # noqa: E402

from cmunet.data.synth import image_rng, make_patient, patient_rng, render_frame  # noqa: E402

REAL_CASES = ("case10", "case101", "case150", "case1")


Frame = tuple[str, NDArray, NDArray]  # title, 8-bit image, boolean mask


def synthetic(seed: int, n: int, size: int) -> list[Frame]:
    """One frame of each of ``n`` synthetic patients."""
    out = []
    for p in range(n):
        image, mask = render_frame(make_patient(patient_rng(seed, p)), image_rng(seed, p), size)
        out.append((f"synthetic patient {p} (fg {mask.mean():.1%})", image, mask))
    return out


def one_patient(seed: int, n: int, size: int) -> list[Frame]:
    """``n`` frames of one synthetic patient (cardiac motion, contrast filling, noise)."""
    patient = make_patient(patient_rng(seed, 0))
    frames = [render_frame(patient, image_rng(seed, 100 + i), size) for i in range(n)]
    return [(f"patient 0, frame {i}", image, mask) for i, (image, mask) in enumerate(frames)]


def real(root: Path, cases: tuple[str, ...]) -> list[Frame]:
    """Real frames and masks of ``cases`` from ``root/images`` and ``root/masks``."""
    out = []
    for case in cases:
        image = np.asarray(Image.open(root / "images" / f"{case}.png").convert("L"))
        mask = np.asarray(Image.open(root / "masks" / f"{case}.png").convert("L")) > 127
        out.append((f"real {case} (fg {mask.mean():.1%})", image, mask))
    return out


def draw(rows: list[tuple[list[Frame], bool]], path: Path) -> None:
    """One row of panels per ``(frames, outline)``, the mask outlined in red where ``outline``;
    saved as a 256-colour PNG to keep the file small."""
    ncol = max(len(frames) for frames, _ in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.6 * ncol, 2.75 * len(rows)))
    for ax_row, (frames, outline) in zip(axes, rows):
        for ax, (title, image, mask) in zip(ax_row, frames):
            ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
            ax.set_axis_off()
            if outline:
                ax.contour(mask, levels=[0.5], colors="#ff3030", linewidths=0.6)
            ax.set_title(title + (", mask outline" if outline else ""), fontsize=7.5)
    fig.tight_layout(pad=0.4)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    buffer.seek(0)
    palette = Image.open(buffer).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    path.parent.mkdir(parents=True, exist_ok=True)
    palette.save(path, optimize=True)


def main() -> None:
    """Parse the arguments and write the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, default=Path("/work/shared/data/xca-cadml"))
    parser.add_argument("--out", type=Path, default=Path("docs/figures/synth_vs_real.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    synth, truth = synthetic(args.seed, 4, 512), real(args.real, REAL_CASES)
    frames = one_patient(args.seed, 4, 512)
    draw([(synth, False), (synth, True), (truth, False), (truth, True), (frames, True)], args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
