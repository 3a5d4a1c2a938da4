"""H&E stain normalisation of tile batches in PyTorch: Macenko and Reinhard, one fit/transform API.

Both are written here rather than taken from torchstain or TIAToolbox: those normalise one tile
per call (an eigen-decomposition, two percentiles and a least-squares solve each), which is the
per-tile loop a slide of thousands of tiles cannot afford. Here every step is batched over the
tiles (`torch.linalg.eigh` and `pinv` on stacks of matrices, percentiles by sorting with
invalid pixels pushed to the end), so a batch costs a few tensor operations; the numbers follow
Macenko et al. 2009 and Reinhard et al. 2001 as torchstain implements them (tested against it).

A fitted normaliser is saved as JSON (`to_dict` / `normaliser_from_dict`), so a cohort reference
is fitted once and every slide job applies the same one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mgi.errors import ConfigError, SlideError
from mgi.io import atomic_path

METHODS = ("macenko", "reinhard")
# Macenko's H&E reference (torchstain's defaults), used until a normaliser is fitted
HE_REFERENCE = [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]
MAX_CONC_REFERENCE = [1.9705, 1.0308]
CHUNK_TILES = 8  # tiles normalised per tensor pass


def _as_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float32 tensor in 0..255 from uint8 (N, 3, H, W) or (3, H, W)."""
    return torch.from_numpy(_as_uint8_batch(images).astype(np.float32))


def optical_density(rgb: torch.Tensor, io: float) -> torch.Tensor:
    """-log((I + 1) / io) of RGB values in 0..255, as log(io) - log1p(I) (two passes)."""
    return torch.log1p(rgb).neg_().add_(float(np.log(io)))


def _saturated_od(io: float) -> float:
    """Optical density of a pixel at 1 (clipped black): pixels at or above it are saturated."""
    return float(np.log(io / 2.0)) - 1e-6


def _as_uint8_batch(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (N, 3, H, W) array of `images` (one (3, H, W) image becomes a batch of one)."""
    array = images.numpy() if torch.is_tensor(images) else np.asarray(images)
    array = array[None] if array.ndim == 3 else array
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"expected RGB images shaped (N, 3, H, W), got {array.shape}")
    return np.ascontiguousarray(array, dtype=np.uint8)


def _in_chunks(
    images: np.ndarray | torch.Tensor,
    one_chunk: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    *,
    return_skipped: bool,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Apply `one_chunk` (float (n, 3, H, W) -> (output (n, 3, P), usable (n,))) a few tiles at
    a time, so that each intermediate stays in the CPU cache (about 3x faster than one pass
    over the batch); tiles not usable are returned as they came."""
    original = _as_uint8_batch(images)
    result = np.empty_like(original)
    usable = np.zeros(len(original), dtype=bool)
    for start in range(0, len(original), CHUNK_TILES):
        part = slice(start, start + CHUNK_TILES)
        batch = torch.from_numpy(original[part]).to(torch.float32)
        with torch.no_grad():
            out, ok = one_chunk(batch)
        result[part] = _to_uint8(out.view_as(batch))
        usable[part] = ok.numpy()
    result[~usable] = original[~usable]
    return (result, ~usable) if return_skipped else result


def _to_uint8(batch: torch.Tensor) -> np.ndarray:
    return batch.clamp_(0, 255).round_().to(torch.uint8).numpy()


def _percentile(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-th percentile (linear interpolation, as numpy) of values[valid].

    Only the tail up to the wanted rank is selected (`topk`), not a full sort: Macenko's
    percentiles sit at 1 % and 99 %, so this is a small fraction of each row. Rows without a
    valid value give +-inf.
    """
    count = valid.sum(dim=1)
    position = (count - 1).clamp(min=0).to(values.dtype) * (q / 100.0)
    low = position.floor().long()
    high = torch.minimum(low + 1, (count - 1).clamp(min=0))
    weight = position - low.to(values.dtype)
    ascending = q <= 50
    if ascending:
        ranks_low, ranks_high = low, high
    else:  # count from the top: the rank of the i-th smallest is count - 1 - i
        ranks_low, ranks_high = count - 1 - low, count - 1 - high
    k = int(torch.maximum(ranks_low, ranks_high).max().clamp(min=0)) + 1
    fill = float("inf") if ascending else float("-inf")
    filled = torch.where(valid, values, torch.full_like(values, fill))
    tail = torch.topk(filled, min(k, values.shape[1]), dim=1, largest=not ascending).values
    lo = tail.gather(1, ranks_low.clamp(min=0).unsqueeze(1)).squeeze(1)
    hi = tail.gather(1, ranks_high.clamp(min=0).unsqueeze(1)).squeeze(1)
    out = lo + (hi - lo) * weight
    return torch.where(count > 0, out, torch.full_like(out, fill))


class MacenkoNormaliser:
    """Macenko stain normalisation: stain vectors from optical-density SVD, concentrations rescaled.

    Parameters follow torchstain: `io` (transmitted light intensity), `alpha` (percentile of
    the angle range), `beta` (OD threshold of tissue pixels). A tile whose tissue pixels number
    fewer than `min_tissue` of its pixels (near-empty or saturated) is returned unchanged.
    `estimate_pixels`: pixels per tile used to estimate its stains (see transform).
    """

    method = "macenko"

    def __init__(self, *, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15,
                 min_tissue: float = 0.05, estimate_pixels: int = 8192) -> None:
        self.io, self.alpha, self.beta, self.min_tissue = io, alpha, beta, min_tissue
        self.estimate_pixels = estimate_pixels
        self.stain_matrix_ = torch.tensor(HE_REFERENCE)
        self.max_concentrations_ = torch.tensor(MAX_CONC_REFERENCE)
        self.fitted_ = False

    def _optical_density(self, batch: torch.Tensor) -> torch.Tensor:
        return optical_density(batch.flatten(2), self.io)  # (N, 3, P)

    def _stains(self, od: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (HE (N, 3, 2), max concentrations (N, 2), usable (N,) bool) of OD batches."""
        # tissue: stained in every channel, and not clipped to black (saturated pixels carry no
        # stain ratio)
        tissue = ((od > self.beta) & (od < _saturated_od(self.io))).all(dim=1)  # (N, P)
        n_tissue = tissue.sum(dim=1)
        usable = n_tissue >= max(3, int(self.min_tissue * od.shape[2]))
        weighted = od * tissue.to(od.dtype).unsqueeze(1)
        n = n_tissue.clamp(min=2).to(od.dtype).view(-1, 1, 1)
        mean = weighted.sum(2, keepdim=True) / n
        cov = (weighted @ od.transpose(1, 2) - n * mean @ mean.transpose(1, 2)) / (n - 1)
        _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
        plane = vectors[:, :, 1:3]  # the two largest, (N, 3, 2)
        projected = plane.transpose(1, 2) @ od  # (N, 2, P)
        angle = torch.atan2(projected[:, 1], projected[:, 0])
        low = _percentile(angle, tissue, self.alpha)
        high = _percentile(angle, tissue, 100 - self.alpha)
        v_low = plane @ torch.stack([torch.cos(low), torch.sin(low)], 1).unsqueeze(2)
        v_high = plane @ torch.stack([torch.cos(high), torch.sin(high)], 1).unsqueeze(2)
        # haematoxylin first: the vector with the larger red optical density
        h_first = (v_low[:, 0, 0] > v_high[:, 0, 0]).view(-1, 1, 1)
        he = torch.where(h_first, torch.cat([v_low, v_high], 2), torch.cat([v_high, v_low], 2))
        he = he * torch.where(he[:, :1].sum(1, keepdim=True) < 0, -1.0, 1.0)  # positive OD
        # tiles without enough tissue get the default vectors (their output is discarded)
        he = torch.where(usable.view(-1, 1, 1), he, torch.tensor(HE_REFERENCE, dtype=he.dtype))
        concentrations = torch.linalg.pinv(he) @ od  # (N, 2, P)
        everything = torch.ones_like(concentrations[:, 0], dtype=torch.bool)
        max_c = torch.stack([_percentile(concentrations[:, k], everything, 99) for k in (0, 1)], 1)
        return he, max_c, usable

    def _sample(self, od: torch.Tensor) -> torch.Tensor:
        """A strided subset of at most `estimate_pixels` pixels per tile, for the estimates."""
        stride = max(1, od.shape[2] // self.estimate_pixels)
        return od[:, :, ::stride]

    def fit(self, images: np.ndarray | torch.Tensor) -> MacenkoNormaliser:
        """Fit the reference stain vectors and maximum concentrations on all pixels of `images`."""
        batch = _as_batch(images)
        pooled = batch.permute(1, 0, 2, 3).reshape(1, 3, -1, 1)  # all tiles as one image
        with torch.no_grad():
            he, max_c, usable = self._stains(self._optical_density(pooled))
        if not bool(usable[0]):
            raise SlideError("stain reference: too few tissue pixels to fit Macenko stain vectors")
        self.stain_matrix_, self.max_concentrations_ = he[0], max_c[0]
        self.fitted_ = True
        return self

    def stain_vectors(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Per-image Macenko H&E vectors, (N, 3, 2) (NaN where an image has too little tissue)."""
        with torch.no_grad():
            he, _, usable = self._stains(self._optical_density(_as_batch(images)))
        he[~usable] = float("nan")
        return he.numpy()

    def transform(
        self, images: np.ndarray | torch.Tensor, *, return_skipped: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Normalised uint8 (N, 3, H, W) images; with return_skipped, also the unchanged ones.

        Each tile's stain vectors and maximum concentrations are estimated on a strided subset
        of `estimate_pixels` of its pixels (all of them in a smaller tile); the mapping, one 3x3
        matrix per tile in optical-density space (reference stains x concentration scale x
        pseudo-inverse of the tile's stains), is then applied to every pixel in one product.
        """
        def one_chunk(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            od = self._optical_density(batch)
            he, max_c, ok = self._stains(self._sample(od))
            scale = (self.max_concentrations_ / max_c).unsqueeze(2)  # (n, 2, 1)
            mapping = self.stain_matrix_ @ (scale * torch.linalg.pinv(he))  # (n, 3, 3)
            return torch.bmm(mapping, od).neg_().exp_().mul_(self.io), ok

        return _in_chunks(images, one_chunk, return_skipped=return_skipped)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state: parameters and the fitted reference."""
        return {"method": self.method, "io": self.io, "alpha": self.alpha, "beta": self.beta,
                "min_tissue": self.min_tissue,
                "stain_matrix": self.stain_matrix_.tolist(),
                "max_concentrations": self.max_concentrations_.tolist()}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> MacenkoNormaliser:
        """The normaliser saved by to_dict."""
        norm = cls(io=state["io"], alpha=state["alpha"], beta=state["beta"],
                   min_tissue=state["min_tissue"])
        norm.stain_matrix_ = torch.tensor(state["stain_matrix"], dtype=torch.float32)
        norm.max_concentrations_ = torch.tensor(state["max_concentrations"], dtype=torch.float32)
        norm.fitted_ = True
        return norm


# --- CIE L*a*b* (sRGB, D65) ------------------------------------------------------------------
# By hand: two colour conversions do not justify kornia as a dependency; checked against
# skimage.color.rgb2lab in the tests.
_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])
_WHITE = torch.tensor([0.95047, 1.0, 1.08883]).view(1, 3, 1)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, P) RGB in 0..255 -> CIE L*a*b* (L in 0..100)."""
    c = rgb / 255.0
    linear = torch.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = (_RGB_TO_XYZ @ linear) / _WHITE
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]),
                        200 * (f[:, 1] - f[:, 2])], 1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """(N, 3, P) CIE L*a*b* -> RGB in 0..255 (clipped)."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], 1)
    xyz = torch.where(f > 0.206893, f ** 3, (f - 16 / 116) / 7.787) * _WHITE
    linear = (torch.linalg.inv(_RGB_TO_XYZ) @ xyz).clamp(min=0)
    c = torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=1e-12) ** (1 / 2.4) - 0.055,
                    12.92 * linear)
    return (c * 255).clamp(0, 255)


class ReinhardNormaliser:
    """Reinhard colour transfer: per-channel mean and std in L*a*b* matched to the reference.

    Statistics are taken over tissue pixels (optical density above `beta` in some channel, none
    clipped to black), so glass does not dominate them; a tile with fewer than `min_tissue`
    tissue pixels (near-empty or saturated) is returned unchanged.
    """

    method = "reinhard"

    def __init__(self, *, io: float = 240.0, beta: float = 0.15, min_tissue: float = 0.05) -> None:
        self.io, self.beta, self.min_tissue = io, beta, min_tissue
        self.mean_ = torch.tensor([65.0, 25.0, -15.0])
        self.std_ = torch.tensor([15.0, 10.0, 8.0])
        self.fitted_ = False

    def _stats(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
        lab = rgb_to_lab(flat)
        od = optical_density(flat, self.io)
        tissue = (od > self.beta).any(dim=1) & (od < _saturated_od(self.io)).all(dim=1)
        n = tissue.sum(1)
        usable = n >= max(2, int(self.min_tissue * flat.shape[2]))
        w = tissue.to(lab.dtype).unsqueeze(1)
        mean = (lab * w).sum(2) / n.clamp(min=1).unsqueeze(1)
        var = (((lab - mean.unsqueeze(2)) * w) ** 2).sum(2) / n.clamp(min=1).unsqueeze(1)
        return lab, mean, var.sqrt().clamp(min=1e-6), usable

    def fit(self, images: np.ndarray | torch.Tensor) -> ReinhardNormaliser:
        """Fit the reference L*a*b* means and standard deviations on the tissue of `images`."""
        batch = _as_batch(images)
        pooled = batch.permute(1, 0, 2, 3).reshape(1, 3, -1)
        with torch.no_grad():
            _, mean, std, usable = self._stats(pooled)
        if not bool(usable[0]):
            raise SlideError("stain reference: too few tissue pixels to fit Reinhard statistics")
        self.mean_, self.std_ = mean[0], std[0]
        self.fitted_ = True
        return self

    def transform(
        self, images: np.ndarray | torch.Tensor, *, return_skipped: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Normalised uint8 (N, 3, H, W) images; with return_skipped, also the unchanged ones."""
        def one_chunk(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            lab, mean, std, ok = self._stats(batch.flatten(2))
            moved = (lab - mean.unsqueeze(2)) / std.unsqueeze(2) * self.std_.view(1, 3, 1)
            return lab_to_rgb(moved + self.mean_.view(1, 3, 1)), ok

        return _in_chunks(images, one_chunk, return_skipped=return_skipped)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state: parameters and the fitted reference."""
        return {"method": self.method, "io": self.io, "beta": self.beta,
                "min_tissue": self.min_tissue, "mean": self.mean_.tolist(),
                "std": self.std_.tolist()}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ReinhardNormaliser:
        """The normaliser saved by to_dict."""
        norm = cls(io=state["io"], beta=state["beta"], min_tissue=state["min_tissue"])
        norm.mean_ = torch.tensor(state["mean"], dtype=torch.float32)
        norm.std_ = torch.tensor(state["std"], dtype=torch.float32)
        norm.fitted_ = True
        return norm


Normaliser = MacenkoNormaliser | ReinhardNormaliser
_CLASSES = {"macenko": MacenkoNormaliser, "reinhard": ReinhardNormaliser}


def make_normaliser(method: str) -> Normaliser:
    """An unfitted normaliser of the given method (macenko | reinhard)."""
    if method not in _CLASSES:
        raise ConfigError(f"imaging.wsi.stain.method: {method!r}; expected one of "
                          f"{['none', *METHODS]}")
    return _CLASSES[method]()


def normaliser_from_dict(state: dict[str, Any]) -> Normaliser:
    """The normaliser a to_dict state describes."""
    method = state.get("method")
    if method not in _CLASSES:
        raise ConfigError(f"stain reference: method {method!r}; expected one of {list(METHODS)}")
    return _CLASSES[method].from_dict(state)


def save_normaliser(norm: Normaliser, path: str | os.PathLike[str], **extra: Any) -> Path:
    """Write the fitted normaliser (and `extra` provenance) as JSON, atomically."""
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps({**norm.to_dict(), **extra}, indent=1, sort_keys=True))
    return Path(path)


def load_normaliser(path: str | os.PathLike[str]) -> Normaliser:
    """The normaliser saved at `path` by save_normaliser."""
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise SlideError(f"{path}: stain reference not found") from err
    except json.JSONDecodeError as err:
        raise SlideError(f"{path}: stain reference is not JSON ({err})") from err
    try:
        return normaliser_from_dict(state)
    except KeyError as err:
        raise SlideError(f"{path}: stain reference lacks field {err}") from err
