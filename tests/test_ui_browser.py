"""The web page in a real headless Chromium, against the real service: Redis, a Celery worker and
the API as a uvicorn process (tests/conftest.py), with two tenants' keys configured.

Each test drives the page as a person would (the key prompt, drag and drop, the job form, the
gallery, the large view, the evaluate report) and checks what the page shows against what the
API says. Screenshots of the main views go to .pytest_cache/ui/ for a person to look at. Every
test ends with no console errors (less the ones its scenario causes on purpose, such as the 401
of a wrong key).
"""

import base64
import re
import secrets
import zipfile

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.browser import console_errors, screenshot, start_chromium, stop_chromium
from tests.conftest import TENANT_KEYS, client_for, defect_mask, png_bytes, product_image, upload, wait_for_job

pytestmark = pytest.mark.timeout(300)
WAIT = 30


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    yield driver
    stop_chromium(driver)


def wait(driver, condition, timeout=WAIT, what="the page"):
    # The page re-renders what it polls (a job's progress), so an element found may be replaced
    # before it is read: look again.
    return WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    ).until(lambda d: condition(d), message=f"waiting for {what}")


def find(driver, selector):
    return driver.find_element(By.CSS_SELECTOR, selector)


def find_all(driver, selector):
    return driver.find_elements(By.CSS_SELECTOR, selector)


def enter_key(driver, key):
    field = find(driver, "#api-key")
    field.clear()
    field.send_keys(key, Keys.ENTER)


def sign_in(driver, api_url, tenant):
    """A fresh tab's state (no key), then the key typed into the page's prompt."""
    driver.get(f"{api_url}/ui/jobs")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{api_url}/ui/jobs")
    wait(driver, lambda d: find_all(d, "#api-key"), what="the key prompt")
    enter_key(driver, TENANT_KEYS[tenant])
    wait(driver, lambda d: find_all(d, "table.jobs[data-loaded]"), what="the jobs view")
    console_errors(driver)  # start each scenario with an empty log


def natural_sizes(driver, selector):
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(i => [i.naturalWidth, i.naturalHeight])", selector
    )


def all_loaded(driver, selector, count=None):
    sizes = natural_sizes(driver, selector)
    return (count is None or len(sizes) == count) and sizes and all(w > 0 and h > 0 for w, h in sizes)


def drop_files(driver, selector, files: dict[str, bytes]):
    """Drop files on an element the way a browser does: a DataTransfer on dragover and drop events."""
    driver.execute_script(
        """
        const [selector, files] = arguments;
        const transfer = new DataTransfer();
        for (const [name, b64] of files) {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          transfer.items.add(new File([bytes], name, {type: "image/png"}));
        }
        const zone = document.querySelector(selector);
        for (const type of ["dragenter", "dragover", "drop"]) {
          zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }
        """,
        selector,
        [[name, base64.b64encode(data).decode()] for name, data in files.items()],
    )


def painted_pixels(driver, selector):
    """Non-transparent pixels of the canvas at `selector` (a mask overlay)."""
    return driver.execute_script(
        """
        const canvas = document.querySelector(arguments[0]);
        if (!canvas || canvas.hidden || !canvas.width) return 0;
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let painted = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] > 0) painted += 1;
        return painted;
        """,
        selector,
    )


def click_mask_mode(driver, mode):
    find(driver, f'#mask-mode input[value="{mode}"]').click()


def test_key_prompt_and_a_wrong_key(browser, api_url):
    browser.get(f"{api_url}/ui")
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{api_url}/ui/jobs")
    wait(browser, lambda d: find_all(d, "#api-key"), what="the key prompt")
    assert "API key" in find(browser, "h1").text
    assert browser.switch_to.active_element == find(browser, "#api-key")  # focused, ready to type
    screenshot(browser, "key-prompt")

    enter_key(browser, "not-a-key")
    wait(browser, lambda d: "not accepted" in find(d, "#api-key-error").text, what="the wrong-key message")
    message = find(browser, "#api-key-error").text
    assert "invalid_api_key" in message and "the API key is not valid" in message
    assert browser.execute_script("return sessionStorage.getItem('synth.apiKey')") is None
    screenshot(browser, "wrong-key")
    # The one console error is the browser's own note of the 401 the wrong key got.
    assert console_errors(browser, allowed=("401",)) == []

    enter_key(browser, TENANT_KEYS["acme"])
    wait(browser, lambda d: find_all(d, "table.jobs"), what="the jobs view")
    assert browser.execute_script("return sessionStorage.getItem('synth.apiKey')") == TENANT_KEYS["acme"]
    assert browser.current_url.endswith("/ui/jobs")
    assert console_errors(browser) == []


def test_upload_submit_watch_and_browse_a_draem_job(browser, api_url, acme, tmp_path):
    sign_in(browser, api_url, "acme")
    # The form shows the last product named in this browser; with none, every product's uploads,
    # which in this session's service include exemplars other tests lost from storage on purpose.
    product = f"ui{secrets.token_hex(3)}"
    browser.execute_script("localStorage.setItem('synth.product', arguments[0])", product)
    find(browser, 'a[data-nav="new"]').click()
    wait(browser, lambda d: find_all(d, "#method option"), what="the job form")
    find(browser, "#product").clear()
    find(browser, "#product").send_keys(product)

    # A defect exemplar dropped as two files (the one named ..._mask is the mask), then uploaded.
    drop_files(browser, "#drop-exemplar", {
        "scratch_mask.png": png_bytes(defect_mask(96, 128)), "scratch.png": png_bytes(product_image(96, 128)),
    })
    assert browser.execute_script("return document.querySelector('#exemplar-mask').files[0].name") == "scratch_mask.png"
    assert find(browser, "#defect").get_attribute("value") == "scratch"
    find(browser, "#upload-exemplar").click()
    wait(browser, lambda d: "Uploaded" in find(d, "#exemplar-status").text, what="the exemplar upload")
    # Normal images: three chosen with the file input, one dropped.
    paths = []
    for seed in range(3):
        path = tmp_path / f"good_{seed}.png"
        path.write_bytes(png_bytes(product_image(96, 128, seed=10 + seed)))
        paths.append(str(path))
    find(browser, "#normal-files").send_keys("\n".join(paths))
    drop_files(browser, "#drop-normals", {"good_3.png": png_bytes(product_image(96, 128, seed=13))})
    wait(browser, lambda d: len(find_all(d, "#normal-status li.ok")) == 4, what="four normal uploads")
    wait(browser, lambda d: find(d, "#normal-count").text == "(4 of 4 selected)", what="the normals picked")
    assert find(browser, "#exemplar-count").text == "(1 of 1 selected)"
    wait(browser, lambda d: all_loaded(d, "#normal-picker img", 4), what="the normal thumbnails")
    uploaded = {e["id"] for e in acme.get("/v1/exemplars", params={"product": product}).json()["items"]}
    picked = {box.get_attribute("value") for box in find_all(browser, ".picker input:checked")}
    assert picked == uploaded and len(uploaded) == 5

    # The API's errors appear next to the field they name, and nothing is created.
    jobs_before = len(acme.get("/v1/jobs", params={"limit": 1000}).json()["items"])
    Select(find(browser, "#method")).select_by_value("draem")
    find(browser, "#count").clear()
    find(browser, "#count").send_keys("0")
    find(browser, "#submit-job").click()
    wait(browser, lambda d: find(d, "#count-error").text, what="the count error")
    assert "greater than or equal to 1" in find(browser, "#count-error").text
    assert find(browser, "#count").get_attribute("aria-invalid") == "true"
    assert browser.switch_to.active_element == find(browser, "#count")
    find(browser, "#count").clear()
    find(browser, "#count").send_keys("24")
    find(browser, "#seed").send_keys("11")
    Select(find(browser, "#mask-source")).select_by_value("exemplar")
    opacity_high = find(browser, "#param-opacity-1")
    opacity_high.clear()
    opacity_high.send_keys("2")
    find(browser, "#submit-job").click()
    wait(browser, lambda d: find(d, '[data-error-for="opacity"]').text, what="the opacity error")
    assert "opacity must lie in (0, 1]" in find(browser, '[data-error-for="opacity"]').text
    assert find(browser, "#count-error").text == ""
    assert "invalid_params" in find(browser, "#form-error").text
    screenshot(browser, "new-job-errors")
    assert len(acme.get("/v1/jobs", params={"limit": 1000}).json()["items"]) == jobs_before
    # The browser notes the two refused submits (422) in the console; nothing else is there.
    assert console_errors(browser, allowed=("status of 422",)) == []

    opacity_high.clear()
    opacity_high.send_keys("1")
    find(browser, "#submit-job").click()
    wait(browser, lambda d: re.search(r"/ui/jobs/[0-9a-f]{32}$", d.current_url), what="the job page")
    job_id = browser.current_url.rsplit("/", 1)[1]
    job = acme.get(f"/v1/jobs/{job_id}").json()
    assert (job["method"], job["count"], job["seed"], job["masks"]["source"]) == ("draem", 24, 11, "exemplar")
    assert job["params"]["opacity"] == [0.2, 1.0] and set(job["normals"]) | set(job["exemplars"]) == uploaded

    # The progress bar reaches 100% and the grid shows every pair.
    seen = set()

    def finished(driver):
        value, status = driver.execute_script(
            "return [document.querySelector('.head-progress progress')?.value,"
            " document.querySelector('.head-status')?.textContent]")
        if value is not None:
            seen.add(int(value))
        return status == "succeeded" and 100 in seen

    wait(browser, finished, timeout=60, what="the job to succeed")
    assert max(seen) == 100
    wait(browser, lambda d: all_loaded(d, ".cell img", 24), what="24 thumbnails")
    captions = [c.text for c in find_all(browser, ".cell .caption")]
    assert captions == [f"#{i}" for i in range(24)]
    assert find(browser, ".page-info").text == "pairs 0–23 of 24"
    assert natural_sizes(browser, ".cell img")[0] == [128, 96]  # a thumbnail: the pair is smaller than 256 px

    # Downloads: the MVTec zip (fetched with the key), and every file listed.
    find(browser, "#download-zip").click()
    zips = wait(browser, lambda d: list(d.download_dir.glob("*.zip")), what="the MVTec zip download")
    with zipfile.ZipFile(zips[0]) as archive:
        names = set(archive.namelist())
    assert {f"test/scratch/{i}.png" for i in range(24)} <= names
    assert {f"ground_truth/scratch/{i}_mask.png" for i in range(24)} <= names
    find(browser, "#all-files summary").click()
    wait(browser, lambda d: find_all(d, "#all-files tbody tr"), what="the file list")
    listed = acme.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
    assert len(find_all(browser, "#all-files tbody tr")) == len(listed)
    find(browser, "#all-files summary").click()

    # Mask overlays: an outline by default, a fill, or none.
    wait(browser, lambda d: painted_pixels(d, '.cell[data-index="0"] canvas') > 0, what="the outline")
    outline = painted_pixels(browser, '.cell[data-index="0"] canvas')
    click_mask_mode(browser, "fill")
    wait(browser, lambda d: painted_pixels(d, '.cell[data-index="0"] canvas') > outline, what="the fill")
    click_mask_mode(browser, "off")
    wait(browser, lambda d: all(c.get_attribute("hidden") is not None for c in find_all(d, ".cell canvas")),
         what="overlays hidden")
    click_mask_mode(browser, "outline")
    wait(browser, lambda d: painted_pixels(d, '.cell[data-index="5"] canvas') > 0, what="the outline again")
    screenshot(browser, "gallery")

    # The large view: normal, synthetic and mask side by side, and the pair's manifest entry.
    manifest = acme.get(f"/v1/jobs/{job_id}/artifacts/jobs/{job_id}/manifest.json").json()
    find(browser, '.cell[data-index="3"]').click()
    wait(browser, lambda d: d.execute_script("return document.querySelector('dialog.pair-view').open"),
         what="the large view")
    wait(browser, lambda d: all_loaded(d, "dialog .panel img", 3), what="the three images")
    assert natural_sizes(browser, "dialog .panel img") == [[128, 96]] * 3  # full size, not thumbnails
    entry = manifest["pairs"][3]
    assert find(browser, '[data-field="seed"]').text == str(entry["seed"])
    assert find(browser, '[data-field="source normal"]').text == entry["normal"]
    assert "pair=3" in browser.current_url
    wait(browser, lambda d: painted_pixels(d, "dialog canvas") > 0, what="the large view's outline")
    screenshot(browser, "pair-view")
    find(browser, "dialog.pair-view").send_keys(Keys.ARROW_RIGHT)
    wait(browser, lambda d: find(d, "#pair-title").text.startswith("Pair #4"), what="the next pair")
    wait(browser, lambda d: find(d, '[data-field="seed"]').text == str(manifest["pairs"][4]["seed"]),
         what="the next pair's entry")
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait(browser, lambda d: not d.execute_script("return document.querySelector('dialog.pair-view').open"),
         what="the large view to close")
    # The dialog's close event comes a moment later: it takes ?pair= out and puts focus on the grid.
    wait(browser, lambda d: "pair=" not in d.current_url, what="the URL without the pair")
    wait(browser, lambda d: d.switch_to.active_element.get_attribute("data-index") == "4", what="focus on the grid")
    browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    assert browser.switch_to.active_element.get_attribute("data-index") == "5"
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait(browser, lambda d: find(d, "#pair-title").text.startswith("Pair #5"), what="Enter to open a pair")
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    assert console_errors(browser) == []


@pytest.fixture(scope="module")
def many_pairs(acme):
    """A job with more pairs than one page of the grid holds."""
    anomaly = upload(acme, png_bytes(product_image(48, 64)), png_bytes(defect_mask(48, 64)), defect="pit").json()
    normal = upload(acme, png_bytes(product_image(48, 64, seed=1))).json()
    job_id = acme.post("/v1/jobs", json={"kind": "generate", "method": "cutpaste", "count": 130,
                                         "exemplars": [anomaly["id"]], "normals": [normal["id"]],
                                         "masks": {"source": "exemplar"}}).json()["id"]
    assert wait_for_job(acme, job_id, timeout=120)["status"] == "succeeded"
    return job_id


def test_a_large_job_is_paged_and_loads_only_what_is_on_screen(browser, api_url, many_pairs):
    sign_in(browser, api_url, "acme")
    browser.get(f"{api_url}/ui/jobs/{many_pairs}")
    wait(browser, lambda d: len(find_all(d, ".cell")) == 100, what="the first page")
    wait(browser, lambda d: all_loaded(d, '.cell[data-index="0"] img'), what="the first thumbnail")
    thumbs = browser.execute_script(
        "return performance.getEntriesByType('resource').filter(e => /thumbs\\/pit\\/\\d+\\.jpg/.test(e.name)).length")
    assert 0 < thumbs < 100  # only the rows on screen (and just below) were fetched
    find(browser, ".pager button:last-child").click()
    wait(browser, lambda d: len(find_all(d, ".cell")) == 30, what="the second page")
    assert "page=2" in browser.current_url
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")  # the rest load as they show
    wait(browser, lambda d: all_loaded(d, ".cell img", 30), what="the second page's thumbnails")
    assert [c.text for c in find_all(browser, ".cell .caption")][:2] == ["#100", "#101"]
    browser.refresh()  # a deep link to page 2
    wait(browser, lambda d: len(find_all(d, ".cell")) == 30, what="page 2 after a reload")
    assert console_errors(browser) == []


def test_tablet_layout_and_methods(browser, api_url, acme, many_pairs):
    sign_in(browser, api_url, "acme")
    browser.set_window_size(820, 1180)  # an iPad Air held upright
    try:
        for path, name in ((f"/ui/jobs/{many_pairs}", "tablet-gallery"), ("/ui/new", "tablet-new-job"),
                           ("/ui/jobs", "tablet-jobs")):
            browser.get(api_url + path)
            wait(browser, lambda d: find_all(d, ".cell img[src], #method option, table.jobs tbody tr"),
                 what=f"{path} on a tablet")
            overflow = browser.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0, f"{path} scrolls sideways on a tablet by {overflow} px"
            screenshot(browser, name)
    finally:
        browser.set_window_size(1366, 900)
    browser.get(f"{api_url}/ui/methods")
    wait(browser, lambda d: find_all(d, "#method-draem .schema-form"), what="the methods")
    methods = {m["name"]: m for m in acme.get("/v1/methods").json()["items"]}
    for name, method in methods.items():
        card = find(browser, f"#method-{name}")
        assert ("not available" in card.text) == (not method["available"]), name
        if method["reason"]:
            assert method["reason"] in card.text
        fields = {f.get_attribute("data-param") for f in card.find_elements(By.CSS_SELECTOR, ".field")}
        assert fields == set(method["params_schema"]["properties"]), name
    assert find(browser, "#method-draem-texture").tag_name == "select"
    # A diffusion method lists its paper's components, and `ablate` offers them as checkboxes.
    cadiff = find(browser, "#method-cadiff")
    cadiff.find_element(By.CSS_SELECTOR, "details.components summary").click()
    listed = [code.text for code in cadiff.find_elements(By.CSS_SELECTOR, "details.components dt code")]
    assert listed == [c["name"] for c in methods["cadiff"]["components"]]
    boxes = cadiff.find_elements(By.CSS_SELECTOR, "[data-param=ablate] input[type=checkbox]")
    assert [box.get_attribute("value") for box in boxes] == listed
    # CADiff's train_steps is decided from the training set unless given: an empty number field.
    assert find(browser, "#method-cadiff-train_steps").get_attribute("type") == "number"
    assert find(browser, "#method-cadiff-train_steps").get_attribute("value") == ""
    browser.execute_script("arguments[0].scrollIntoView()", cadiff)
    screenshot(browser, "methods")
    browser.execute_script("window.scrollTo(0, 0)")
    # The methods form starts a job form with the chosen parameters.
    Select(find(browser, "#method-cutpaste-variant")).select_by_value("scar")
    find(browser, "#method-cutpaste button.primary").click()
    wait(browser, lambda d: find_all(d, "#param-variant"), what="the job form")
    assert Select(find(browser, "#method")).first_selected_option.get_attribute("value") == "cutpaste"
    assert Select(find(browser, "#param-variant")).first_selected_option.get_attribute("value") == "scar"
    assert console_errors(browser) == []


def test_the_jobs_view_is_live_with_eta_cancel_and_filters(browser, api_url, acme):
    anomaly = upload(acme, png_bytes(product_image(64, 64)), png_bytes(defect_mask(64, 64)), defect="pit").json()
    normal = upload(acme, png_bytes(product_image(64, 64, seed=2))).json()
    sign_in(browser, api_url, "acme")
    job_id = acme.post("/v1/jobs", json={"kind": "generate", "method": "draem", "count": 10000,
                                         "exemplars": [anomaly["id"]], "normals": [normal["id"]]}).json()["id"]
    row = f'tr[data-job="{job_id}"]'
    try:
        wait(browser, lambda d: find_all(d, row), what="the new job to appear without a reload")
        wait(browser, lambda d: find(d, row).get_attribute("data-status") == "running", what="the job to run")
        wait(browser, lambda d: re.search(r"≈ .+ left", find(d, f"{row} .eta").text), what="an ETA")
        assert int(find(browser, f"{row} progress").get_attribute("value")) >= 0
        assert "generating" in find(browser, f"{row} .progress-text").text
        screenshot(browser, "jobs-live")

        cancel = find(browser, f"{row} button[data-cancel]")
        cancel.click()
        assert find(browser, f"{row} button[data-cancel]").text == "Confirm cancel"
        find(browser, f"{row} button[data-cancel]").click()
        wait(browser, lambda d: find(d, row).get_attribute("data-status") == "cancelled", what="the cancel")
        assert wait_for_job(acme, job_id)["status"] == "cancelled"
    finally:  # never leave 10,000 pairs running for the tests after this one
        acme.delete(f"/v1/jobs/{job_id}")
    Select(find(browser, "#filter-status")).select_by_value("cancelled")
    wait(browser, lambda d: "status=cancelled" in d.current_url and all(
        r.get_attribute("data-status") == "cancelled" for r in find_all(d, "tr[data-job]")), what="the filter")
    assert find_all(browser, row)
    Select(find(browser, "#filter-kind")).select_by_value("evaluate")
    wait(browser, lambda d: not find_all(d, row), what="the kind filter")
    browser.refresh()  # filters live in the URL
    wait(browser, lambda d: find_all(d, "table.jobs[data-loaded]"), what="the jobs view again")
    assert Select(find(browser, "#filter-kind")).first_selected_option.get_attribute("value") == "evaluate"
    assert console_errors(browser) == []


def test_an_evaluate_report_with_its_plots(browser, api_url, acme, evaluated):
    job, _ = evaluated
    assert job["status"] == "succeeded", job
    evaluate = job["id"]
    sign_in(browser, api_url, "acme")
    browser.get(f"{api_url}/ui/jobs/{evaluate}")
    wait(browser, lambda d: find_all(d, "#metrics-table tbody tr"), what="the metrics table")
    metrics = acme.get(f"/v1/jobs/{evaluate}/artifacts/jobs/{evaluate}/metrics.json").json()
    rows = {r.get_attribute("data-arm"): r for r in find_all(browser, "#metrics-table tbody tr")}
    assert set(rows) == set(metrics["arms"]) and len(rows) == 3
    for column, read, higher in (("pixel_auroc", lambda a: a["segmentation"]["overall"]["pixel_auroc"], True),
                                 ("leakage", lambda a: (a["mask_fidelity"] or {}).get("leakage"), False)):
        values = {name: read(arm) for name, arm in metrics["arms"].items() if read(arm) is not None}
        best = (max if higher else min)(values.values())
        best_cell = f'td.best[data-column="{column}"]'
        marked = {name for name, r in rows.items() if r.find_elements(By.CSS_SELECTOR, best_cell)}
        assert marked == {name for name, v in values.items() if abs(v - best) < 1e-12}, column
    artifacts = [a["key"] for a in acme.get(f"/v1/jobs/{evaluate}/artifacts").json()["items"]]
    examples = [k for k in artifacts if k.rsplit("/", 1)[1].startswith("examples_")]
    wait(browser, lambda d: all_loaded(d, "img.plot", 4 + len(examples)), what="the plots")
    screenshot(browser, "evaluate")

    # report.html opens alone (a blob here, as it would from a download or S3) with its plots.
    tabs = browser.window_handles
    find(browser, "#open-report").click()
    wait(browser, lambda d: len(d.window_handles) == len(tabs) + 1, what="the report's tab")
    browser.switch_to.window([t for t in browser.window_handles if t not in tabs][0])
    try:
        wait(browser, lambda d: d.current_url.startswith("blob:") and find_all(d, "img"), what="the report")
        wait(browser, lambda d: all_loaded(d, "img"), what="the report's plots")
        assert len(find_all(browser, "img")) >= 5
        screenshot(browser, "report-html")
    finally:
        browser.close()
        browser.switch_to.window(tabs[0])
    assert console_errors(browser) == []


def test_tenant_b_never_sees_tenant_a(browser, api_url, acme, globex):
    def small_job(client, product):
        anomaly = upload(client, png_bytes(product_image(48, 48)), png_bytes(defect_mask(48, 48)), product=product,
                         defect="pit").json()
        normal = upload(client, png_bytes(product_image(48, 48, seed=4)), product=product).json()
        job_id = client.post("/v1/jobs", json={"kind": "generate", "method": "draem", "count": 2,
                                               "exemplars": [anomaly["id"]], "normals": [normal["id"]]}).json()["id"]
        assert wait_for_job(client, job_id)["status"] == "succeeded"
        return job_id, {anomaly["id"], normal["id"]}

    # Both tenants use the same product name: only the key tells their uploads apart.
    secret_job, _ = small_job(acme, "shared")
    own_job, own_exemplars = small_job(globex, "shared")
    acme_jobs = {j["id"] for j in acme.get("/v1/jobs", params={"limit": 1000}).json()["items"]}
    acme_exemplars = {e["id"] for e in acme.get("/v1/exemplars").json()["items"]}

    sign_in(browser, api_url, "acme")
    wait(browser, lambda d: find_all(d, f'tr[data-job="{secret_job}"]'), what="acme's own job")
    find(browser, "#forget-key").click()  # the key is gone from the tab: the prompt is back
    wait(browser, lambda d: find_all(d, "#api-key"), what="the key prompt")
    assert browser.execute_script("return sessionStorage.getItem('synth.apiKey')") is None
    enter_key(browser, TENANT_KEYS["globex"])
    wait(browser, lambda d: find_all(d, f'tr[data-job="{own_job}"]'), what="globex's own job")
    shown = {r.get_attribute("data-job") for r in find_all(browser, "tr[data-job]")}
    assert not shown & acme_jobs
    screenshot(browser, "tenant-b-jobs")

    browser.get(f"{api_url}/ui/jobs/{secret_job}")
    wait(browser, lambda d: find_all(d, ".error-box"), what="the not-found message")
    assert "There is no job" in find(browser, ".error-box").text and "job_not_found" in find(browser, ".error-box").text
    assert not find_all(browser, ".cell, dl.facts, .summary-line")  # nothing of the job itself
    screenshot(browser, "tenant-b-deep-link")
    browser.get(f"{api_url}/ui/new")
    wait(browser, lambda d: find_all(d, "#method option"), what="the job form")
    find(browser, "#product").clear()
    find(browser, "#product").send_keys("shared")
    wait(browser, lambda d: len(find_all(d, ".pick")) == 2, what="globex's two uploads")
    picked = {item.get_attribute("data-id") for item in find_all(browser, ".pick")}
    assert picked == own_exemplars and not picked & acme_exemplars
    assert console_errors(browser, allowed=("404",)) == []


def test_on_s3_the_page_uses_presigned_urls_as_they_are(browser, s3_service_env, s3_api_url):
    client = client_for(s3_api_url, "acme")
    anomaly = upload(client, png_bytes(product_image(64, 96, rgb=True)), png_bytes(defect_mask(64, 96)),
                     defect="stain").json()
    normal = upload(client, png_bytes(product_image(64, 96, rgb=True, seed=9))).json()
    job_id = client.post("/v1/jobs", json={"kind": "generate", "method": "cutpaste", "count": 3,
                                           "exemplars": [anomaly["id"]], "normals": [normal["id"]],
                                           "masks": {"source": "exemplar"}}).json()["id"]
    assert wait_for_job(client, job_id)["status"] == "succeeded"

    sign_in(browser, s3_api_url, "acme")
    browser.get(f"{s3_api_url}/ui/jobs/{job_id}?pair=1")
    wait(browser, lambda d: all_loaded(d, "dialog .panel img", 3), what="the large view on S3")
    normal_src, synthetic_src, mask_src = browser.execute_script(
        "return [...document.querySelectorAll('dialog .panel img')].map(i => i.src)")
    public = s3_service_env["S3_PUBLIC_ENDPOINT_URL"]
    assert synthetic_src.startswith(public) and "Signature" in synthetic_src
    assert mask_src.startswith(public)
    assert normal_src.startswith("blob:")  # an exemplar comes through the API, with the key
    browser.find_element(By.ID, "pair-close").click()
    wait(browser, lambda d: all_loaded(d, ".cell img", 3), what="the thumbnails, through the API")
    assert console_errors(browser) == []
