"""CADiff through the API with a real worker: one fine-tune on two defect types of one product, then
generate jobs for each defect; the API's checks of products and defects; a killed fine-tune
resumes from its checkpoint.

The model is the tiny random-weight SD of tests/conftest.py, loaded by the worker's production loader."""

import io

import numpy as np
import torch
from PIL import Image, ImageFilter

from tests.conftest import client_for, make_env, png_bytes, product_image, upload, wait_for_job
from tests.processes import start_api, start_redis, start_worker, wait_until

TINY = {"resolution": 64, "num_inference_steps": 4, "guidance_scale": 3.0}
BOXES = {"crack": [(8, 16, 40, 26), (20, 30, 56, 40)], "pit": [(30, 12, 44, 26), (14, 34, 28, 48)]}


def box(height, width, rectangle):
    mask = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = rectangle
    mask[y0:y1, x0:x1] = 255
    return mask


def tile_exemplars(client):
    """{defect: [exemplar id, ...]}: two exemplars of each defect type on product "tile"."""
    return {
        defect: [upload(client, png_bytes(product_image(64, 64, rgb=True, seed=10 * k + i)),
                        png_bytes(box(64, 64, rectangle)), product="tile", defect=defect).json()["id"]
                 for i, rectangle in enumerate(rectangles)]
        for k, (defect, rectangles) in enumerate(BOXES.items())
    }


def finetune_body(exemplar_ids, normal_ids=(), **params):
    return {"kind": "finetune", "method": "cadiff", "seed": 3, "exemplars": list(exemplar_ids),
            "normals": list(normal_ids), "params": {**TINY, "train_steps": 4, "batch_size": 2, **params}}


def test_finetune_on_two_defect_types_then_generate_each(acme):
    methods = {m["name"]: m for m in acme.get("/v1/methods").json()["items"]}
    assert methods["cadiff"]["available"] and methods["cadiff"]["family"] == "fine-tune"
    exemplars = tile_exemplars(acme)
    normal = upload(acme, png_bytes(product_image(64, 64, rgb=True, seed=7)), product="tile").json()["id"]
    response = acme.post("/v1/jobs", json=finetune_body(exemplars["crack"] + exemplars["pit"], [normal]))
    assert response.status_code == 202, response.text
    job = wait_for_job(acme, response.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    assert job["defects"] == ["crack", "pit"] and job["result"]["defects"] == ["crack", "pit"]
    assert job["result"]["ablated"] == [] and job["result"]["train_steps"] == 4
    diagnostics = job["result"]["diagnostics"]
    assert set(diagnostics["losses"]) == {"total", "caldm", "loc_unweighted", "contrastive_unweighted"}
    assert diagnostics["control_to_skip_norm"]["mean"] > 0 and diagnostics["token_shift"]["mean"] > 0
    keys = {a["key"] for a in acme.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
    adapter = f"adapters/{job['id']}/"
    assert {adapter + name for name in ("learned_embeds.safetensors", "saim.safetensors", "adapter_config.json",
                                        "controlnet/config.json")} <= keys

    sources = {s: product_image(72, 64, rgb=True, seed=s) for s in (21, 22)}
    normals = {upload(acme, png_bytes(image), product="tile").json()["id"]: image for image in sources.values()}
    jobs = {
        # crack: shapes jittered from the crack exemplars (the default source, their defect the default)
        "crack": {"exemplars": exemplars["crack"]},
        # pit: named, in boxes
        "pit": {"defect": "pit", "masks": {"source": "box", "box_area": [0.05, 0.1]}},
    }
    submitted = {}
    for defect, inputs in jobs.items():
        response = acme.post("/v1/jobs", json={"kind": "generate", "method": "cadiff", "adapter": job["id"],
                                               "normals": list(normals), "count": 4, "seed": 5, "params": TINY,
                                               **inputs})
        assert response.status_code == 202, response.text
        submitted[defect] = response.json()["id"]
    for defect, job_id in submitted.items():
        generated = wait_for_job(acme, job_id, timeout=120)
        assert generated["status"] == "succeeded", generated
        assert generated["defect"] == defect
        prefix = f"jobs/{job_id}/"
        items = {a["key"]: a["url"] for a in acme.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
        manifest = acme.get(items[prefix + "manifest.json"]).json()
        assert sorted(p["index"] for p in manifest["pairs"]) == [0, 1, 2, 3]
        for pair in manifest["pairs"]:
            assert pair["defect"] == defect and 0.5 <= pair["intensity"] <= 1.5
            image = np.asarray(Image.open(io.BytesIO(acme.get(items[prefix + pair["image"]]).content)))
            mask = np.asarray(Image.open(io.BytesIO(acme.get(items[prefix + pair["mask"]]).content))) > 0
            source = normals[pair["normal"]]
            assert image.shape == source.shape and mask.any()
            assert not np.array_equal(image[mask], source[mask])
            # outside the mask dilated by the 3 px blend band the pixels are the normal image's
            far = ~np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(7)))
            assert np.array_equal(image[far], source[far])

    # The API's checks, before anything is queued.
    other = upload(acme, png_bytes(product_image(64, 64, seed=8)), png_bytes(box(64, 64, (4, 4, 20, 20))),
                   product="screw", defect="crack").json()["id"]
    response = acme.post("/v1/jobs", json=finetune_body([exemplars["crack"][0], other]))
    assert response.status_code == 422 and response.json()["error"]["code"] == "mixed_products"
    generate = {"kind": "generate", "method": "cadiff", "adapter": job["id"], "normals": list(normals),
                "masks": {"source": "box"}, "params": TINY}
    response = acme.post("/v1/jobs", json={**generate, "defect": "dent"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "unknown_defect"
    assert "crack, pit" in response.json()["error"]["message"]
    response = acme.post("/v1/jobs", json=generate)
    assert response.status_code == 422 and response.json()["error"]["code"] == "defect_required"
    # The paper's whole generated image has no label a pair could carry: a job may only keep the normal's.
    response = acme.post("/v1/jobs", json={**generate, "defect": "pit", "params": {**TINY, "background": "generated"}})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_params"
    assert "'normal'" in response.json()["error"]["message"], response.text


def test_a_killed_finetune_resumes_from_its_checkpoint(service_sd_dir, tmp_path):
    redis_proc, redis_url = start_redis(tmp_path / "redis")
    env = make_env(redis_url, f"file://{tmp_path / 'storage'}", SD_MODEL_DIR=str(service_sd_dir), DEVICE="cpu",
                   OMP_NUM_THREADS="1", FINETUNE_CHECKPOINT_EVERY="3", WORKER_HEARTBEAT="1",
                   JOB_TIME_LIMIT="300", VISIBILITY_TIMEOUT="600")
    api, base = start_api(env, tmp_path / "api.log")
    client = client_for(base, "acme")
    first = start_worker(env, tmp_path / "worker1.log", queues="gpu", name="doomed")
    second = None
    try:
        exemplars = tile_exemplars(client)
        job_id = client.post("/v1/jobs", json=finetune_body(exemplars["crack"] + exemplars["pit"],
                                                            train_steps=15)).json()["id"]

        def past_step_6():
            job = client.get(f"/v1/jobs/{job_id}").json()
            return job if job["progress"]["stage"] == "training" and job["progress"]["done"] >= 7 else None

        wait_until(past_step_6, 90, "the fine-tune to pass step 6")
        first.kill()  # SIGKILL: no chance to ack, requeue or clean up
        checkpoint = tmp_path / "storage" / "jobs" / job_id / "checkpoint" / "training_checkpoint.pt"
        checkpointed = torch.load(checkpoint, weights_only=True)["step"]
        assert checkpointed >= 6 and checkpointed % 3 == 0

        second = start_worker(env, tmp_path / "worker2.log", queues="gpu", name="rescuer")
        training_steps_seen = []

        def finished():
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["progress"]["stage"] == "training":
                training_steps_seen.append(job["progress"]["done"])
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        job = wait_until(finished, 90, "the resumed fine-tune", interval=0.05)
        assert job["status"] == "succeeded", job
        # The rescuer went on from the checkpoint: it never reported a step before it. (The first
        # polls may still show the killed worker's last report, which can be the checkpoint's step.)
        assert training_steps_seen and min(training_steps_seen) >= checkpointed
        keys = {a["key"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
        assert f"adapters/{job_id}/saim.safetensors" in keys
        assert not checkpoint.exists()  # dropped once training is done
    finally:
        for process in (first, second):
            if process is not None:
                process.stop()
        client.close()
        api.stop()
        redis_proc.stop()
