"""The synthetic brain of :mod:`mslpipe.synth`: anatomy (white and grey matter, folded cortex, ventricles, deep grey
matter), its FLAIR-like rendering (partial volume, bias field, noise, a random global scale), and the ellipsoid
geometry lesions share with it. Deterministic for a given random generator; no project imports above the bottom floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

# Labels of the anatomy and their FLAIR-like intensities relative to white matter.
BG, WM, GM, DGM, VENT, SULC = range(6)
INTENSITY = np.array([0.0, 1.0, 1.25, 1.12, 0.18, 0.3], dtype=np.float32)


@dataclass
class Anatomy:
    labels: np.ndarray  # uint8, one of the BG.. labels per voxel
    centre: np.ndarray
    radii: np.ndarray
    ventricles: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (centre, radii, axes)
    affine: np.ndarray
    rmean: float  # mean brain radius, voxels: sizes scale with it


# ---------------------------------------------------------------------------- geometry helpers
def frame(first: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Orthonormal rows, the first along ``first``, the others at a random angle around it."""
    a = first / np.linalg.norm(first)
    b = np.cross(a, rng.standard_normal(3))
    b /= np.linalg.norm(b)
    return np.stack([a, b, np.cross(a, b)])


def axis_values(values: np.ndarray, k: int) -> np.ndarray:
    """``values`` as a 3D array along axis ``k``, for broadcasting."""
    return values.reshape([-1 if j == k else 1 for j in range(3)])


def surface_field(p, dist, wavenumber: float, rng: np.random.Generator, n_waves: int = 10):
    """A smooth random field of unit variance that depends only on the direction of ``p``."""
    field = np.zeros_like(dist)
    for _ in range(n_waves):
        k = frame(rng.standard_normal(3), rng)[0] * wavenumber * rng.uniform(0.8, 1.25)
        field += np.sin((k[0] * p[0] + k[1] * p[1] + k[2] * p[2]) / dist + rng.uniform(0, 2 * np.pi))
    return field / np.float32(np.sqrt(n_waves / 2))


def ellipsoid(shape, centre, radii, axes, reach: float):
    """Normalised ellipsoid distance (1 on the surface) in the box reaching ``reach`` × the
    longest radius. Returns (slices, d, clipped) or None when the box is outside the volume."""
    half = reach * float(np.max(radii)) + 1.0
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    clipped = bool(np.any(centre - half < 0) or np.any(centre + half + 1 > np.asarray(shape)))
    rel = [axis_values(np.arange(lo[k], hi[k], dtype=np.float32) - np.float32(centre[k]), k) for k in range(3)]
    d2 = np.zeros(tuple(hi - lo), dtype=np.float32)
    for k in range(3):
        ax = axes[k].astype(np.float32)
        d2 += ((rel[0] * ax[0] + rel[1] * ax[1] + rel[2] * ax[2]) / np.float32(radii[k])) ** 2
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), np.sqrt(d2), clipped


def smoothstep_profile(d: np.ndarray, support: float) -> np.ndarray:
    """1 in the core, exactly 0.5 at d = 1, 0 from d = ``support`` on: a lesion's soft edge."""
    t = np.clip((support - d) / np.float32(2 * (support - 1.0)), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# ---------------------------------------------------------------------------- anatomy
def make_anatomy(shape: tuple[int, int, int], rng: np.random.Generator) -> Anatomy:
    shp = np.asarray(shape, dtype=float)
    centre = (shp - 1) / 2 + rng.uniform(-0.03, 0.03, 3) * shp
    radii = shp * 0.40 * rng.uniform(0.9, 1.0, 3)
    rmean = float(radii.mean())
    coords = [axis_values(np.arange(n, dtype=np.float32) - np.float32(c), k)
              for k, (n, c) in enumerate(zip(shape, centre, strict=True))]
    r = np.sqrt(sum((c / np.float32(rad)) ** 2 for c, rad in zip(coords, radii, strict=True)))
    labels = np.where(r < 1.0, WM, BG).astype(np.uint8)

    # Folded cortex: a grey ribbon under the surface, folded in along sulci. Sulci are the zero
    # set of a random field over the surface direction (so they run radially), with a thin CSF
    # line in the middle, each as deep as a second random field says.
    thick = max(1.0, 0.045 * rmean)
    fold = max(1.5, 0.16 * rmean)
    shell = (r < 1.0) & (r > 1.0 - (thick + fold + 1.0) / radii.min())
    idx = np.nonzero(shell)
    p = [coords[k].ravel()[idx[k]] for k in range(3)]
    dist = np.maximum(np.sqrt(p[0] ** 2 + p[1] ** 2 + p[2] ** 2), 1e-3)
    rr = np.maximum(r[idx], 1e-3)
    depth = dist * (1.0 - rr) / rr
    wavenumber = 2 * np.pi / 0.3  # per radian over the surface: a fold every ~17 degrees
    line = np.abs(surface_field(p, dist, wavenumber, rng)) * dist / (0.8 * wavenumber)  # ~ mm to a sulcus
    sulcus_depth = fold * np.clip(0.6 + 0.5 * surface_field(p, dist, wavenumber / 2, rng), 0.2, 1.0)
    tissue = np.full(dist.shape, WM, dtype=np.uint8)
    tissue[(depth < thick) | ((line < thick + 0.5) & (depth < sulcus_depth + thick))] = GM
    tissue[(line < 0.5) & (depth < sulcus_depth)] = SULC
    labels[idx] = tissue

    # Interhemispheric fissure: grey matter sheet with CSF in the middle, above the ventricles.
    x = coords[0]
    y_rel, z_rel = coords[1] / np.float32(radii[1]), coords[2] / np.float32(radii[2])
    zone = (r < 1.0) & (r > 0.45) & ((z_rel > 0.05) | (np.abs(y_rel) > 0.55))
    labels[zone & (np.abs(x) < thick + 0.5)] = GM
    labels[zone & (np.abs(x) < 0.5)] = SULC

    # Deep grey matter (basal ganglia / thalami), then the lateral ventricles: two tilted,
    # AP-elongated ellipsoids that make the butterfly seen on coronal slices.
    for side in (-1, 1):
        c = centre + np.array([side * 0.24, 0.02, -0.14]) * radii
        res = ellipsoid(shape, c, np.array([0.12, 0.22, 0.15]) * radii, np.eye(3), 1.0)
        if res is not None:
            sl, d, _ = res
            labels[sl][(d <= 1.0) & (labels[sl] != BG)] = DGM
    size = rng.uniform(0.8, 1.3)
    ventricles = []
    for side in (-1, 1):
        c = centre + np.array([side * 0.09, -0.04, 0.06]) * radii
        vr = np.array([0.4 * radii[1], 0.2 * radii[2], 0.09 * radii[0]]) * size
        vr = np.maximum(vr, [2.0, 1.5, 1.0])
        sin, cos = np.sin(side * 0.6), np.cos(side * 0.6)  # tops lean outward
        axes = np.array([[0.0, 1.0, 0.0], [sin, 0.0, cos], [cos, 0.0, -sin]])
        res = ellipsoid(shape, c, vr, axes, 1.0)
        if res is not None:
            sl, d, _ = res
            labels[sl][d <= 1.0] = VENT
        ventricles.append((c, vr, axes))

    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [centre[0], -centre[1], -centre[2]] + rng.uniform(-10, 10, 3)
    return Anatomy(labels, centre, radii, ventricles, affine, rmean)


def bias_field(shape, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field: exp of a random quadratic, about ±25 % over the brain."""
    u = [axis_values(np.linspace(-1, 1, n, dtype=np.float32), k) for k, n in enumerate(shape)]
    terms = [u[0], u[1], u[2], u[0] * u[1], u[0] * u[2], u[1] * u[2], u[0] ** 2, u[1] ** 2, u[2] ** 2]
    coef = rng.normal(0.0, 0.12, len(terms)).astype(np.float32)
    log_field = np.broadcast_to(sum(c * t for c, t in zip(coef, terms, strict=True)), shape)
    log_field = log_field - np.float32(log_field.mean())
    return np.exp(np.clip(log_field, -0.4, 0.4))


def render_image(anat: Anatomy, boost: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    lut = INTENSITY.copy()
    lut[GM] *= np.float32(rng.uniform(0.95, 1.05))  # per-scan grey/white contrast
    brain = anat.labels != BG
    tissue = ndi.gaussian_filter(lut[anat.labels], sigma=0.6)  # partial volume at tissue borders
    noise_sd = float(rng.uniform(0.03, 0.05))
    scale = float(rng.uniform(50.0, 400.0))
    image = tissue * (1.0 + boost) * bias_field(anat.labels.shape, rng)
    image += np.float32(noise_sd) * rng.standard_normal(image.shape, dtype=np.float32)
    image *= np.float32(scale)
    np.maximum(image, 0.0, out=image)
    image[~brain] = 0.0
    return image, {"scale": round(scale, 4), "noise_sd": round(noise_sd * scale, 4)}
