"""Image volumes: a numpy array plus its exact geometry, and safe file I/O.

Arrays are indexed ``[k, j, i]`` (SimpleITK order); ``spacing``/``origin``/``direction`` are kept in
SimpleITK's (x, y, z), LPS convention so that a round trip through a file is exact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from CMBDetectLib.errors import InputError, OutputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd")


@dataclass
class Volume:
    """A 3D image on a physical grid."""

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in array-axis order, as every engine function expects it."""
        return (float(self.spacing[2]), float(self.spacing[1]), float(self.spacing[0]))

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[::-1])  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> Volume:
        """Same grid, new voxels."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)

    def same_grid(self, other: Volume, tolerance: float = 1e-4) -> bool:
        return (self.array.shape == other.array.shape
                and np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=tolerance)
                and np.allclose(self.origin, other.origin, rtol=tolerance, atol=tolerance)
                and np.allclose(self.direction, other.direction, atol=tolerance))

    def index_to_ras(self, kji: np.ndarray) -> np.ndarray:
        """Continuous ``[k, j, i]`` indices (N x 3) -> RAS millimetres (N x 3)."""
        kji = np.atleast_2d(np.asarray(kji, dtype=float))
        ijk = kji[:, ::-1]
        direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        lps = (direction @ (ijk * np.asarray(self.spacing)).T).T + np.asarray(self.origin)
        return lps * np.array([-1.0, -1.0, 1.0])

    def ras_to_index(self, ras: np.ndarray) -> np.ndarray:
        """RAS millimetres (N x 3) -> continuous ``[k, j, i]`` indices (N x 3)."""
        ras = np.atleast_2d(np.asarray(ras, dtype=float))
        lps = ras * np.array([-1.0, -1.0, 1.0])
        direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        ijk = np.linalg.solve(direction, (lps - np.asarray(self.origin)).T).T / np.asarray(self.spacing)
        return ijk[:, ::-1]


def image_stem(path: str | os.PathLike) -> str:
    """File name without the image suffix (``scan.nii.gz`` -> ``scan``)."""
    name = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def volume_from_sitk(image: sitk.Image) -> Volume:
    if image.GetDimension() != 3:
        raise InputError(f"expected a 3D image, got a {image.GetDimension()}D image")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"expected a single-channel 3D image, got {image.GetNumberOfComponentsPerPixel()} "
            "components per voxel (a 4D or vector image)")
    return Volume(sitk.GetArrayFromImage(image), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                  tuple(image.GetDirection()))


def volume_to_sitk(volume: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing([float(s) for s in volume.spacing])
    image.SetOrigin([float(o) for o in volume.origin])
    image.SetDirection([float(d) for d in volume.direction])
    return image


def read_sitk(path: str | os.PathLike) -> sitk.Image:
    """Read an image file; a missing or unreadable file raises ``InputError``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    if path.is_dir():
        raise InputError(f"expected an image file, got a folder: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise InputError(f"cannot read image {path}: {first_line}") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]  # a 4D file with one time point is really 3D
    if image.GetDimension() == 2:
        raise InputError(f"{path.name} is a 2D image; CMB detection needs a 3D volume")
    if image.GetDimension() > 3:
        raise InputError(f"{path.name} is a {image.GetDimension()}D image with "
                         f"{image.GetSize()[3]} volumes; select a single 3D volume")
    return image


def read_volume(path: str | os.PathLike) -> Volume:
    return volume_from_sitk(read_sitk(path))


def _temporary_sibling(path: Path) -> Path:
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + "".join(path.suffixes),
                                    dir=path.parent)
    os.close(handle)
    # mkstemp creates owner-only files; outputs should get the usual permissions (umask applies).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


@contextlib.contextmanager
def _native_stderr_captured(sink: list[str]):
    """Collect what C libraries (niftilib, nrrd) print on file descriptor 2 instead of letting it through."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            sink.append(capture.read().decode("utf-8", "replace"))


def write_sitk_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write to a temporary file in the same folder, check it, then rename: never a half-written file.

    ITK's NIfTI writer does not raise when the disk is full (it prints to stderr and leaves a truncated
    file), so the temporary file is read back before it replaces anything.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(path)
    native: list[str] = []
    try:
        with _native_stderr_captured(native):
            sitk.WriteImage(image, str(temporary), compress)
            check = sitk.ReadImage(str(temporary))
        if check.GetSize() != image.GetSize():
            raise RuntimeError("the written file does not read back with the same size")
        os.replace(temporary, path)
    except RuntimeError as error:
        temporary.unlink(missing_ok=True)
        details = " ".join(native).strip() or str(error).strip()
        reason = details.splitlines()[-1] if details else "unknown reason"
        raise OutputError(f"cannot write {path} (disk full or folder not writable?): {reason}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_volume_atomic(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    return write_sitk_atomic(volume_to_sitk(volume), path, compress)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text via a temporary file + ``os.replace`` (atomic on POSIX and Windows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(path)
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
