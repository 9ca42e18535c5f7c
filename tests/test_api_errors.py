"""Bad input: a clear JSON 4xx, nothing created, and the server keeps serving."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import MAX_IMAGE_SIDE, MAX_UPLOAD_BYTES, defect_mask, png_bytes, product_image, upload

IMAGE = png_bytes(product_image(64, 80))
INF, NAN = float("inf"), float("nan")  # sent as JSON's Infinity and NaN, which Python's parser reads
MASK = png_bytes(defect_mask(64, 80))


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(product_image(64, 80)).save(buf, format="GIF")
    return buf.getvalue()


def _sixteen_bit() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(product_image(64, 80).astype(np.uint16) * 256).save(buf, format="PNG")
    return buf.getvalue()


def _png_16_bit(channels: int) -> bytes:
    """A 16-bit PNG written by hand: Pillow reads 16-bit RGB but cannot write it."""
    height, width = 64, 80
    rows = np.random.default_rng(1).integers(0, 1 << 16, (height, width * channels)).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if channels == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _tiff_16_bit() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(product_image(64, 80).astype(np.uint16) * 256).save(buf, format="TIFF")
    return buf.getvalue()


def _huge_file() -> bytes:  # incompressible noise, just over the upload limit
    side = int((MAX_UPLOAD_BYTES / 3) ** 0.5) + 20
    return png_bytes(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))


UPLOAD_CASES = {
    "text file as image": (dict(image=b"hello, not an image", name="notes.txt"), 415, "unsupported_image_type"),
    "gif image": (dict(image=_gif(), name="a.gif"), 415, "unsupported_image_type"),
    "truncated png": (dict(image=IMAGE[: len(IMAGE) // 2]), 400, "invalid_image"),
    "empty file": (dict(image=b""), 400, "empty_file"),
    "16-bit image": (dict(image=_sixteen_bit()), 415, "unsupported_image_mode"),
    "16-bit grey PNG": (dict(image=_png_16_bit(1)), 415, "unsupported_image_mode"),
    "16-bit RGB PNG": (dict(image=_png_16_bit(3)), 415, "unsupported_image_mode"),
    "16-bit grey TIFF": (dict(image=_tiff_16_bit(), name="a.tif"), 415, "unsupported_image_mode"),
    "16-bit RGB PNG mask": (dict(image=IMAGE, mask=_png_16_bit(3), defect="dent"), 415, "unsupported_image_mode"),
    "giant image": (dict(image=png_bytes(np.zeros((8, MAX_IMAGE_SIDE + 1), np.uint8))), 413, "image_too_large"),
    "file over the byte limit": (dict(image=_huge_file()), 413, "file_too_large"),
    "mask size mismatch": (
        dict(image=IMAGE, mask=png_bytes(defect_mask(32, 32)), defect="dent"),
        400,
        "mask_size_mismatch",
    ),
    "empty mask": (
        dict(image=IMAGE, mask=png_bytes(np.full((64, 80), 127, np.uint8)), defect="dent"),
        400,
        "empty_mask",
    ),
    "mask without defect": (dict(image=IMAGE, mask=MASK), 422, "defect_required"),
    "defect without mask": (dict(image=IMAGE, defect="dent"), 422, "mask_required"),
    "product with a slash": (dict(image=IMAGE, product="../etc"), 422, "invalid_request"),
}


def _counts(client):
    return len(client.get("/v1/exemplars").json()["items"]), len(
        client.get("/v1/jobs", params={"limit": 1000}).json()["items"]
    )


def _assert_error(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize("case", list(UPLOAD_CASES))
def test_bad_uploads_are_rejected_and_store_nothing(acme, case):
    kwargs, status, code = UPLOAD_CASES[case]
    before = _counts(acme)
    _assert_error(upload(acme, **kwargs), status, code)
    assert _counts(acme) == before
    assert acme.get("/healthz").status_code == 200


@pytest.fixture(scope="module")
def inputs(acme):
    anomaly = upload(acme, IMAGE, MASK, defect="dent").json()
    normal = upload(acme, IMAGE).json()
    return anomaly["id"], normal["id"]


def _job_cases(anomaly, normal):
    ok = {"kind": "generate", "method": "draem", "exemplars": [anomaly], "normals": [normal], "count": 2}
    return {
        "unknown method": (dict(ok, method="stylegan"), 422, "unknown_method"),
        "unknown parameter": (dict(ok, params={"opacitty": [0.1, 0.2]}), 422, "invalid_params"),
        "parameter out of range": (dict(ok, params={"opacity": [0.5, 2.0]}), 422, "invalid_params"),
        "parameter bounds reversed": (dict(ok, params={"opacity": [0.9, 0.1]}), 422, "invalid_params"),
        "unknown top-level field": (dict(ok, colour="red"), 422, "invalid_request"),
        "count zero": (dict(ok, count=0), 422, "invalid_request"),
        "count over the limit": (dict(ok, count=10**6), 422, "count_too_large"),
        "negative seed": (dict(ok, seed=-1), 422, "invalid_request"),
        "no normals": (dict(ok, normals=[]), 422, "normals_required"),
        "unknown exemplar": (dict(ok, exemplars=["f" * 32]), 422, "unknown_exemplar"),
        "normal given as exemplar": (dict(ok, exemplars=[normal]), 422, "wrong_exemplar_kind"),
        "anomaly given as normal": (dict(ok, normals=[anomaly]), 422, "wrong_exemplar_kind"),
        "given masks missing": (dict(ok, masks={"source": "given"}), 422, "invalid_request"),
        "unknown mask source": (dict(ok, masks={"source": "everywhere"}), 422, "invalid_request"),
        "exemplar masks without exemplars": (
            dict(ok, exemplars=[], masks={"source": "exemplar"}),
            422,
            "exemplars_required",
        ),
        "bad box": (dict(ok, masks={"source": "box", "boxes": [[10, 10, 5, 5]]}), 422, "invalid_request"),
        "fine-tune with a model-free method": (dict(ok, kind="finetune"), 422, "unsupported_kind"),
        "unknown kind": (dict(ok, kind="train"), 422, "invalid_request"),
        "adapter for a model-free method": (dict(ok, adapter="a" * 32), 422, "invalid_request"),
        "no method": ({k: v for k, v in ok.items() if k != "method"}, 422, "invalid_request"),
        # numbers must be finite and within what the data can take
        "infinite jitter scale": (dict(ok, masks={"scale": [0.75, INF]}), 422, "invalid_request"),
        "huge jitter scale": (dict(ok, masks={"scale": [1e308, 1e308]}), 422, "invalid_request"),
        "NaN rotation": (dict(ok, masks={"rotation": NAN}), 422, "invalid_request"),
        "infinite box aspect": (dict(ok, masks={"source": "box", "box_aspect": [0.3, INF]}), 422, "invalid_request"),
        "box outside the normal image": (
            dict(ok, masks={"source": "box", "boxes": [[0, 0, 81, 10]]}), 422, "box_outside_image"
        ),
        "box of 1e30 pixels": (
            dict(ok, masks={"source": "box", "boxes": [[0, 0, 1e30, 1e30]]}), 422, "invalid_request"
        ),
        "infinite opacity": (dict(ok, params={"opacity": [0.5, INF]}), 422, "invalid_params"),
        "cutpaste infinite aspect": (dict(ok, method="cutpaste", params={"aspect": [0.3, INF]}), 422, "invalid_params"),
        "cutpaste scar a million px wide": (
            dict(ok, method="cutpaste", params={"scar_width": [1, 10**12]}), 422, "invalid_params"
        ),
        "evaluate seed of 2^64": (
            {"kind": "evaluate", "dataset": "d" * 32, "params": {"seed": 2**64}}, 422, "invalid_params"
        ),
        # strict types: a string or a boolean is not a number, a number is not a flag
        "count as a string": (dict(ok, count="3"), 422, "invalid_request"),
        "count as a boolean": (dict(ok, count=True), 422, "invalid_request"),
        "seed as a float": (dict(ok, seed=7.0), 422, "invalid_request"),
        "opacity as a string": (dict(ok, params={"opacity": [0.5, "1"]}), 422, "invalid_params"),
        "threshold as a boolean": (dict(ok, params={"perlin_threshold": True}), 422, "invalid_params"),
        "foreground flag as a string": (dict(ok, masks={"inside_foreground": "yes"}), 422, "invalid_request"),
        "scar width as a float": (dict(ok, method="cutpaste", params={"scar_width": [2, 8.5]}), 422, "invalid_params"),
        # the same id twice
        "duplicate normals": (dict(ok, normals=[normal, normal]), 422, "duplicate_ids"),
        "duplicate exemplars": (dict(ok, exemplars=[anomaly, anomaly]), 422, "duplicate_ids"),
        "duplicate given masks": (
            dict(ok, masks={"source": "given", "masks": [anomaly, anomaly]}), 422, "duplicate_ids"
        ),
        "duplicate generated jobs": (
            {"kind": "evaluate", "dataset": "d" * 32, "generated": ["j" * 32, "j" * 32]}, 422, "duplicate_ids"
        ),
        "an id of 5,000 characters": (dict(ok, normals=["n" * 5000]), 422, "invalid_request"),
    }


CASE_NAMES = list(_job_cases("a", "n"))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_job_requests_are_rejected_and_create_nothing(acme, inputs, case):
    body, status, code = _job_cases(*inputs)[case]
    before = _counts(acme)
    response = acme.post("/v1/jobs", content=json.dumps(body), headers={"content-type": "application/json"})
    _assert_error(response, status, code)
    assert len(response.json()["error"]["message"]) < 400  # nothing is echoed back whole
    assert _counts(acme) == before


def test_the_same_bounds_hold_on_the_multipart_shortcut(acme):
    before = _counts(acme)
    files = [("image", ("a.png", IMAGE)), ("mask", ("m.png", MASK)), ("normal", ("n.png", IMAGE))]
    for data, code in [
        ({"masks": json.dumps({"scale": [0.75, INF]})}, "invalid_request"),
        ({"masks": json.dumps({"source": "box", "boxes": [[0, 0, 81, 10]]})}, "box_outside_image"),
        ({"params": json.dumps({"opacity": [0.5, "1"]})}, "invalid_params"),
        ({"params": "[" * 100_000 + "]" * 100_000}, "invalid_params"),  # nested past the recursion limit
        ({"masks": "{" + '"a":{' * 50_000 + "}" * 50_001}, "invalid_params"),
    ]:
        _assert_error(acme.post("/v1/jobs/generate", files=files, data={"method": "draem", **data}), 422, code)
    assert _counts(acme) == before


def test_deeply_nested_json_body_is_a_4xx(acme, inputs):
    anomaly, normal = inputs
    nested = "[" * 100_000 + "]" * 100_000
    body = f'{{"kind": "generate", "method": "draem", "normals": ["{normal}"], "params": {{"opacity": {nested}}}}}'
    before = _counts(acme)
    response = acme.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500 and response.json()["error"]["code"], response.text
    shallow = "[" * 500 + "]" * 500  # parses, but is no parameter value
    body = f'{{"kind": "generate", "method": "draem", "normals": ["{normal}"], "params": {{"opacity": {shallow}}}}}'
    _assert_error(acme.post("/v1/jobs", content=body, headers={"content-type": "application/json"}), 422,
                  "invalid_params")
    assert _counts(acme) == before


def test_error_messages_cut_what_they_echo(acme):
    response = acme.get("/v1/jobs/" + "x" * 5000)
    _assert_error(response, 404, "job_not_found")
    assert len(response.json()["error"]["message"]) < 100


def test_malformed_json_body(acme):
    response = acme.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    _assert_error(response, 422, "invalid_request")


def test_multipart_shortcut_validates_every_file_before_storing_any(acme):
    before = _counts(acme)
    files = [
        ("image", ("a.png", IMAGE)),
        ("mask", ("m.png", MASK)),
        ("normal", ("n1.png", IMAGE)),
        ("normal", ("n2.txt", b"not an image")),
    ]
    _assert_error(acme.post("/v1/jobs/generate", files=files, data={"method": "draem"}), 415, "unsupported_image_type")
    files[-1] = ("normal", ("n2.png", IMAGE))
    _assert_error(
        acme.post("/v1/jobs/generate", files=files, data={"method": "draem", "params": "{oops"}), 422, "invalid_params"
    )
    _assert_error(
        acme.post("/v1/jobs/generate", files=files, data={"method": "draem", "params": json.dumps({"x": 1})}),
        422,
        "invalid_params",
    )
    _assert_error(acme.post("/v1/jobs/generate", files=files, data={"method": "nope"}), 422, "unknown_method")
    assert _counts(acme) == before


def test_unknown_job_and_unknown_route(acme):
    _assert_error(acme.get("/v1/jobs/" + "0" * 32), 404, "job_not_found")
    _assert_error(acme.delete("/v1/jobs/" + "0" * 32), 404, "job_not_found")
    _assert_error(acme.get("/v1/nothing-here"), 404, "not_found")


@pytest.mark.parametrize(
    "headers,code",
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer wrong"}, "invalid_api_key"),
        ({"Authorization": "Basic a2V5"}, "missing_api_key"),
    ],
)
def test_missing_or_wrong_key(api_url, headers, code):
    import httpx

    _assert_error(httpx.get(api_url + "/v1/jobs", headers=headers), 401, code)
    _assert_error(
        httpx.post(
            api_url + "/v1/exemplars", headers=headers, files={"image": ("a.png", IMAGE)}, data={"product": "x"}
        ),
        401,
        code,
    )


def _with_orientation(array: np.ndarray, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_exif_orientation_is_applied_to_images_and_masks(acme, service_env):
    """A phone JPEG stored sideways with Orientation 6 ("rotate 90 degrees clockwise to view"): the
    service keeps it upright, and a mask drawn on the upright view matches it, with or without
    its own EXIF."""
    storage = Path(service_env["STORAGE_URL"].removeprefix("file://"))
    upright = product_image(80, 64)  # 64 wide, 80 tall as seen
    upright[:10, :10] = 255  # a mark in the top-left corner of the upright view
    sideways = np.rot90(upright, 1)  # stored as the camera took it: 80 wide, 64 tall
    mask = defect_mask(80, 64)
    for image, mask_bytes in [
        (_with_orientation(sideways, "JPEG", 6), png_bytes(mask)),
        (png_bytes(upright), _with_orientation(np.rot90(mask, 1).copy(), "PNG", 6)),
    ]:
        response = upload(acme, image, mask_bytes, defect="dent", name="phone.jpg")
        assert response.status_code == 201, response.text
        record = response.json()
        assert (record["width"], record["height"]) == (64, 80)
        stored = np.asarray(Image.open(storage / "exemplars" / record["id"] / "image.png"))
        assert stored[:10, :10].mean() > 200 and stored[-10:, -10:].mean() < 200
        stored_mask = np.asarray(Image.open(storage / "exemplars" / record["id"] / "mask.png"))
        assert np.array_equal(stored_mask > 0, mask > 0)
