"""Synthetic X-ray coronary angiograms with exact vessel masks.

Image model
-----------
An angiogram is a projection: the detector measures ``I = I0 * exp(-A)``, where ``A`` is the
line integral of the attenuation along each X-ray.  We build ``A`` from three layers, all in
units of a 512x512 reference image (pixel spacing 0.3 mm) so that the look does not depend on
the output size:

* Anatomy (background): a smooth random field (soft tissue, lung markings), a soft-edged
  ellipse (heart shadow), a curved step (diaphragm), curved bands with denser edges (ribs) and
  a vertical column of blocks separated by discs (spine).
* Devices: a contrast-filled catheter of constant radius that ends at the root of the tree, and
  sometimes thin ECG lead wires.  They are dark but they are not part of the mask.
* Coronary tree: a main vessel starts near a side of the image and grows by a random walk of its
  direction with smoothly varying curvature; it branches recursively, the radii taper along the
  vessel and split at branch points by Murray's law (``r^3 = r1^3 + r2^3``), and some vessels
  get a stenosis (a local Gaussian narrowing).  Each vessel is a tube; the contrast path length
  through it at distance ``d`` from the centreline is ``2 sqrt(r^2 - d^2)`` (Beer-Lambert), with a
  half-pixel linear ramp at the edge for anti-aliasing.  Path lengths add up where vessels cross
  in projection.  The mask is the lumen: pixels with ``d <= r`` (at least half a pixel wide).

A *patient* fixes the tree, the devices and the anatomy.  Each *frame* of a patient changes
the cardiac phase (a smooth contraction and wobble of the tree), the contrast concentration and
how far the contrast has filled the distal vessels, a small shift/zoom/rotation of the whole
scene and the noise.  The detector then applies vignetting, an optional collimator (dark corners
or shutters), Poisson quantum noise, a slight Gaussian blur, a little electronic noise and the
edge enhancement (unsharp masking) of angiography systems, and digitises to 12 bits.  The
8-bit output is the 12-bit value scaled to 0..255, the 16-bit output the 12-bit value scaled to
0..65535 (bit replication).  Sizes: vessel radii of about 1-7 px at 512x512, masks of about
3-7 % of the image, mean grey level about 130 (8 bit).

A *cine loop* (:func:`generate_cine`) is a multi-frame XA DICOM file of one patient whose pose,
collimator and detector settings stay fixed while the cardiac phase advances and the contrast
follows a gamma-variate bolus (:func:`bolus_curve`): it arrives, peaks and washes out, so the
contrast phase of each loop is known.

Everything is seeded: patient ``p`` uses ``SeedSequence([seed, 0, p])`` and image ``i`` uses
``SeedSequence([seed, 1, i])`` (cine loop ``l``: ``[seed, 2..4, ..., l]``), so the files do not
depend on the number of worker processes.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

from cmunet.outdir import check_only

REF_SIZE = 512
"""Size of the reference image in which all geometry is expressed (reference pixels)."""
REF_SPACING_MM = 0.3
"""Pixel spacing of the reference image in mm."""
DETECTOR_MAX = 4095
"""Largest digitised (12-bit) detector value."""

_MU_VESSEL = 0.1  # attenuation of contrast-filled lumen per reference pixel of path length
_MU_CATHETER = 0.1
_MIN_RADIUS = 0.9  # reference pixels; vessels stop growing below this radius
_STEP = 6.0  # reference pixels between centreline points
_WHITE = 0.69  # detector value of unattenuated, unvignetted flux, as a fraction of full scale


@dataclass(frozen=True)
class Vessel:
    """One vessel of a tree, sampled along its centreline (reference pixels)."""

    points: NDArray[np.float64]  # (n, 2) x, y
    radii: NDArray[np.float64]  # (n,)
    weight: NDArray[np.float64]  # (n,) contrast weight; ramps from 0 at a branch's ostium
    dist: NDArray[np.float64]  # (n,) path length from the root of the tree


@dataclass(frozen=True)
class Anatomy:
    """Background parameters of a patient (reference pixels, attenuation units)."""

    field: NDArray[np.float32]  # smooth random attenuation on a coarse grid
    heart: tuple[float, ...]  # cx, cy, ax, ay, angle, strength
    diaphragm: tuple[float, ...] | None  # y0, curvature, tilt, strength
    ribs: NDArray[np.float64]  # (k, 5): y0, curvature, tilt, half-width, strength
    spine: tuple[float, ...] | None  # x0, half-width, period, phase, strength


@dataclass(frozen=True)
class Device:
    """A tube of constant radius that is not a vessel: the catheter or an ECG lead wire."""

    points: NDArray[np.float64]  # (n, 2) centreline (reference pixels)
    radius: float  # reference pixels
    mu: float  # attenuation per reference pixel of path length
    beats: bool  # moves with the heart (the catheter, hooked into the ostium)


@dataclass(frozen=True)
class Patient:
    """Everything that frames of one synthetic patient share."""

    vessels: list[Vessel]
    devices: list[Device]  # the catheter first
    anatomy: Anatomy
    heart_centre: NDArray[np.float64]  # centre of the cardiac contraction


# --------------------------------------------------------------------------- coronary tree


def _grow_vessel(
    rng: np.random.Generator, start: NDArray, angle: float, radius: float, length: float
) -> tuple[NDArray, NDArray]:
    """Random-walk a centreline: the curvature is a mean-reverting random process.

    Thinner vessels are more tortuous.  Returns the points (n, 2) and the radii (n,), which
    taper geometrically to 55-80 % of ``radius`` (at least the minimum) at the distal end;
    most of the tapering comes from the branches (see :func:`_grow_tree`).
    The walk stops at ``length``, when it leaves the image by a margin, or when the radius
    falls below the minimum.
    """
    n = max(2, int(length / _STEP))
    wiggle = 0.002 + 0.004 / radius
    curvature = rng.normal(0.0, 2 * wiggle)
    r_end = max(_MIN_RADIUS * 1.05, radius * rng.uniform(0.55, 0.8))
    points, radii = [np.asarray(start, float)], [radius]
    pos = points[0].copy()
    for i in range(1, n):
        curvature += -0.15 * curvature + rng.normal(0.0, wiggle)
        angle += curvature * _STEP
        pos = pos + _STEP * np.array([np.cos(angle), np.sin(angle)])
        r = radius * (r_end / radius) ** (i / n)
        if r < _MIN_RADIUS or not (-30 < pos[0] < REF_SIZE + 30 and -30 < pos[1] < REF_SIZE + 30):
            break
        points.append(pos)
        radii.append(r)
    return np.array(points), np.array(radii)


def _add_stenosis(rng: np.random.Generator, radii: NDArray) -> NDArray:
    """Narrow a vessel locally by 30-70 % over a Gaussian profile of 4-10 reference pixels."""
    s = np.arange(len(radii)) * _STEP
    centre = rng.uniform(0.2, 0.8) * s[-1]
    width = rng.uniform(4.0, 10.0)
    severity = rng.uniform(0.3, 0.7)
    return radii * (1.0 - severity * np.exp(-0.5 * ((s - centre) / width) ** 2))


def _branch_points(rng: np.random.Generator, n: int, depth: int) -> list[tuple[int, float]]:
    """Where a vessel of ``n`` samples branches, and the daughter/parent radius ratio there.

    Side branches take 40-75 % of the parent radius; a trunk (depth 0) usually starts with a
    near-symmetric bifurcation, like the left main splitting into LAD and circumflex.
    """
    if depth >= 4:
        return []
    spacing = rng.uniform(25.0, 50.0) / _STEP
    at = np.cumsum(rng.exponential(spacing, n)).astype(int) + 3
    points = [(int(i), rng.uniform(0.4, 0.75)) for i in at if i < n - 3]
    if depth == 0 and rng.random() < 0.7:
        points = [(int(rng.integers(3, 9)), rng.uniform(0.75, 0.95))] + [
            p for p in points if p[0] > 10
        ]
    return points


def _grow_tree(
    rng: np.random.Generator,
    start: NDArray,
    angle: float,
    radius: float,
    length: float,
    depth: int,
    dist0: float,
    parent_radius: float,
    out: list[Vessel],
) -> None:
    """Grow one vessel, append it to ``out`` and recursively grow its side branches.

    At a branch point the daughter takes a fraction of the parent radius and the parent keeps
    ``(r^3 - r_daughter^3)^(1/3)`` (Murray's law) for the rest of its course; smaller daughters
    leave at larger angles.  A branch's contrast ramps up over its parent's radius, so that the
    overlap with the parent at the ostium is not counted twice.
    """
    points, radii = _grow_vessel(rng, start, angle, radius, length)
    n = len(points)
    if n < 3:
        return
    scale = np.ones(n)
    branches = []
    for i, frac in _branch_points(rng, n, depth):
        r_here = radii[i] * scale[i]
        r_child = r_here * frac
        if r_child < _MIN_RADIUS * 1.3:
            continue
        scale[i:] *= (1.0 - frac**3) ** (1.0 / 3.0)
        heading = float(np.arctan2(*(points[i + 1] - points[i - 1])[::-1]))
        turn = rng.choice([-1.0, 1.0]) * np.deg2rad(rng.uniform(20.0, 35.0) + 40.0 * (1 - frac))
        child_len = min(r_child * rng.uniform(60.0, 100.0), 420.0)
        branches.append((points[i], heading + turn, r_child, child_len, i, r_here))
    radii = radii * scale
    if radii.max() > 1.5 and rng.random() < 0.15:
        radii = _add_stenosis(rng, radii)
    dist = dist0 + np.arange(n) * _STEP
    if parent_radius > 0:
        weight = np.clip(np.arange(n) * _STEP / (parent_radius * 1.3), 0.0, 1.0)
    else:
        weight = np.ones(n)
    out.append(Vessel(points, radii, weight, dist))
    for start_b, angle_b, r_b, len_b, i, r_parent in branches:
        _grow_tree(rng, start_b, angle_b, r_b, len_b, depth + 1, dist[i], r_parent, out)


def _root_and_heading(rng: np.random.Generator) -> tuple[NDArray, float]:
    """Choose the ostium near one side of the image and an initial heading into the image."""
    side = rng.choice(4, p=[0.35, 0.35, 0.15, 0.15])  # left, top, right, bottom
    along = rng.uniform(0.2, 0.6) * REF_SIZE
    inset = rng.uniform(0.08, 0.25) * REF_SIZE
    root = [(inset, along), (along, inset), (REF_SIZE - inset, along), (along, REF_SIZE - inset)]
    inward = [0.0, np.pi / 2, np.pi, -np.pi / 2][side]
    # head towards the image centre, so that the tree spreads over the field of view
    to_centre = np.arctan2(REF_SIZE / 2 - root[side][1], REF_SIZE / 2 - root[side][0])
    heading = 0.5 * (inward + to_centre) + rng.normal(0.0, 0.35)
    return np.array(root[side], float), float(heading)


def make_tree(rng: np.random.Generator, tries: int = 50) -> list[Vessel]:
    """A coronary-like tree, the main vessel first.

    Trees are redrawn (at most ``tries`` times) until their lumen area is 3.5-8.5 % of the
    image, which gives masks of about 3-7 % at 512x512 once clipped to the field of view.
    """
    for _ in range(tries):
        root, heading = _root_and_heading(rng)
        vessels: list[Vessel] = []
        radius = rng.uniform(5.0, 7.0)
        _grow_tree(rng, root, heading, radius, rng.uniform(350, 500), 0, 0.0, 0.0, vessels)
        area = sum(2 * float(np.sum(v.radii)) * _STEP for v in vessels) / REF_SIZE**2
        if 0.035 < area < 0.085:
            break
    return vessels


def _smooth_curve(
    rng: np.random.Generator, start: NDArray, angle: float, bend: float, jitter: float
) -> NDArray:
    """A gently bending curve from ``start`` until it leaves the image (at most 400 steps)."""
    points = [np.asarray(start, float)]
    pos = points[0]
    while -10 < pos[0] < REF_SIZE + 10 and -10 < pos[1] < REF_SIZE + 10 and len(points) < 400:
        bend = 0.95 * bend + rng.normal(0.0, jitter)
        angle += bend * _STEP
        pos = pos + _STEP * np.array([np.cos(angle), np.sin(angle)])
        points.append(pos)
    return np.array(points)


def _make_devices(rng: np.random.Generator, root: NDArray, heading: float) -> list[Device]:
    """The catheter (from the ostium back out of the image, opposite to the vessel's heading)
    and 0-2 thin ECG lead wires crossing the field of view."""
    catheter = _smooth_curve(rng, root, heading + np.pi + rng.normal(0.0, 0.5), 0.0, 0.0008)
    devices = [Device(catheter, rng.uniform(2.3, 3.2), _MU_CATHETER, True)]
    for _ in range(rng.choice(3, p=[0.5, 0.3, 0.2])):
        start = rng.uniform(0.0, REF_SIZE, 2)
        angle = rng.uniform(0.0, 2 * np.pi)
        both_ways = [_smooth_curve(rng, start, angle + turn, 0.0, 0.0003) for turn in (0, np.pi)]
        wire = np.concatenate([both_ways[1][::-1], both_ways[0][1:]])
        devices.append(Device(wire, rng.uniform(0.7, 1.2), 0.3, False))
    return devices


# --------------------------------------------------------------------------- anatomy


def _make_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw the background parameters of a patient."""
    grid = 64
    coarse = ndimage.zoom(rng.normal(0.0, 1.0, (6, 6)), grid / 6, order=3)
    fine = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (grid, grid)), 0.8)
    field = (0.1 * coarse / coarse.std() + 0.02 * fine / fine.std()).astype(np.float32)
    heart = (
        rng.uniform(0.4, 0.75) * REF_SIZE,
        rng.uniform(0.45, 0.8) * REF_SIZE,
        rng.uniform(0.3, 0.5) * REF_SIZE,
        rng.uniform(0.25, 0.4) * REF_SIZE,
        rng.uniform(-0.6, 0.6),
        rng.uniform(0.2, 0.4),
    )
    diaphragm = None
    if rng.random() < 0.6:
        diaphragm = (
            rng.uniform(0.6, 1.0) * REF_SIZE,
            rng.uniform(-1.5, -0.4) / REF_SIZE,
            rng.uniform(-0.4, 0.4),
            rng.uniform(0.2, 0.45),
        )
    k = int(rng.integers(2, 6))
    ribs = np.column_stack(
        [
            np.sort(rng.uniform(-0.3, 1.0, k)) * REF_SIZE,
            rng.uniform(0.3, 1.2, k) / REF_SIZE,
            rng.uniform(-0.5, 0.1, k),
            rng.uniform(12.0, 22.0, k),
            rng.uniform(0.04, 0.09, k),
        ]
    )
    spine = None
    if rng.random() < 0.6:
        spine = (
            rng.uniform(0.75, 1.05) * REF_SIZE,
            rng.uniform(35.0, 50.0),
            rng.uniform(55.0, 75.0),
            rng.uniform(0.0, 80.0),
            rng.uniform(0.15, 0.3),
        )
    return Anatomy(field, heart, diaphragm, ribs, spine)


def make_patient(rng: np.random.Generator) -> Patient:
    """Draw a patient: coronary tree, catheter and wires, anatomy."""
    vessels = make_tree(rng)
    main = vessels[0]
    heading = float(np.arctan2(*(main.points[1] - main.points[0])[::-1]))
    devices = _make_devices(rng, main.points[0], heading)
    centre = np.mean(np.concatenate([v.points for v in vessels]), axis=0)
    return Patient(vessels, devices, _make_anatomy(rng), centre)


def _sigmoid(x: NDArray) -> NDArray:
    """Smooth step from 0 to 1 (float32 friendly)."""
    return 0.5 + 0.5 * np.tanh(x)


def _anatomy_attenuation(anat: Anatomy, x: NDArray, y: NDArray) -> NDArray:
    """Background attenuation at reference coordinates ``x``, ``y`` (2-D float32 grids)."""
    grid = anat.field.shape[0]
    coords = np.stack([y * ((grid - 1) / REF_SIZE), x * ((grid - 1) / REF_SIZE)])
    att = ndimage.map_coordinates(anat.field, coords, order=1, mode="nearest")
    cx, cy, ax, ay, angle, strength = anat.heart
    c, s = float(np.cos(angle)), float(np.sin(angle))
    u, v = (x - cx) * c + (y - cy) * s, (y - cy) * c - (x - cx) * s
    rho = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
    att += strength * _sigmoid((1.0 - rho) * 6.0)
    if anat.diaphragm is not None:
        y0, curv, tilt, strength = anat.diaphragm
        line = y0 + curv * (x - REF_SIZE / 2) ** 2 + tilt * (x - REF_SIZE / 2)
        att += strength * _sigmoid((y - line) / 6.0)
    for y0, curv, tilt, half, strength in anat.ribs.tolist():
        off = np.abs(y - (y0 + curv * (x - REF_SIZE / 3) ** 2 + tilt * x)) / half
        band = _sigmoid((1.0 - off) * 4.0)
        att += strength * (band + 0.4 * np.exp(-(((off - 0.9) * 4.0) ** 2)))
    if anat.spine is not None:
        x0, half, period, phase, strength = anat.spine
        column = _sigmoid((1.0 - np.abs(x - x0 - 0.05 * y) / half) * 5.0)
        discs = np.cos(np.pi * (y - phase) / period) ** 16
        att += strength * column * (1.0 - 0.6 * discs)
    return att


# --------------------------------------------------------------------------- rendering


def _render_tube(
    points: NDArray, radii: NDArray, weight: NDArray, shape: tuple[int, int]
) -> tuple[NDArray, NDArray, tuple[slice, slice]] | None:
    """Contrast path length (pixels) and lumen mask of one tube, within its bounding box.

    ``points``/``radii`` are in output pixels, ``weight`` scales the contrast.  All segments
    are evaluated at once, each in its own bounding box (padded to a common size); within the
    tube the maximum over segments is kept, so that joints are not counted twice.
    Returns ``(path_length * weight, mask, box)`` or ``None`` when the tube is off the image.
    """
    a, b = points[:-1], points[1:]
    reach = np.maximum(radii[:-1], radii[1:])[:, None] + 1.0
    lo = np.floor(np.minimum(a, b) - reach).astype(int)
    box_w, box_h = (np.ceil(np.maximum(a, b) + reach).astype(int) + 2 - lo).max(axis=0)
    x = (lo[:, 0, None, None] + np.arange(box_w)[None, None, :]).astype(np.float32)
    y = (lo[:, 1, None, None] + np.arange(box_h)[None, :, None]).astype(np.float32)
    u = (b - a)[:, :, None, None]
    dx, dy = x - a[:, 0, None, None], y - a[:, 1, None, None]
    length2 = np.maximum(u[:, 0] ** 2 + u[:, 1] ** 2, 1e-9)
    t = np.clip((dx * u[:, 0] + dy * u[:, 1]) / length2, 0.0, 1.0)
    d = np.hypot(dx - t * u[:, 0], dy - t * u[:, 1])
    r = radii[:-1, None, None] + t * np.diff(radii)[:, None, None]
    w = weight[:-1, None, None] + t * np.diff(weight)[:, None, None]
    inner = np.minimum(d, np.maximum(r - 0.5, 0.0))
    cover = np.clip(r + 0.5 - d, 0.0, 1.0)
    thick = 2.0 * np.sqrt(np.maximum(r * r - inner * inner, 0.0)) * cover * w
    inside = (d <= np.maximum(r, 0.5)) & (w >= 0.5)
    xi, yi = np.broadcast_to(x, d.shape), np.broadcast_to(y, d.shape)
    keep = ((thick > 0) | inside) & (xi >= 0) & (xi < shape[1]) & (yi >= 0) & (yi < shape[0])
    if not keep.any():
        return None
    xi, yi = xi[keep].astype(int), yi[keep].astype(int)
    x0, y0 = xi.min(), yi.min()
    box_shape = (yi.max() - y0 + 1, xi.max() - x0 + 1)
    flat = (yi - y0) * box_shape[1] + (xi - x0)
    path = np.zeros(box_shape[0] * box_shape[1], np.float32)
    np.maximum.at(path, flat, thick[keep].astype(np.float32))
    lumen = np.zeros(path.shape, bool)
    lumen[flat[inside[keep]]] = True
    box = (slice(y0, y0 + box_shape[0]), slice(x0, x0 + box_shape[1]))
    return path.reshape(box_shape), lumen.reshape(box_shape), box


def _decimate(points: NDArray, *arrays: NDArray, step: int) -> list[NDArray]:
    """Keep every ``step``-th sample (and the last one) of a centreline and its attributes."""
    keep = np.unique(np.r_[np.arange(0, len(points), step), len(points) - 1])
    return [a[keep] for a in (points, *arrays)]


@dataclass(frozen=True)
class _FramePose:
    """Per-frame changes: cardiac phase, contrast and the global shift/zoom/rotation."""

    phase: float
    wobble: NDArray  # (3, 4): wave vectors kx, ky, phase offset, amplitude
    concentration: float
    front: float  # contrast reaches this path distance from the root (reference pixels)
    shift: NDArray
    zoom: float
    rotation: float

    def deform(self, points: NDArray, centre: NDArray) -> NDArray:
        """Cardiac motion: contraction towards ``centre`` plus a smooth travelling wobble."""
        squeeze = 0.04 * 0.5 * (1.0 - np.cos(self.phase))
        out = points + squeeze * (centre - points)
        for kx, ky, off, amp in self.wobble:
            wave = amp * np.sin(kx * points[:, 0] + ky * points[:, 1] + off + self.phase)
            out = out + wave[:, None] * np.array([ky, -kx]) / np.hypot(kx, ky)
        return out

    def to_pixels(self, points: NDArray, size: int) -> NDArray:
        """Apply the global rigid-zoom motion and scale reference points to output pixels."""
        c, s = np.cos(self.rotation), np.sin(self.rotation)
        rel = points - REF_SIZE / 2
        moved = self.zoom * (rel @ np.array([[c, s], [-s, c]])) + REF_SIZE / 2 + self.shift
        return (moved + 0.5) * (size / REF_SIZE) - 0.5

    def reference_grid(self, size: int) -> tuple[NDArray, NDArray]:
        """Reference coordinates of every output pixel (inverse of :meth:`to_pixels`)."""
        axis = (np.arange(size, dtype=np.float32) + 0.5) * (REF_SIZE / size)
        centred = axis - REF_SIZE / 2
        gx, gy = np.meshgrid(centred - self.shift[0], centred - self.shift[1])
        c, s = np.cos(self.rotation), np.sin(self.rotation)
        x = (c * gx + s * gy) / self.zoom + REF_SIZE / 2
        y = (-s * gx + c * gy) / self.zoom + REF_SIZE / 2
        return x.astype(np.float32), y.astype(np.float32)


def _draw_pose(rng: np.random.Generator, max_dist: float) -> _FramePose:
    """Draw the per-frame changes of a patient."""
    wobble = np.column_stack(
        [
            rng.normal(0.0, 0.008, 3),
            rng.normal(0.0, 0.008, 3),
            rng.uniform(0.0, 2 * np.pi, 3),
            rng.uniform(0.5, 2.0, 3),
        ]
    )
    return _FramePose(
        phase=rng.uniform(0.0, 2 * np.pi),
        wobble=wobble,
        concentration=rng.uniform(0.8, 1.05),
        front=max_dist * min(rng.uniform(0.8, 1.6), 1.2),
        shift=rng.normal(0.0, 3.0, 2),
        zoom=rng.uniform(0.98, 1.02),
        rotation=rng.normal(0.0, 0.01),
    )


def _render_vessels(
    patient: Patient, pose: _FramePose, size: int
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Attenuation of the vessels and devices, and the lumen mask of one frame."""
    scale = size / REF_SIZE
    step = max(1, int(2.5 / (_STEP * scale)))  # keep segments at least ~2.5 output pixels long
    att = np.zeros((size, size), np.float32)
    mask = np.zeros((size, size), bool)
    for v in patient.vessels:
        filled = np.clip((pose.front - v.dist) / 40.0 + 0.5, 0.0, 1.0)
        pts = pose.to_pixels(pose.deform(v.points, patient.heart_centre), size)
        radii = v.radii * (scale * pose.zoom)
        pts, radii, weight = _decimate(pts, radii, v.weight * filled, step=step)
        tube = _render_tube(pts, radii, weight, (size, size))
        if tube is not None:
            path, lumen, box = tube
            att[box] += (_MU_VESSEL * pose.concentration / scale) * path
            mask[box] |= lumen
    for dev in patient.devices:
        pts = pose.deform(dev.points, patient.heart_centre) if dev.beats else dev.points
        pts, radii = _decimate(
            pose.to_pixels(pts, size), np.full(len(pts), dev.radius * scale), step=step
        )
        tube = _render_tube(pts, radii, np.ones(len(pts)), (size, size))
        if tube is not None:
            path, _, box = tube
            att[box] += (dev.mu / scale) * path
    return att, mask


def _collimator(rng: np.random.Generator, size: int) -> NDArray[np.float32]:
    """Extra attenuation of collimator blades (none in about half of the images)."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    x, y = np.meshgrid(axis, axis)
    kind = rng.choice(["none", "corners", "round", "shutter"], p=[0.45, 0.25, 0.15, 0.15])
    edge = 0.004
    if kind == "corners":
        cut = rng.uniform(0.8, 0.92)  # corners beyond |x| + |y| > cut are covered
        inside = cut - np.abs(x) - np.abs(y)
    elif kind == "round":
        inside = rng.uniform(0.58, 0.68) - np.hypot(x, y)
    elif kind == "shutter":
        inside = rng.uniform(0.4, 0.47) - np.abs(x if rng.random() < 0.5 else y)
    else:
        return np.zeros((size, size), np.float32)
    return (rng.uniform(1.0, 1.6) * _sigmoid(-inside / edge)).astype(np.float32)


def _detector(
    rng: np.random.Generator, attenuation: NDArray, size: int,
    noise: np.random.Generator | None = None,
) -> NDArray[np.float64]:
    """Vignetting, quantum noise, blur, electronic noise and edge enhancement.

    The settings come from ``rng``, the noise from ``noise`` (default ``rng``).
    Returns the 12-bit detector values (float).
    """
    noise = noise or rng
    scale = size / REF_SIZE
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    rho2 = axis[None, :] ** 2 + axis[:, None] ** 2
    flux = np.exp(-attenuation) * (1.0 - rng.uniform(0.3, 0.6) * rho2)
    photons = rng.uniform(200.0, 400.0) / scale**2  # per pixel for unattenuated flux
    flux = noise.poisson(flux * photons) / photons
    flux = ndimage.gaussian_filter(flux, 0.6 * max(scale, 0.5))
    flux += noise.normal(0.0, 0.004, flux.shape)
    # edge enhancement (unsharp masking), as in the image processing of angiography systems
    flux += rng.uniform(0.3, 0.8) * (flux - ndimage.gaussian_filter(flux, 6.0 * scale))
    return np.clip(flux * (_WHITE * DETECTOR_MAX), 0, DETECTOR_MAX)


def _quantise(values: NDArray, bits: int) -> NDArray:
    """12-bit detector values to uint8 (0..255) or uint16 (0..65535, full range used)."""
    v12 = np.rint(values).astype(np.uint16)
    if bits == 16:
        return (v12 << 4) | (v12 >> 8)  # bit replication: 4095 -> 65535
    if bits == 8:
        return np.rint(v12 * (255.0 / DETECTOR_MAX)).astype(np.uint8)
    raise ValueError(f"bits must be 8 or 16, not {bits}")


def render_frame(
    patient: Patient, rng: np.random.Generator, size: int, bits: int = 8
) -> tuple[NDArray, NDArray[np.bool_]]:
    """Render one frame of ``patient``: ``(image uint8/uint16 (size, size), mask bool)``."""
    values, mask = _expose(patient, _draw_pose(rng, _max_dist(patient)), rng, size)
    return _quantise(values, bits), mask


def _max_dist(patient: Patient) -> float:
    """Path length from the root of the tree to its farthest vessel end (reference pixels)."""
    return max(float(v.dist[-1]) for v in patient.vessels)


def _expose(
    patient: Patient, pose: _FramePose, rng: np.random.Generator, size: int,
    noise: np.random.Generator | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """12-bit detector values and lumen mask of ``patient`` in ``pose``; the collimator and
    the detector settings come from ``rng``, the noise from ``noise`` (default ``rng``)."""
    x, y = pose.reference_grid(size)
    attenuation = _anatomy_attenuation(patient.anatomy, x, y)
    vessels, mask = _render_vessels(patient, pose, size)
    attenuation += vessels + _collimator(rng, size)
    return _detector(rng, attenuation, size, noise), mask


def synth_angiogram(
    rng: np.random.Generator, size: int = 512, bits: int = 8
) -> tuple[NDArray, NDArray[np.bool_]]:
    """One synthetic angiogram of a new random patient: ``(image, mask)``."""
    return render_frame(make_patient(rng), rng, size, bits)


# --------------------------------------------------------------------------- data sets


def patient_rng(seed: int, patient: int) -> np.random.Generator:
    """Random generator of patient number ``patient``."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0, patient]))


def image_rng(seed: int, index: int) -> np.random.Generator:
    """Random generator of image number ``index`` (its frame-level changes)."""
    return np.random.default_rng(np.random.SeedSequence([seed, 1, index]))


def image_name(index: int) -> str:
    """File name of image ``index``."""
    return f"syn{index:04d}.png"


def patient_name(patient: int) -> str:
    """Identifier of patient ``patient``."""
    return f"synp{patient:03d}"


def spacing_mm(size: int) -> float:
    """Pixel spacing of an image of ``size`` pixels covering the reference field of view."""
    return round(REF_SPACING_MM * REF_SIZE / size, 6)


def _write_patient(
    out: Path, seed: int, patient: int, indices: range, size: int, bits: int
) -> None:
    """Render and save the frames ``indices`` of one patient."""
    subject = make_patient(patient_rng(seed, patient))
    for index in indices:
        image, mask = render_frame(subject, image_rng(seed, index), size, bits)
        Image.fromarray(image).save(out / "images" / image_name(index))
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / image_name(index))


_OUTPUTS = ("images", "masks", "meta.csv", "cine.csv")  # what generate* write into a folder
_META_HEADER = ["image", "patient", "spacing_mm"]


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder without ``overwrite``; with it,
    one whose ``images/`` or ``masks/`` hold a file that its ``meta.csv`` does not list (a file
    of the user's, which replacing the folder would delete)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; use overwrite (--overwrite)")
    if overwrite:
        written = _listed_images(out / "meta.csv")
        for name in ("images", "masks"):
            check_only(out / name, written, "the folder")


def _listed_images(meta: Path) -> set[str]:
    """The image names an earlier synthetic set's ``meta.csv`` lists (none if it has none)."""
    try:
        with meta.open(newline="") as f:
            return {row["image"] for row in csv.DictReader(f) if row.get("image")}
    except (OSError, KeyError, UnicodeDecodeError, csv.Error):
        return set()


def _write_set(
    out: Path, folders: tuple[str, ...], work, args: list[tuple], workers: int,
    tables: dict[str, tuple[list[str], list]],
) -> None:
    """Run ``work(tmp, *a)`` for each ``a`` of ``args`` (in ``workers`` processes) in a
    temporary sibling folder ``tmp`` of ``out`` holding ``folders``, write the CSV ``tables``
    (file name -> header, rows) there, then move it all into ``out``, replacing every earlier
    output of this module (:data:`_OUTPUTS`) and nothing else."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp_name:
        tmp = Path(tmp_name)
        for name in folders:
            (tmp / name).mkdir()
        if workers == 1:
            for a in args:
                work(tmp, *a)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                list(pool.map(work, [tmp] * len(args), *zip(*args)))
        for name, (header, rows) in tables.items():
            with open(tmp / name, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(rows)
        out.mkdir(parents=True, exist_ok=True)
        for name in _OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            if (tmp / name).exists():
                (tmp / name).replace(target)


def generate(
    out: str | Path,
    count: int,
    size: int,
    seed: int,
    bits: int = 8,
    frames_per_patient: int = 4,
    workers: int = 1,
    overwrite: bool = False,
) -> list[tuple[str, str, float]]:
    """Write ``count`` images, masks and ``meta.csv`` into ``out``; return the meta rows.

    Frames ``i`` belong to patient ``i // frames_per_patient``.  Everything is written into a
    temporary sibling folder first and moved into ``out`` at the end.  A non-empty ``out`` is
    refused unless ``overwrite``, which replaces its ``images/``, ``masks/`` and ``meta.csv``
    (and the ``cine.csv`` of :func:`generate_cine`).
    """
    out = Path(out)
    if count < 1 or size < 16 or frames_per_patient < 1 or workers < 1:
        raise ValueError("count, frames_per_patient and workers must be >= 1 and size >= 16")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, not {bits}")
    _check_out(out, overwrite)
    n_patients = -(-count // frames_per_patient)
    jobs = [
        range(p * frames_per_patient, min((p + 1) * frames_per_patient, count))
        for p in range(n_patients)
    ]
    rows = [
        (image_name(i), patient_name(i // frames_per_patient), spacing_mm(size))
        for i in range(count)
    ]
    args = [(seed, p, job, size, bits) for p, job in enumerate(jobs)]
    _write_set(out, ("images", "masks"), _write_patient, args, workers,
               {"meta.csv": (_META_HEADER, rows)})
    return rows


# --------------------------------------------------------------------------- cine loops

CINE_FPS = 15.0
"""Frame rate of the synthetic cine loops (frames per second)."""
CONTRAST_PHASE = 0.5
"""A frame of a cine loop is in the contrast phase when its concentration is at least this
fraction of the loop's peak (the bolus curve's full width at half maximum)."""


def cine_name(loop: int) -> str:
    """File name of cine loop ``loop``."""
    return f"cine{loop:04d}.dcm"


def bolus_curve(rng: np.random.Generator, frames: int) -> NDArray[np.float64]:
    """Contrast concentration of each frame of a loop, peak 1: a gamma variate
    ``x^a exp(a (1 - x))`` with ``x = (t - arrival) / time_to_peak``.  The contrast arrives
    after 10-25 % of the loop, peaks 15-25 % of the loop later and washes out slowly; the
    first frames hold no contrast and the last ones little."""
    arrival = rng.uniform(0.1, 0.25) * frames
    to_peak = rng.uniform(0.15, 0.25) * frames
    alpha = rng.uniform(2.5, 4.0)
    x = np.maximum(np.arange(frames) - arrival, 0.0) / to_peak
    return x**alpha * np.exp(alpha * (1.0 - x))


def _loop_rng(seed: int, loop: int, *more: int) -> np.random.Generator:
    """Random generator of cine loop ``loop``: 2 = its bolus and heart rate, 3 = its fixed
    pose, collimator and detector settings, (4, frame) = a frame's noise."""
    return np.random.default_rng(np.random.SeedSequence([seed, *more, loop]))


def _cine_curve(seed: int, loop: int, frames: int) -> tuple[NDArray, float]:
    """Bolus curve and cardiac period (frames) of cine loop ``loop``."""
    rng = _loop_rng(seed, loop, 2)
    curve = bolus_curve(rng, frames)
    return curve, CINE_FPS * 60.0 / rng.uniform(60.0, 90.0)


def render_loop(
    patient: Patient, seed: int, loop: int, frames: int, size: int
) -> NDArray[np.uint16]:
    """The frames of cine loop ``loop`` of ``patient``: 12-bit detector values, uint16
    ``(frames, size, size)``.  The pose, collimator and detector settings stay fixed over
    the loop; the cardiac phase advances, the contrast follows :func:`bolus_curve` (and fills
    the tree from its root as it arrives) and the noise changes every frame."""
    curve, period = _cine_curve(seed, loop, frames)
    max_dist = _max_dist(patient)
    filling = np.clip(np.cumsum(curve) / max(curve.sum(), 1e-9) * 4.0, 0.0, 1.0)
    stack = np.empty((frames, size, size), np.uint16)
    for f in range(frames):
        fixed = _loop_rng(seed, loop, 3)  # the same settings for every frame
        pose = _draw_pose(fixed, max_dist)
        pose = replace(pose, phase=pose.phase + 2 * np.pi * f / period,
                       concentration=float(curve[f]), front=1.2 * max_dist * float(filling[f]))
        values, _ = _expose(patient, pose, fixed, size, noise=_loop_rng(seed, loop, 4, f))
        stack[f] = np.rint(values).astype(np.uint16)
    return stack


def write_cine_dicom(
    path: Path, stack: NDArray[np.uint16], patient_id: str, spacing: float, uid: str
) -> None:
    """Save ``stack`` (12-bit values) as a multi-frame X-ray angiography DICOM file."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, XRayAngiographicImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = XRayAngiographicImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid, "series"])
    ds.Modality, ds.PatientID = "XA", patient_id
    ds.NumberOfFrames, ds.FrameTime, ds.CineRate = len(stack), 1000.0 / CINE_FPS, int(CINE_FPS)
    ds.Rows, ds.Columns = stack.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelData = np.ascontiguousarray(stack, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _write_loop(out: Path, seed: int, loop: int, patient: int, frames: int, size: int) -> None:
    """Render and save cine loop ``loop`` of patient ``patient``."""
    stack = render_loop(make_patient(patient_rng(seed, patient)), seed, loop, frames, size)
    write_cine_dicom(out / "images" / cine_name(loop), stack, patient_name(patient),
                     spacing_mm(size), f"cmunet-synth:{seed}:{loop}")


def generate_cine(
    out: str | Path,
    loops: int,
    frames: int,
    size: int,
    seed: int,
    loops_per_patient: int = 2,
    workers: int = 1,
    overwrite: bool = False,
) -> list[tuple[str, int, float, int]]:
    """Write ``loops`` cine loops of ``frames`` frames (``images/cineNNNN.dcm``, multi-frame
    XA DICOM with the PatientID ``synpNNN``), ``meta.csv`` and the ground truth ``cine.csv``
    (image, frame, concentration, contrast_phase: 1 where the concentration is at least
    :data:`CONTRAST_PHASE` of the peak) into ``out``; return the ``cine.csv`` rows.  Loop
    ``l`` belongs to patient ``l // loops_per_patient``, whose tree it shares with the images
    of :func:`generate`.  Written and replaced as by :func:`generate`; no masks."""
    out = Path(out)
    if loops < 1 or frames < 2 or size < 16 or loops_per_patient < 1 or workers < 1:
        raise ValueError("loops, loops_per_patient and workers must be >= 1, frames >= 2 and "
                         "size >= 16")
    _check_out(out, overwrite)
    truth = []
    for loop in range(loops):
        curve = _cine_curve(seed, loop, frames)[0]
        truth += [(cine_name(loop), f, round(float(c), 4), int(c >= CONTRAST_PHASE))
                  for f, c in enumerate(curve)]
    meta = [(cine_name(i), patient_name(i // loops_per_patient), spacing_mm(size))
            for i in range(loops)]
    args = [(seed, i, i // loops_per_patient, frames, size) for i in range(loops)]
    _write_set(out, ("images",), _write_loop, args, workers, {
        "meta.csv": (_META_HEADER, meta),
        "cine.csv": (["image", "frame", "concentration", "contrast_phase"], truth)})
    return truth


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``cmunet-synth`` (``tools/synth.py``)."""
    parser = argparse.ArgumentParser(
        description=(
            "Write synthetic X-ray coronary angiograms with exact vessel masks: "
            "DIR/images/synNNNN.png, DIR/masks/synNNNN.png (0/255) and DIR/meta.csv "
            "(image,patient,spacing_mm), or with --cine cine loops (multi-frame DICOM). "
            "Frames of one synthetic patient share the vessel tree. "
            "The same arguments give byte-identical files, whatever --workers."
        ),
    )
    add = parser.add_argument
    add("--out", required=True, type=Path, metavar="DIR", help="output folder")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--count", type=int, metavar="N", help="number of images")
    what.add_argument(
        "--cine", type=int, metavar="N",
        help="write N cine loops instead: DIR/images/cineNNNN.dcm (multi-frame XA DICOM, 12 "
             "bits, no masks) whose contrast arrives, peaks and washes out, DIR/meta.csv and "
             "DIR/cine.csv (image,frame,concentration,contrast_phase: the ground truth)",
    )
    add("--size", type=int, default=512, metavar="S", help="image side in pixels (default 512)")
    add("--seed", type=int, default=0, metavar="K", help="random seed (default 0)")
    add(
        "--bits", type=int, choices=(8, 16), default=8,
        help="PNG bit depth: 8, or 16 (12-bit detector values scaled to 0..65535); default 8",
    )
    add(
        "--frames-per-patient", type=int, default=4, metavar="F",
        help="frames per synthetic patient; the last one may have fewer (default 4)",
    )
    add("--frames", type=int, default=40, metavar="F", help="frames per cine loop (default 40)")
    add(
        "--loops-per-patient", type=int, default=2, metavar="L",
        help="cine loops per synthetic patient (default 2)",
    )
    add("--workers", type=int, default=1, metavar="W", help="worker processes (default 1)")
    add(
        "--overwrite", action="store_true",
        help="replace images/, masks/, meta.csv and cine.csv of a non-empty DIR instead of "
             "refusing",
    )
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run the command line (``parser``, default :func:`build_parser`); print a one-line
    summary; return the exit status."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.cine is not None:
            rows = generate_cine(
                args.out, args.cine, args.frames, args.size, args.seed,
                loops_per_patient=args.loops_per_patient, workers=args.workers,
                overwrite=args.overwrite,
            )
            what = f"{args.cine} cine loops of {args.frames} frames ({len(rows)} frames)"
            patients = -(-args.cine // args.loops_per_patient)
            depth = "12-bit DICOM"
        else:
            rows = generate(
                args.out, args.count, args.size, args.seed, bits=args.bits,
                frames_per_patient=args.frames_per_patient, workers=args.workers,
                overwrite=args.overwrite,
            )
            what, depth = f"{len(rows)} images", f"{args.bits}-bit"
            patients = len({row[1] for row in rows})
    except (FileExistsError, ValueError) as err:
        parser.error(str(err))
    print(
        f"synth: wrote {what} of {patients} patients, {args.size}x{args.size} "
        f"{depth}, to {args.out} in {time.perf_counter() - start:.1f} s"
    )
    return 0
