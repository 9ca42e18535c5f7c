"""The OpenAPI document declares the Bearer scheme on every protected route, and /docs and /redoc
load every file they need from the service itself, not a CDN."""

import re

import httpx

HEALTH = {"/healthz", "/readyz"}


def test_every_protected_route_declares_the_bearer_scheme(api_url):
    document = httpx.get(api_url + "/openapi.json").json()
    [(name, scheme)] = document["components"]["securitySchemes"].items()
    assert scheme["type"] == "http" and scheme["scheme"].lower() == "bearer"
    operations = [(path, method, op) for path, ops in document["paths"].items() for method, op in ops.items()]
    assert len([o for o in operations if o[0].startswith("/v1/")]) >= 18
    for path, method, operation in operations:
        if path in HEALTH:
            assert "security" not in operation, path
        else:
            assert operation.get("security") == [{name: []}], f"{method.upper()} {path} declares no key"


def test_the_additions_are_documented(api_url):
    document = httpx.get(api_url + "/openapi.json").json()
    paths = document["paths"]
    submit = paths["/v1/jobs"]["post"]
    assert "Idempotency-Key" in [p["name"] for p in submit["parameters"]]
    assert "callback_url" in document["components"]["schemas"]["JobCreate"]["properties"]
    assert "callback" in document["components"]["schemas"]["Job"]["properties"]
    for path in ("/v1/jobs", "/v1/exemplars", "/v1/datasets", "/v1/jobs/{job_id}/artifacts"):
        assert {"limit", "cursor"} <= {p["name"] for p in paths[path]["get"]["parameters"]}, path
    for path in ("/v1/exemplars", "/v1/datasets", "/v1/jobs/generate"):
        assert "Idempotency-Key" in [p["name"] for p in paths[path]["post"]["parameters"]], path
    assert "delete" in paths["/v1/exemplars/{exemplar_id}"] and "delete" in paths["/v1/datasets/{dataset_id}"]
    assert {"/v1/exemplars/{exemplar_id}/image", "/v1/exemplars/{exemplar_id}/mask"} <= set(paths)
    assert "purge" in [p["name"] for p in paths["/v1/jobs/{job_id}"]["delete"]["parameters"]]
    export = [p for p in paths["/v1/jobs/{job_id}/export"]["get"]["parameters"] if p["name"] == "format"][0]
    assert set(export["schema"]["enum"]) == {"mvtec", "coco", "yolo"}


def test_docs_pages_load_their_assets_from_the_service(api_url):
    for page in ("/docs", "/redoc"):
        html = httpx.get(api_url + page).text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        assert assets, page
        for asset in assets:
            assert asset.startswith("/"), f"{page} loads {asset} from elsewhere"
            response = httpx.get(api_url + asset)
            assert response.status_code == 200 and len(response.content) > 0, asset
        assert "cdn." not in html and "googleapis" not in html, page
        assert "default-src 'self'" in httpx.get(api_url + page).headers["content-security-policy"]
