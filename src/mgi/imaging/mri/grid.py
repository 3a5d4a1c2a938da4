"""Putting a case's sequences on one grid: the reference series' voxels, in physical space.

A series becomes a SimpleITK image with its DICOM geometry (`to_sitk`); a series not on the
reference grid is resampled onto it (linear, 0 outside), after a rigid registration to the
reference (Mattes mutual information) when `register` is "rigid".
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from mgi.errors import SeriesError
from mgi.imaging.mri.dicom import ORIENTATION_ATOL, POSITION_ATOL_MM, SPACING_ATOL, MRSeries

log = logging.getLogger(__name__)

REGISTER = ("none", "rigid")
SHEAR_TOLERANCE = 0.1  # largest in-plane drift of the slice positions, in pixels
SAMPLING_SEED = 7  # any fixed number: the metric's random voxel sample is the same every run


@dataclass
class Aligned:
    """One sequence on the reference grid."""

    volume: np.ndarray  # (Z, H, W) float32, the reference's shape
    coverage: float  # share of the reference volume inside this series' volume
    metric: float | None  # final registration metric (None: not registered)
    how: str  # "reference" | "same grid" | "resampled" | "registered"


def _where(series: MRSeries) -> str:
    return str(series.files[0].parent) if series.files else f"series {series.series_uid}"


def sitk_threads() -> int:
    """Threads for SimpleITK filters: the process's thread budget, not the machine's cores.

    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS where set, else OMP_NUM_THREADS (Snakemake sets it to
    the job's `threads:`), else the CPUs this process may run on (ITK's own default counts every
    core of the machine, which oversubscribes it when jobs run side by side).
    """
    for name in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def to_sitk(series: MRSeries) -> sitk.Image:
    """The series as a SimpleITK image with its DICOM geometry; array order (Z, Y, X) = (Z, H, W).

    Index (i, j, k) is at ImagePositionPatient of slice k + i * column spacing * IOP[:3]
    + j * row spacing * IOP[3:]; slices follow each other along the normal IOP[:3] x IOP[3:].
    """
    row, col = series.orientation[:3], series.orientation[3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    if series.slice_gap <= 0:
        raise SeriesError(f"{_where(series)}: slice gap {series.slice_gap} mm, expected a "
                          "positive distance between slices (or SliceThickness for one slice)")
    # one origin and a slice step along the normal describe the stack only if the positions do
    # not drift across the slice plane (a sheared stack, as with a tilted gantry)
    offsets = series.positions - series.positions[0]
    drift = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1).max()
    if drift > SHEAR_TOLERANCE * min(series.pixel_spacing):
        raise SeriesError(f"{_where(series)}: ImagePositionPatient drifts {drift:.3f} mm across "
                          "the slice plane; expected the slice positions on a line along the "
                          "slice normal (a sheared or tilted stack cannot be resampled)")
    image = sitk.GetImageFromArray(np.asarray(series.volume, dtype=np.float32))
    image.SetSpacing((series.pixel_spacing[1], series.pixel_spacing[0], series.slice_gap))
    image.SetOrigin(tuple(float(v) for v in series.positions[0]))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    return image


def register_rigid(
    fixed: sitk.Image, moving: sitk.Image, *, same_frame: bool, threads: int = 1
) -> tuple[sitk.Transform, float]:
    """The rigid transform (fixed to moving points) maximising Mattes MI, and its final metric."""
    if same_frame:
        # the DICOM geometry already overlays the two: start from it, rotating about the
        # reference's centre (GEOMETRY would move a partial slab onto the reference's centre)
        initial = sitk.Euler3DTransform()
        initial.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint(
            [(n - 1) / 2 for n in fixed.GetSize()]))
    else:  # no shared coordinates: start by overlaying the centres of the two volumes
        initial = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # 10% of the voxels: ~150k at full size for 256 x 256 x 24, ample for a 32-bin histogram;
    # a fixed seed makes the sample, and so the transform found, the same on every run
    method.SetMetricSamplingPercentage(0.1, SAMPLING_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()  # 1 mm of shift ~ the rotation moving 1 mm
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    method.SetNumberOfThreads(threads)
    transform = method.Execute(fixed, moving)
    return transform, float(method.GetMetricValue())


def resample_onto(
    moving: sitk.Image, fixed: sitk.Image, *, transform: sitk.Transform | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, float]:
    """(`moving` on the grid of `fixed`, (Z, H, W) float32 with 0 outside; its coverage)."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(fixed)
    resampler.SetTransform(
        sitk.Transform(3, sitk.sitkIdentity) if transform is None else transform)
    resampler.SetDefaultPixelValue(0)
    resampler.SetNumberOfThreads(threads)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    volume = sitk.GetArrayFromImage(resampler.Execute(moving))
    # coverage: ones resampled by nearest neighbour are exactly 1 where a reference voxel
    # centre maps into the moving volume (up to half a voxel beyond its outer centres, as for
    # the linear interpolation above) and 0 elsewhere: no fractional weights at the border
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    resampler.SetInterpolator(sitk.sitkNearestNeighbor)
    resampler.SetOutputPixelType(sitk.sitkUInt8)
    inside = sitk.GetArrayFromImage(resampler.Execute(ones))
    return volume, float(inside.mean())


def _same_grid(reference: MRSeries, other: MRSeries) -> bool:
    return (other.volume.shape == reference.volume.shape
            and np.allclose(other.orientation, reference.orientation, atol=ORIENTATION_ATOL)
            and np.allclose(other.pixel_spacing, reference.pixel_spacing, atol=SPACING_ATOL)
            and np.allclose(other.positions, reference.positions, atol=POSITION_ATOL_MM))


def align_to_reference(
    series: dict[str, MRSeries], *, reference: str, register: str = "none"
) -> dict[str, Aligned]:
    """Every series on the grid of `series[reference]` (role -> Aligned).

    register "none": a series on the reference grid passes through untouched, any other is
    resampled through the DICOM geometry; "rigid": every other series is registered first.
    """
    if register not in REGISTER:
        raise ValueError(f"register {register!r}, expected one of {REGISTER}")
    ref = series[reference]
    threads = sitk_threads()
    fixed = None
    out = {}
    for role, other in series.items():
        if role == reference:
            out[role] = Aligned(ref.volume, 1.0, None, "reference")
            continue
        same_frame = (not ref.frame_of_reference or not other.frame_of_reference
                      or ref.frame_of_reference == other.frame_of_reference)
        if not same_frame and register == "none":
            raise SeriesError(
                f"{_where(other)}: series {role!r} has FrameOfReferenceUID "
                f"{other.frame_of_reference}, the reference {reference!r} "
                f"{ref.frame_of_reference}: their coordinates are not comparable; "
                "set imaging.mri.register: rigid")
        if register == "none" and _same_grid(ref, other):
            out[role] = Aligned(other.volume, 1.0, None, "same grid")
            continue
        fixed = to_sitk(ref) if fixed is None else fixed
        moving = to_sitk(other)
        transform, metric, how = None, None, "resampled"
        if register == "rigid":
            try:
                transform, metric = register_rigid(fixed, moving, same_frame=same_frame,
                                                   threads=threads)
            except RuntimeError as err:  # ITK: e.g. all samples map outside the moving image
                raise SeriesError(f"{_where(other)}: rigid registration of series {role!r} to "
                                  f"{reference!r} failed: {err}") from err
            how = "registered"
        volume, coverage = resample_onto(moving, fixed, transform=transform, threads=threads)
        log.info("%s: %s %s onto %s, coverage %.3f%s", _where(other), role, how, reference,
                 coverage, "" if metric is None else f", metric {metric:.4f}")
        out[role] = Aligned(volume, coverage, metric, how)
    return out
