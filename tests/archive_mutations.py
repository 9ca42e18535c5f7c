"""Malformed archives for the dataset tests: header edits of real zip and tar files, and a seeded
stream of random mutations (byte flips, truncations, header-field edits) of valid ones."""

import io
import random
import struct
import tarfile
import zipfile

ZIP_LOCAL = b"PK\x03\x04"
ZIP_CENTRAL = b"PK\x01\x02"
# Offsets of fields inside a zip local file header and a central directory header (APPNOTE 4.3.7, 4.3.12).
LOCAL_FIELDS = {"flags": (6, "<H"), "method": (8, "<H"), "crc": (14, "<I"), "compressed": (18, "<I"),
                "size": (22, "<I"), "name_length": (26, "<H"), "extra_length": (28, "<H")}
CENTRAL_FIELDS = {"flags": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"), "compressed": (20, "<I"),
                  "size": (24, "<I"), "name_length": (28, "<H"), "extra_length": (30, "<H"),
                  "external_attr": (38, "<I"), "offset": (42, "<I")}

# (offset, width) of fields of a ustar header.
TAR_FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "type": (156, 1), "linkname": (157, 100),
              "prefix": (345, 155)}


def zip_bytes(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def set_zip_field(data: bytes, field: str, value: int, member: int | None = None) -> bytes:
    """Set `field` in the local and central headers of every member (or of member number `member`)."""
    out = bytearray(data)
    for signature, fields in ((ZIP_LOCAL, LOCAL_FIELDS), (ZIP_CENTRAL, CENTRAL_FIELDS)):
        if field not in fields:
            continue
        offset, fmt = fields[field]
        starts = [i for i in range(len(out) - 3) if out[i : i + 4] == signature]
        for number, start in enumerate(starts):
            if member is None or number == member:
                struct.pack_into(fmt, out, start + offset, value & (0xFFFF if fmt == "<H" else 0xFFFFFFFF))
    return bytes(out)


def _tar_header_edit(rng: random.Random, data: bytearray) -> None:
    """Overwrite one field of one 512-byte tar header, then fix its checksum so tarfile reads it."""
    headers = [i for i in range(0, len(data) - 511, 512) if data[i + 257 : i + 262] == b"ustar"]
    if not headers:
        return
    start = rng.choice(headers)
    field, (offset, width) = rng.choice(list(TAR_FIELDS.items()))
    noise = bytes(rng.randrange(256) for _ in range(width))
    choices = [b"\xff" * width, b"0" * width, b"7" * (width - 1) + b"\0", noise]
    if field == "type":
        choices += [bytes([c]) for c in b"0123456789LKxgX"]
    if field in ("name", "prefix"):
        choices += [b"train/good" + b"\0" * (width - 10), b"../" * (width // 3) + b"\0" * (width % 3), b"a" * width]
    data[start + offset : start + offset + width] = rng.choice(choices)[:width].ljust(width, b"\0")
    data[start + 148 : start + 156] = b" " * 8
    data[start + 148 : start + 156] = b"%06o\0 " % sum(data[start : start + 512])


def _zip_header_edit(rng: random.Random, data: bytes) -> bytes:
    field = rng.choice(list(CENTRAL_FIELDS))
    count = data.count(ZIP_CENTRAL)
    value = rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, rng.randrange(1 << 32), 99, 12, 14, 0x41, 1 << 31])
    return set_zip_field(data, field, value, member=rng.randrange(count) if count else None)


def mutations(valid: list[bytes], count: int, seed: int):
    """`count` seeded mutants of the valid archives: (description, bytes)."""
    rng = random.Random(seed)
    for number in range(count):
        original = rng.choice(valid)
        is_zip = original.startswith(ZIP_LOCAL)
        kind = rng.choice(["flip", "flip", "truncate", "header", "header", "splice"])
        data = bytearray(original)
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            data = data[: rng.randrange(1, len(data))]
        elif kind == "splice":  # a run of bytes copied from elsewhere in the file
            start, length = rng.randrange(len(data)), rng.randint(4, 64)
            source = rng.randrange(len(data))
            data[start : start + length] = data[source : source + length]
        elif is_zip:
            data = bytearray(_zip_header_edit(rng, bytes(data)))
        elif original[257:262] == b"ustar":
            _tar_header_edit(rng, data)
        else:  # a compressed tar: edit a header inside, compress again
            import gzip

            inner = bytearray(gzip.decompress(original))
            _tar_header_edit(rng, inner)
            data = bytearray(gzip.compress(bytes(inner), mtime=0))
        yield f"#{number} {kind} of a {'zip' if is_zip else 'tar'}", bytes(data)
