"""Ablations as a feature, through the API with a real worker: every diffusion method lists the
components its paper ablates; `params.ablate` is checked before anything is queued; a fine-tune's
ablation is carried by its adapter into every generate job, and every pair's manifest entry says
what its job ran without.

The model is the tiny random-weight SD of tests/conftest.py, loaded by the worker's production loader."""

import pytest

from models.methods.registry import METHODS
from tests.conftest import png_bytes, product_image, upload, wait_for_job
from tests.test_api_cadiff import TINY, finetune_body, tile_exemplars

DIFFUSION_METHODS = sorted(name for name, spec in METHODS.items() if spec.family != "model-free")


def newest_job(client) -> str | None:
    items = client.get("/v1/jobs", params={"limit": 1}).json()["items"]
    return items[0]["id"] if items else None


@pytest.mark.parametrize("name", DIFFUSION_METHODS)
def test_every_diffusion_method_lists_its_components_and_ablate_takes_exactly_their_names(acme, name):
    method = next(m for m in acme.get("/v1/methods").json()["items"] if m["name"] == name)
    components = method["components"]
    assert components, f"{name} declares no components its paper ablates"
    assert all(c["summary"] and c["acts_in"] in ("generate", "finetune") for c in components)
    ablate = method["params_schema"]["properties"]["ablate"]
    assert ablate["items"]["enum"] == [c["name"] for c in components] and ablate["type"] == "array"


def test_unknown_and_training_only_components_are_refused_before_anything_is_queued(acme):
    exemplars = tile_exemplars(acme)
    before = newest_job(acme)
    response = acme.post("/v1/jobs", json=finetune_body(exemplars["crack"], ablate=["controlnet", "attention"]))
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_params"
    known = [c.name for c in METHODS["cadiff"].components]
    assert all(repr(name) in response.json()["error"]["message"] for name in known), response.text
    response = acme.post("/v1/jobs", json=finetune_body(exemplars["crack"], ablate=["iar", "iar"]))
    assert response.status_code == 422 and "repeated" in response.json()["error"]["message"], response.text
    response = acme.post("/v1/jobs", json=finetune_body(exemplars["crack"], ablate=["controlnet", "ctp_tokens"]))
    assert response.status_code == 422 and "nothing to learn" in response.json()["error"]["message"], response.text
    assert newest_job(acme) == before

    adapter = acme.post("/v1/jobs", json=finetune_body(exemplars["crack"])).json()["id"]
    assert wait_for_job(acme, adapter, timeout=120)["status"] == "succeeded"
    normal = upload(acme, png_bytes(product_image(64, 64, rgb=True, seed=7)), product="tile").json()["id"]
    training_only = [c.name for c in METHODS["cadiff"].components if c.acts_in == "finetune"]
    response = acme.post("/v1/jobs", json={
        "kind": "generate", "method": "cadiff", "adapter": adapter, "normals": [normal], "count": 2,
        "masks": {"source": "box"}, "params": {**TINY, "ablate": training_only[:1]}})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_params"
    assert "only in training" in response.json()["error"]["message"], response.text
    assert newest_job(acme) == adapter


def test_a_finetunes_ablation_reaches_every_pair_of_its_generate_jobs(acme):
    exemplars = tile_exemplars(acme)
    finetune = acme.post("/v1/jobs", json=finetune_body(exemplars["crack"], ablate=["contrastive_loss"]))
    assert finetune.status_code == 202, finetune.text
    job = wait_for_job(acme, finetune.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    assert job["result"]["ablated"] == ["contrastive_loss"]
    config = acme.get(f"/v1/jobs/{job['id']}/artifacts/adapters/{job['id']}/adapter_config.json").json()
    assert config["ablate"] == ["contrastive_loss"]

    normal = upload(acme, png_bytes(product_image(64, 64, rgb=True, seed=8)), product="tile").json()["id"]
    generate = acme.post("/v1/jobs", json={
        "kind": "generate", "method": "cadiff", "adapter": job["id"], "normals": [normal], "count": 2, "seed": 1,
        "masks": {"source": "box"}, "params": {**TINY, "ablate": ["iar"]}})
    assert generate.status_code == 202, generate.text
    generated = wait_for_job(acme, generate.json()["id"], timeout=120)
    assert generated["status"] == "succeeded", generated
    manifest = acme.get(f"/v1/jobs/{generated['id']}/artifacts/jobs/{generated['id']}/manifest.json").json()
    assert manifest["params"]["ablate"] == ["iar"]
    assert [pair["ablated"] for pair in manifest["pairs"]] == [["contrastive_loss", "iar"]] * 2
