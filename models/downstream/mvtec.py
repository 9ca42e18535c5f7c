"""The MVTec AD dataset layout: safe import of an uploaded archive, validation, the few-shot split,
and export of generated pairs.

    train/good/<name>.<ext>                    normal images
    test/good/<name>.<ext>                     normal test images
    test/<defect>/<stem>.<ext>                 real anomalies
    ground_truth/<defect>/<stem>_mask.png      their masks (non-zero = defect), same size as the image

Torch-free: the API imports this module to check an upload before it stores anything. Every
problem is a ``DatasetError`` whose code says what kind of problem it is and whose message says
which file and what is wrong with it.
"""

import errno
import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
# The compression-ratio check measures against at least this many archive bytes, so that a tiny
# archive of a few compressible files is not mistaken for a bomb.
RATIO_FLOOR_BYTES = 1 << 20
COPY_CHUNK_BYTES = 1 << 20
# Longest file or folder name, in UTF-8 bytes, that Linux file systems take (NAME_MAX).
MAX_NAME_BYTES = 255
SHOWN_NAME_CHARS = 120  # member names are cut to this in messages


class DatasetError(Exception):
    """A dataset upload that cannot be used; ``code`` is snake_case, ``message`` is for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 100_000
    max_total_bytes: int = 4 << 30  # uncompressed
    max_ratio: float = 100.0  # uncompressed bytes per archive byte


@dataclass(frozen=True)
class LabelledImage:
    """A real image, with its mask and defect type when it is an anomaly (``defect == "good"`` otherwise)."""

    path: Path
    defect: str = "good"
    mask: Path | None = None


@dataclass(frozen=True)
class FewShotSplit:
    """The protocol of the AnomalyDiffusion / CADiff / AnomalyControl papers.

    Per defect type the sorted file names are cut in thirds: the first third are the exemplars a
    user would upload, the other two thirds (with test/good) are the real test set.
    """

    normals: list[Path]
    exemplars: dict[str, list[LabelledImage]]
    test: list[LabelledImage]

    @property
    def defects(self) -> list[str]:
        return sorted(self.exemplars)


# --- safe extraction --------------------------------------------------------------------------


class _ExtractionBudget:
    """Counts members and bytes against the limits; raises as soon as one is exceeded."""

    def __init__(self, limits: ArchiveLimits, archive_bytes: int):
        self.limits = limits
        self.ratio_basis = max(archive_bytes, RATIO_FLOOR_BYTES)
        self.members = 0
        self.bytes_written = 0

    def count_members(self, count: int = 1) -> None:
        self.members += count
        if self.members > self.limits.max_members:
            raise DatasetError(
                "too_many_members", f"the archive has more than {self.limits.max_members} members"
            )

    def check_bytes(self, total_bytes: int) -> None:
        if total_bytes > self.limits.max_total_bytes:
            raise DatasetError(
                "archive_too_large",
                f"the archive unpacks to more than {self.limits.max_total_bytes} bytes",
            )
        if total_bytes > self.limits.max_ratio * self.ratio_basis:
            raise DatasetError(
                "compression_ratio",
                f"the archive unpacks to more than {self.limits.max_ratio:g} times its own size "
                "(a zip bomb?)",
            )

    def copy(self, source: BinaryIO, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            while True:
                try:
                    chunk = source.read(COPY_CHUNK_BYTES)
                except Exception as error:  # the archive's own data: corrupt, encrypted, or unsupported
                    if _our_disk(error):
                        raise
                    raise _unreadable_archive(error) from error
                if not chunk:
                    break
                self.bytes_written += len(chunk)
                self.check_bytes(self.bytes_written)
                out.write(chunk)


def _shown(name: str) -> str:
    """A member name as messages quote it: cut short, and printable whatever its bytes."""
    return repr(name if len(name) <= SHOWN_NAME_CHARS else name[:SHOWN_NAME_CHARS] + "...")


def _member_target(dest: Path, name: str) -> Path | None:
    """Where a member goes inside ``dest``; None for entries to skip (the root, macOS clutter)."""
    name = name.replace("\\", "/")
    if "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise DatasetError("unsafe_path", f"archive member {_shown(name)} has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise DatasetError("unsafe_path", f"archive member {_shown(name)} points outside the archive ('..')")
    if not parts or "__MACOSX" in parts or parts[-1] == ".DS_Store" or parts[-1].startswith("._"):
        return None
    if any(len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for part in parts):
        raise DatasetError(
            "name_too_long", f"archive member {_shown(name)} has a name over {MAX_NAME_BYTES} bytes"
        )
    return dest.joinpath(*parts)


def _unsafe_type(name: str, kind: str) -> DatasetError:
    return DatasetError(
        "unsafe_member", f"archive member {_shown(name)} is a {kind}; only files and folders are allowed"
    )


def _path_conflict(name: str) -> DatasetError:
    return DatasetError(
        "path_conflict",
        f"archive member {_shown(name)} clashes with another member: one name is both a file and a folder",
    )


@contextmanager
def _member_errors(name: str):
    """Writing one member out: a clash with another member's path, or a path too long for the file
    system, is the archive's fault."""
    try:
        yield
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise _path_conflict(name) from None
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise DatasetError("name_too_long", f"archive member {_shown(name)}: the path is too long") from None
        raise


def _extract_zip(archive: Path, dest: Path, budget: _ExtractionBudget) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        budget.count_members(len(members))
        budget.check_bytes(sum(member.file_size for member in members))  # declared sizes, before writing
        for member in members:
            file_type = stat.S_IFMT(member.external_attr >> 16)  # Unix file type; 0 when not recorded
            if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _unsafe_type(member.filename, "symlink" if file_type == stat.S_IFLNK else "special file")
            target = _member_target(dest, member.filename)
            if target is None:
                continue
            with _member_errors(member.filename):
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                with zf.open(member) as source:
                    budget.copy(source, target)


def _extract_tar(archive: Path, dest: Path, budget: _ExtractionBudget) -> None:
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:  # one header at a time: a bomb of headers stops at the member limit
            budget.count_members()
            if not (member.isreg() or member.isdir()):
                kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special file"
                raise _unsafe_type(member.name, kind)
            target = _member_target(dest, member.name)
            if target is None:
                continue
            budget.check_bytes(budget.bytes_written + member.size)  # declared size, before writing
            with _member_errors(member.name):
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                budget.copy(tar.extractfile(member), target)


def _dataset_root(dest: Path) -> Path:
    """``dest`` itself, or the single folder that wraps the layout."""
    if (dest / "train").is_dir():
        return dest
    entries = list(dest.iterdir())
    if len(entries) == 1 and (entries[0] / "train").is_dir():
        return entries[0]
    found = ", ".join(sorted(entry.name for entry in entries)[:10]) or "nothing"
    raise DatasetError(
        "not_mvtec_layout",
        f"no train/ folder at the top of the archive or inside a single top-level folder (found: {found})",
    )


def extract_archive(archive: Path, dest: Path, limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Unpack a zip or tar (plain, gz, bz2, xz) into ``dest`` and return the dataset root in it.

    Rejects absolute paths, '..', links and device files; stops before or while writing when the
    member count, the unpacked size or the compression ratio exceeds ``limits``. On error ``dest``
    may hold part of the archive: the caller removes it.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    budget = _ExtractionBudget(limits, archive.stat().st_size)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, budget)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, budget)
        else:
            raise DatasetError("unsupported_archive", "the upload is neither a zip nor a tar archive")
    except DatasetError:
        raise
    except Exception as error:  # zipfile, tarfile and the decompressors raise many kinds on bad data
        if _our_disk(error):
            raise
        raise _unreadable_archive(error) from error
    return _dataset_root(dest)


def _our_disk(error: Exception) -> bool:
    """Errors of the scratch file system itself (full, read-only): not the upload's fault, a 5xx."""
    return isinstance(error, PermissionError) or (
        isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
    )


def _unreadable_archive(error: Exception) -> DatasetError:
    """The DatasetError for an exception raised while reading archive data."""
    text = str(error)
    if isinstance(error, NotImplementedError) or "compression method" in text:
        return DatasetError(
            "unsupported_compression", f"the archive uses a compression method we cannot read: {text[:200]}"
        )
    if isinstance(error, RuntimeError) and ("encrypted" in text or "password" in text):
        return DatasetError("encrypted_archive", "the archive has encrypted members; upload it without a password")
    return DatasetError("corrupt_archive", f"the archive cannot be read: {type(error).__name__}: {text[:200]}")


# --- layout ------------------------------------------------------------------------------------


def images_in(folder: Path) -> list[Path]:
    """The image files of a folder, sorted by name (none when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(
        path for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )


def mask_path(root: Path, defect: str, image: Path) -> Path:
    return root / "ground_truth" / defect / f"{image.stem}_mask.png"


def _image_size(path: Path, root: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            image.load()
            return image.size
    except Exception as error:  # Pillow's decoders raise many kinds on bad data
        if _our_disk(error):
            raise
        shown = _shown(str(path.relative_to(root)))
        raise DatasetError("unreadable_image", f"{shown} is not a readable image: {str(error)[:200]}") from error


def _defect_folders(root: Path) -> list[Path]:
    test = root / "test"
    folders = sorted(path for path in test.iterdir() if path.is_dir()) if test.is_dir() else []
    return [folder for folder in folders if folder.name != "good"]


def validate_layout(root: Path) -> dict[str, int]:
    """Check every image and mask; return the image counts per folder, e.g. {"train/good": 700, ...}."""
    root = Path(root)
    train = images_in(root / "train" / "good")
    if not train:
        raise DatasetError("no_train_images", "train/good/ holds no images (png, jpg, bmp or tif)")
    for image in train + images_in(root / "test" / "good"):
        _image_size(image, root)
    counts = {"train/good": len(train), "test/good": len(images_in(root / "test" / "good"))}
    for folder in _defect_folders(root):
        images = images_in(folder)
        counts[f"test/{folder.name}"] = len(images)
        for image in images:
            mask = mask_path(root, folder.name, image)
            if not mask.is_file():
                raise DatasetError(
                    "mask_missing",
                    f"test/{folder.name}/{image.name} has no mask: expected {mask.relative_to(root)}",
                )
            image_size, mask_size = _image_size(image, root), _image_size(mask, root)
            if image_size != mask_size:
                raise DatasetError(
                    "mask_size_mismatch",
                    f"{mask.relative_to(root)} is {mask_size[0]}x{mask_size[1]} but "
                    f"test/{folder.name}/{image.name} is {image_size[0]}x{image_size[1]}",
                )
    if not any(counts[key] for key in counts if key not in ("train/good", "test/good")):
        raise DatasetError("no_test_anomalies", "test/ has no defect folder with images (test/<defect>/)")
    return counts


def import_dataset(archive: Path, dest: Path, limits: ArchiveLimits = ArchiveLimits()) -> tuple[Path, dict[str, int]]:
    """Extract and validate an upload; on any error ``dest`` is removed again. Returns (root, counts)."""
    try:
        root = extract_archive(archive, dest, limits)
        return root, validate_layout(root)
    except DatasetError:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def exemplar_validation_split(split: FewShotSplit, held_out_normals: int = 100) -> FewShotSplit:
    """A split of the exemplars and normals alone, for choosing a method's parameters without ever
    seeing the real test set: per defect type every other exemplar (in sorted order, from the
    second) becomes a validation anomaly, the rest stay exemplars; the last ``held_out_normals``
    training normals become the validation goods and leave the training normals."""
    held_out = min(held_out_normals, len(split.normals) // 2)
    kept = split.normals[: len(split.normals) - held_out]
    test = [LabelledImage(path) for path in split.normals[len(kept):]]
    for defect in split.defects:
        test.extend(split.exemplars[defect][1::2])
    return FewShotSplit(normals=kept, exemplars={d: split.exemplars[d][0::2] for d in split.defects}, test=test)


def few_shot_split(root: Path) -> FewShotSplit:
    """Normals, exemplars (first third of each defect type) and the real test set (the rest + test/good)."""
    root = Path(root)
    split = FewShotSplit(
        normals=images_in(root / "train" / "good"),
        exemplars={},
        test=[LabelledImage(path) for path in images_in(root / "test" / "good")],
    )
    for folder in _defect_folders(root):
        images = [LabelledImage(path, folder.name, mask_path(root, folder.name, path)) for path in images_in(folder)]
        split.exemplars[folder.name] = images[: len(images) // 3]
        split.test.extend(images[len(images) // 3:])
    return split


# --- export -----------------------------------------------------------------------------------


def write_mvtec_zip(
    files: Iterable[tuple[str, bytes | Path]],
    out: Path | BinaryIO,
    normals: Iterable[tuple[str, bytes | Path]] = (),
) -> dict[str, int]:
    """Re-file a generate job's pairs as an MVTec AD zip.

    ``files``: (key, content) as the job stores them, ``.../images/<defect>/<n>.png`` and
    ``.../masks/<defect>/<n>_mask.png`` (any other key, e.g. manifest.json, is left out); content
    is the bytes or a local path. ``normals``: optional (file name, content) for train/good/.
    They become test/<defect>/<n>.png and ground_truth/<defect>/<n>_mask.png. Returns the counts.
    """
    counts: dict[str, int] = {}
    folder_of = {"images": "test", "masks": "ground_truth"}

    def entries():  # lazily, so a large job is never all in memory
        for name, content in normals:
            yield f"train/good/{Path(name).name}", content
        for key, content in files:
            parts = key.split("/")
            if len(parts) >= 3 and parts[-3] in folder_of:
                yield f"{folder_of[parts[-3]]}/{parts[-2]}/{parts[-1]}", content

    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs do not compress further
        for arcname, content in entries():
            if isinstance(content, bytes):
                zf.writestr(arcname, content)
            else:
                zf.write(content, arcname)
            folder = arcname.rsplit("/", 1)[0]
            if not folder.startswith("ground_truth/"):
                counts[folder] = counts.get(folder, 0) + 1
    return counts
