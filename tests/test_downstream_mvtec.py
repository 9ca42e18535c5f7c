"""MVTec layout: safe extraction (zip-slip, zip bombs, links), layout validation, split, export."""

import io
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.downstream.mvtec import (
    ArchiveLimits,
    DatasetError,
    exemplar_validation_split,
    extract_archive,
    few_shot_split,
    import_dataset,
    validate_layout,
    write_mvtec_zip,
)
from tests.archive_mutations import mutations, set_zip_field, tar_bytes, zip_bytes


def png(size=(16, 12), value=128) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def layout(defects=("scratch",), per_defect=3, prefix="") -> dict[str, bytes]:
    """A tiny valid dataset as {archive name: bytes}."""
    files = {f"{prefix}train/good/{i:03d}.png": png() for i in range(2)}
    files[f"{prefix}test/good/000.png"] = png()
    for defect in defects:
        for i in range(per_defect):
            files[f"{prefix}test/{defect}/{i:03d}.png"] = png()
            files[f"{prefix}ground_truth/{defect}/{i:03d}_mask.png"] = png(value=255)
    return files


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def write_tar(path: Path, files: dict[str, bytes], mode="w:gz", special=()) -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in special:
            tar.addfile(info)
    return path


def error_code(archive: Path, dest: Path, **limits) -> str:
    with pytest.raises(DatasetError) as raised:
        import_dataset(archive, dest, ArchiveLimits(**limits))
    assert raised.value.message
    return raised.value.code


def test_valid_zip_counts(tmp_path):
    files = layout(defects=("crack", "scratch"), per_defect=3)
    files["__MACOSX/._junk"] = b"junk"
    files["train/good/.DS_Store"] = b"junk"
    root, counts = import_dataset(write_zip(tmp_path / "d.zip", files), tmp_path / "out")
    assert root == tmp_path / "out"
    assert counts == {"train/good": 2, "test/good": 1, "test/crack": 3, "test/scratch": 3}
    assert not (tmp_path / "out" / "__MACOSX").exists()


def test_single_top_level_folder_and_tar(tmp_path):
    archive = write_tar(tmp_path / "d.tar.gz", layout(prefix="bottle/"))
    root, counts = import_dataset(archive, tmp_path / "out")
    assert root == tmp_path / "out" / "bottle"
    assert counts["test/scratch"] == 3


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/abs/evil.png", "..\\evil.png", "C:/evil.png"])
def test_zip_slip_is_rejected(tmp_path, name):
    files = layout()
    files[name] = b"x"
    assert error_code(write_zip(tmp_path / "d.zip", files), tmp_path / "out") == "unsafe_path"
    assert not (tmp_path / "evil.png").exists()
    assert not (tmp_path / "out").exists()  # import_dataset cleans up after an error


def test_tar_slip_is_rejected(tmp_path):
    archive = write_tar(tmp_path / "d.tar", {**layout(), "../evil.png": b"x"}, mode="w")
    assert error_code(archive, tmp_path / "out") == "unsafe_path"
    assert not (tmp_path / "evil.png").exists()


def test_zip_symlink_is_rejected(tmp_path):
    archive = tmp_path / "d.zip"
    write_zip(archive, layout())
    with zipfile.ZipFile(archive, "a") as zf:
        link = zipfile.ZipInfo("train/good/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    assert error_code(archive, tmp_path / "out") == "unsafe_member"


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_tar_links_and_devices_are_rejected(tmp_path, kind):
    member = tarfile.TarInfo("train/good/special.png")
    member.type = kind
    member.linkname = "/etc/passwd"
    archive = write_tar(tmp_path / "d.tar", layout(), mode="w", special=[member])
    assert error_code(archive, tmp_path / "out") == "unsafe_member"


def test_zip_bomb_limits(tmp_path):
    bomb = write_zip(tmp_path / "bomb.zip", {**layout(), "train/good/zeros.bmp": bytes(8 << 20)})
    assert bomb.stat().st_size < 100_000
    assert error_code(bomb, tmp_path / "a", max_ratio=4) == "compression_ratio"
    assert error_code(bomb, tmp_path / "b", max_total_bytes=1 << 20) == "archive_too_large"
    assert error_code(bomb, tmp_path / "c", max_members=5) == "too_many_members"


def test_tar_bomb_is_stopped_before_writing(tmp_path):
    bomb = write_tar(tmp_path / "bomb.tar.gz", {**layout(), "train/good/zeros.bmp": bytes(8 << 20)})
    assert error_code(bomb, tmp_path / "a", max_ratio=4) == "compression_ratio"
    assert not (tmp_path / "a").exists()
    assert error_code(bomb, tmp_path / "b", max_members=5) == "too_many_members"


def test_not_an_archive_and_corrupt_archive(tmp_path):
    (tmp_path / "junk.zip").write_bytes(b"this is not an archive" * 100)
    assert error_code(tmp_path / "junk.zip", tmp_path / "a") == "unsupported_archive"
    archive = write_zip(tmp_path / "d.zip", {"train/good/a.bmp": bytes(range(256)) * 400})
    data = bytearray(archive.read_bytes())
    data[60:90] = bytes(30)  # inside the compressed member data
    (tmp_path / "corrupt.zip").write_bytes(bytes(data))
    assert error_code(tmp_path / "corrupt.zip", tmp_path / "b") == "corrupt_archive"


@pytest.mark.parametrize("order", ["file first", "folder first"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_name_that_is_both_file_and_folder_is_a_path_conflict(tmp_path, kind, order):
    files = layout()
    clash = {"train/good": b"a file where a folder is"}
    files = clash | files if order == "file first" else files | clash
    data = zip_bytes(files) if kind == "zip" else tar_bytes(files)
    (tmp_path / "d").write_bytes(data)
    assert error_code(tmp_path / "d", tmp_path / "out") == "path_conflict"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["train/good/" + "a" * 300 + ".png", "/".join(["d" * 200] * 25) + "/x.png"])
def test_names_too_long_for_the_file_system(tmp_path, name):
    (tmp_path / "d.zip").write_bytes(zip_bytes(layout() | {name: png()}))
    error = layout_error_of(tmp_path / "d.zip", tmp_path / "out")
    assert error.code == "name_too_long"
    assert len(error.message) < 300  # the name is cut short in the message


def test_unknown_compression_and_encrypted_members(tmp_path):
    valid = zip_bytes(layout(), compression=zipfile.ZIP_STORED)
    (tmp_path / "ppmd.zip").write_bytes(set_zip_field(valid, "method", 98, member=0))  # PPMd: not in zipfile
    assert error_code(tmp_path / "ppmd.zip", tmp_path / "a") == "unsupported_compression"
    (tmp_path / "locked.zip").write_bytes(set_zip_field(valid, "flags", 0x1, member=2))  # "encrypted"
    assert error_code(tmp_path / "locked.zip", tmp_path / "b") == "encrypted_archive"


def test_a_seeded_mutation_fuzz_only_ever_raises_dataset_errors(tmp_path):
    """Byte flips, truncations and header edits of valid zips and tars: each is either still a valid
    dataset or a DatasetError, never another exception, and a rejected one leaves nothing behind."""
    valid = [zip_bytes(layout()), zip_bytes(layout(), zipfile.ZIP_STORED), tar_bytes(layout()),
             tar_bytes(layout(), "w:gz")]
    outcomes = {}
    for number, (what, data) in enumerate(mutations(valid, 300, seed=12)):
        archive, dest = tmp_path / f"{number}.bin", tmp_path / f"out{number}"
        archive.write_bytes(data)
        try:
            import_dataset(archive, dest)
            outcomes["valid"] = outcomes.get("valid", 0) + 1
        except DatasetError as error:
            assert error.code and error.message, what
            assert not dest.exists(), what
            outcomes[error.code] = outcomes.get(error.code, 0) + 1
        archive.unlink()
        shutil.rmtree(dest, ignore_errors=True)
    # the mutations reach past the first check: several kinds of rejection, and some survivors
    assert len(outcomes) >= 4 and outcomes.get("corrupt_archive"), outcomes


def layout_error_of(archive: Path, dest: Path) -> DatasetError:
    with pytest.raises(DatasetError) as raised:
        import_dataset(archive, dest)
    return raised.value


def layout_error(tmp_path, files) -> DatasetError:
    with pytest.raises(DatasetError) as raised:
        import_dataset(write_zip(tmp_path / "d.zip", files), tmp_path / "out")
    return raised.value


def test_layout_errors_name_the_file(tmp_path):
    files = layout()
    del files["ground_truth/scratch/001_mask.png"]
    error = layout_error(tmp_path, files)
    assert error.code == "mask_missing" and "test/scratch/001.png" in error.message

    files = layout()
    files["ground_truth/scratch/002_mask.png"] = png(size=(8, 8), value=255)
    error = layout_error(tmp_path, files)
    assert error.code == "mask_size_mismatch" and "ground_truth/scratch/002_mask.png" in error.message

    files = layout()
    files["test/scratch/000.png"] = b"not a png"
    error = layout_error(tmp_path, files)
    assert error.code == "unreadable_image" and "test/scratch/000.png" in error.message


@pytest.mark.parametrize("remove, code", [
    ("train/", "not_mvtec_layout"),
    ("train/good/", "no_train_images"),
    ("test/scratch/", "no_test_anomalies"),
])
def test_missing_parts(tmp_path, remove, code):
    files = {name: data for name, data in layout().items() if not name.startswith(remove)}
    if remove == "train/good/":
        files["train/good/readme.txt"] = b"no images here"
    assert layout_error(tmp_path, files).code == code


def test_few_shot_split(tmp_path):
    root, _ = import_dataset(write_zip(tmp_path / "d.zip", layout(defects=("crack", "hole"), per_defect=7)),
                             tmp_path / "out")
    split = few_shot_split(root)
    assert split.defects == ["crack", "hole"]
    assert [e.path.name for e in split.exemplars["crack"]] == ["000.png", "001.png"]  # 7 // 3
    assert split.exemplars["crack"][0].mask == root / "ground_truth/crack/000_mask.png"
    assert len(split.normals) == 2
    assert next(item.path.name for item in split.test if item.defect == "hole") == "002.png"
    assert sum(item.defect == "good" and item.mask is None for item in split.test) == 1
    assert len(split.test) == 1 + 5 + 5


def test_exemplar_validation_split_is_made_of_exemplars_and_training_normals_only(tmp_path):
    root, _ = import_dataset(write_zip(tmp_path / "d.zip", layout(defects=("crack", "hole"), per_defect=12)),
                             tmp_path / "out")
    split = few_shot_split(root)
    validation = exemplar_validation_split(split, held_out_normals=1)
    assert [e.path.name for e in split.exemplars["crack"]] == ["000.png", "001.png", "002.png", "003.png"]
    assert [e.path.name for e in validation.exemplars["crack"]] == ["000.png", "002.png"]
    assert [item.path.name for item in validation.test if item.defect == "crack"] == ["001.png", "003.png"]
    assert validation.normals == split.normals[:1]
    assert [item.path for item in validation.test if item.defect == "good"] == split.normals[1:]
    test_files = {item.path for item in split.test}
    assert not test_files & {item.path for item in validation.test}  # the real test set stays unseen
    assert not test_files & {e.path for d in validation.defects for e in validation.exemplars[d]}


def test_generated_pairs_round_trip_as_mvtec_zip(tmp_path):
    normal_file = tmp_path / "n.png"
    normal_file.write_bytes(png())
    files = [
        ("jobs/j1/images/scratch/0.png", png()),
        ("jobs/j1/masks/scratch/0_mask.png", png(value=255)),
        ("jobs/j1/images/scratch/1.png", png()),
        ("jobs/j1/masks/scratch/1_mask.png", png(value=255)),
        ("jobs/j1/manifest.json", b"{}"),
        ("jobs/j1/preview.png", png()),
    ]
    counts = write_mvtec_zip(files, tmp_path / "out.zip", normals=[("normal_a.png", normal_file)])
    assert counts == {"train/good": 1, "test/scratch": 2}
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        assert sorted(zf.namelist()) == [
            "ground_truth/scratch/0_mask.png", "ground_truth/scratch/1_mask.png",
            "test/scratch/0.png", "test/scratch/1.png", "train/good/normal_a.png",
        ]
    _, validated = import_dataset(tmp_path / "out.zip", tmp_path / "extracted")
    assert validated == {"train/good": 1, "test/good": 0, "test/scratch": 2}


def test_validate_layout_on_a_directory(tmp_path):
    for name, data in layout().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    assert validate_layout(tmp_path)["test/scratch"] == 3


def test_extract_archive_returns_the_wrapped_root(tmp_path):
    assert extract_archive(write_zip(tmp_path / "d.zip", layout(prefix="x/")), tmp_path / "o") == tmp_path / "o" / "x"
