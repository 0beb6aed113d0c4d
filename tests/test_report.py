"""Compliance reports: the record they are rendered from, the HTML/PDF in headless Chromium, escaping of
user text, `verify` against tampering, and Ed25519 signatures."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import unicodedata

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pypdf import PdfReader

from safeedit.cli import main
from safeedit.errors import SafeEditError
from safeedit.eval.weights import weight_changes
from safeedit.masks import Mask
from safeedit.record import Record, json_schema, read_record, record_digest
from safeedit.report import find_chromium, render_html, screenshot, verify_run, write_report
from safeedit.runners import run_scenario

HOSTILE_WHAT = 'digit 3 <script>alert("x")</script> <img src=x onerror=alert(2)>'
HOSTILE_WHO = 'Jo "DPO" & <b>bold</b> team'
SCENARIO = {
    "name": "report-test",
    "request": {"what": HOSTILE_WHAT, "requested_by": HOSTILE_WHO, "reason": "consent withdrawn </td></tr>",
                "date": "2026-11-24"},
    "model": {"name": "digits-cnn"},
    "data": {"source": "digits"},
    "forget": {"kind": "class", "label": 3},
    "methods": {"salun": {"ratio": 0.5, "epochs": 1, "lr": 0.03}, "ga": {"epochs": 1, "lr": 0.001}},
    "retrain": {"epochs": 2},
    "criteria": [
        {"check": "salun.ra >= 0%", "why": "always true <i>by construction</i>"},
        "salun.ta >= 101%",  # cannot pass: the verdict must be FAIL
    ],
    "threads": 1,
}
SECTION_IDS = ("verdict", "request", "criteria", "metrics", "done", "evidence", "weights", "files", "configuration",
               "reproduce", "limitations", "obligations", "integrity")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """One scenario run with its report (HTML and PDF), shared read-only; tests that change files copy it."""
    folder = tmp_path_factory.mktemp("report-run")
    scenario_path = folder / "scenario.yaml"
    scenario_path.write_text(yaml.safe_dump(SCENARIO))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAFEEDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        record_path = run_scenario(scenario_path, folder / "run", progress=False)
    write_report(record_path)
    return record_path.parent


@pytest.fixture
def run_copy(run_folder, tmp_path):
    """A private copy of the run; the scenario input is resolved through the recorded working directory."""
    return shutil.copytree(run_folder, tmp_path / "run")


def _record(folder) -> dict:
    return json.loads((folder / "record.json").read_text())


def _write_record(folder, record: dict, rehash: bool = False) -> None:
    if rehash:
        record["integrity"]["sha256"] = record_digest(record)
    (folder / "record.json").write_text(json.dumps(record, indent=2))


# --- the record ---------------------------------------------------------------------------------------------


def test_published_schema_matches_the_record_model():
    from importlib.resources import files

    published = json.loads(files("safeedit.report").joinpath("schema.json").read_text())
    assert published == json_schema(), "regenerate safeedit/report/schema.json from safeedit.record.json_schema()"
    assert published["properties"]["schema"]["const"] == "safeedit.record/2"


def test_record_validates_against_the_published_schema(run_folder):
    from importlib.resources import files

    import jsonschema

    schema = json.loads(files("safeedit.report").joinpath("schema.json").read_text())
    record = read_record(run_folder)
    jsonschema.Draft202012Validator(schema).validate(record)
    broken = copy.deepcopy(record)
    broken["outputs"][0]["sha256"] = "not-a-hash"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(broken)
    broken = copy.deepcopy(record)
    del broken["verdict"]
    with pytest.raises(jsonschema.ValidationError, match="'verdict' is a required property"):
        jsonschema.Draft202012Validator(schema).validate(broken)


def test_record_has_verdict_evidence_and_weight_changes(run_folder):
    record = read_record(run_folder)
    Record.model_validate(record)
    assert record["integrity"]["sha256"] == record_digest(record)
    assert record["verdict"]["passed"] is False
    assert [row["passed"] for row in record["verdict"]["criteria"]] == [True, False]
    for name, result in record["results"].items():
        histogram = result["evidence"]["confidence_histogram"]
        assert len(histogram["edges"]) == len(histogram["forget"]) + 1
        assert sum(histogram["forget"]) == record["data"]["forget"]["count"], name
        assert sum(histogram["test"]) == record["data"]["test"]["count"], name
        roc = result["evidence"]["mia_roc"]["forget_vs_test"]
        assert roc["fpr"][0] == 0 and roc["fpr"][-1] == 1 and roc["tpr"][-1] == 1
        assert np.all(np.diff(roc["tpr"]) >= 0)
    salun, ga = record["results"]["salun"], record["results"]["ga"]
    assert salun["weight_changes"]["changed_outside_mask"] == 0
    assert 0 < salun["weight_changes"]["changed"] <= salun["mask"]["selected"]
    assert ga["weight_changes"]["changed_outside_mask"] is None
    assert ga["weight_changes"]["total"] == salun["mask"]["total"]
    assert "Approximate unlearning" in salun["about"]["limitations"]


def test_weight_changes_counts_bitwise_differences_inside_and_outside_a_mask():
    original = torch.nn.Linear(4, 3)
    edited = copy.deepcopy(original)
    with torch.no_grad():
        edited.weight[0, 0] += 1.0
        edited.weight[2, 3] += 1.0
        edited.bias[1] = edited.bias[1] + 1e-3
    mask = Mask({"weight": torch.zeros(3, 4, dtype=torch.bool).index_put_((torch.tensor([0]), torch.tensor([0])),
                                                                          torch.tensor(True))})
    changes = weight_changes(original, edited, mask)
    assert changes["changed"] == 3 and changes["total"] == 15
    assert changes["changed_outside_mask"] == 2  # weight[2, 3] and the bias (which the mask does not cover)
    assert {layer["name"]: layer["changed"] for layer in changes["layers"]} == {"weight": 2, "bias": 1}
    assert weight_changes(original, original)["changed"] == 0


# --- HTML, PDF, Chromium ------------------------------------------------------------------------------------


def test_html_is_self_contained_and_escapes_user_text(run_folder):
    html = (run_folder / "report.html").read_text()
    for section in SECTION_IDS:
        assert f'<section id="{section}"' in html
    assert "<script" not in html and "onerror=alert" not in html.replace("onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html
    assert "Jo &#34;DPO&#34; &amp; &lt;b&gt;bold&lt;/b&gt; team" in html
    assert "&lt;/td&gt;&lt;/tr&gt;" in html and "&lt;i&gt;by construction&lt;/i&gt;" in html
    # nothing is fetched: no external stylesheets, scripts, fonts or images
    assert not re.search(r'(?:src|href)\s*=\s*"(?!data:|#)', html)
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert html.count('src="data:image/svg+xml;base64,') >= 3


def test_screenshot_in_headless_chromium_shows_the_verdict_first(run_folder, tmp_path):
    assert find_chromium(), "Chromium is required for the report tests: sudo apt-get install chromium"
    png = screenshot(run_folder / "report.html", tmp_path / "first-screen.png", width=900, height=700)
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    fail_red = np.array([0xCF, 0x22, 0x2E])
    red = np.abs(pixels - fail_red).sum(axis=-1) <= 6
    rows = np.flatnonzero(red.sum(axis=1) > 0.5 * pixels.shape[1])  # a full-width red banner
    assert rows.size >= 30, "no verdict banner rendered in the first screen"
    assert rows.min() < 200, f"the verdict banner starts at y={rows.min()}, below the first screen's top"


def test_passing_verdict_renders_green_and_no_criteria_renders_no_verdict(run_folder):
    record = read_record(run_folder)
    verification = verify_run(run_folder)
    passing = copy.deepcopy(record)
    passing["verdict"]["passed"] = True
    assert 'class="verdict pass"' in render_html(passing, run_folder / "record.json", verification, None)
    unjudged = copy.deepcopy(record)
    unjudged["verdict"] = {"passed": None, "criteria": []}
    html = render_html(unjudged, run_folder / "record.json", verification, None)
    assert 'class="verdict none"' in html and "NO VERDICT" in html


def _normalised(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()  # NFKC: PDF ligatures such as "ﬁ"


def test_pdf_has_the_same_sections_and_the_verdict_and_metrics_on_page_one(run_folder):
    html = (run_folder / "report.html").read_text()
    headings = [_normalised(re.sub(r"<[^>]+>", "", h)) for h in re.findall(r"<h2>(.*?)</h2>", html, re.S)]
    assert len(headings) >= 10
    pages = [_normalised(page.extract_text()) for page in PdfReader(run_folder / "report.pdf").pages]
    everything = " ".join(pages)
    for heading in headings:
        assert heading.replace("&#39;", "'") in everything, heading
    first = pages[0]
    assert "FAIL" in first and "1 of 2 criteria" in first
    assert "Results: before, after, reference" in first
    for row in ("before (original model)", "after: salun", "after: ga"):
        assert row in first, row
    assert "<script>" in everything  # the request text is shown, as text


# --- verify -------------------------------------------------------------------------------------------------


def test_verify_passes_on_an_untouched_run(run_copy, capsys):
    assert main(["verify", str(run_copy)]) == 0
    assert "record integrity, verdict, 6 files" in capsys.readouterr().out


def test_verify_names_the_output_whose_byte_changed(run_copy, capsys):
    weights = run_copy / "salun.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert main(["verify", str(run_copy)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("MISMATCH salun.safetensors: SHA-256 mismatch")


def test_verify_reports_a_missing_file(run_copy):
    (run_copy / "salun.mask.safetensors").unlink()
    result = verify_run(run_copy)
    assert not result.ok and result.problems == [result.problems[0]]
    assert result.problems[0].startswith("salun.mask.safetensors: missing (mask")


def test_verify_detects_a_tampered_record(run_copy):
    record = _record(run_copy)
    after = record["results"]["salun"]["metrics"]["after"]
    after["ua"] = 0.25 if after["ua"] != 0.25 else 0.5  # any change at all
    _write_record(run_copy, record)
    problems = verify_run(run_copy / "record.json").problems
    assert len(problems) == 1 and "integrity hash mismatch" in problems[0]


def test_verify_detects_a_verdict_that_does_not_follow_from_the_results(run_copy):
    record = _record(run_copy)
    record["verdict"]["passed"] = True
    _write_record(run_copy, record, rehash=True)  # a careful forger recomputes the hash
    problems = verify_run(run_copy).problems
    assert problems == [f"{run_copy / 'record.json'}: the verdict does not follow from the record's results and "
                        "criteria"]


@pytest.mark.parametrize("page", ["report.html", "report.pdf"])
def test_verify_covers_the_report_pages_an_auditor_reads(run_copy, page, capsys):
    assert main(["verify", str(run_copy)]) == 0
    checked = capsys.readouterr().out.splitlines()[-1]
    assert checked.startswith("files checked: ") and page in checked and "manifest.json" not in checked
    (run_copy / page).write_bytes((run_copy / page).read_bytes() + b" ")
    problems = verify_run(run_copy).problems
    assert len(problems) == 1 and problems[0].startswith(f"{page}: SHA-256 mismatch: manifest.json has")
    (run_copy / page).unlink()
    assert verify_run(run_copy).problems == [f"{page}: missing (listed in manifest.json)"]


def test_verify_names_an_added_file_and_a_manifest_of_another_run(run_copy, tmp_path):
    (run_copy / "notes").mkdir()
    (run_copy / "notes" / "extra.safetensors").write_bytes(b"x")
    assert verify_run(run_copy).problems == ["notes/extra.safetensors: extra file, not in manifest.json"]
    shutil.rmtree(run_copy / "notes")
    manifest = json.loads((run_copy / "manifest.json").read_text())
    (run_copy / "manifest.json").write_text(json.dumps({**manifest, "record_sha256": "0" * 64}))
    assert verify_run(run_copy).problems[0].startswith("manifest.json: written for another record")


def test_without_a_manifest_only_the_records_own_files_may_be_there(run_copy):
    (run_copy / "manifest.json").unlink()
    problems = verify_run(run_copy).problems
    assert sorted(p.split(":")[0] for p in problems) == ["report.html", "report.pdf"]
    assert all("extra file, not named by the record" in p for p in problems)


def test_verify_rejects_a_file_that_is_not_a_record(run_copy):
    (run_copy / "record.json").write_text('{"schema": "something/else"}')
    assert "is not 'safeedit.record/2'" in verify_run(run_copy).problems[0]
    (run_copy / "record.json").write_text("{broken")
    assert "not valid JSON" in verify_run(run_copy).problems[0]


# --- signatures ---------------------------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path):
    assert main(["keygen", str(tmp_path / "signer")]) == 0
    assert main(["keygen", str(tmp_path / "stranger")]) == 0
    return tmp_path / "signer", tmp_path / "signer.pub", tmp_path / "stranger.pub"


def test_signed_record_verifies_with_the_signers_key(run_copy, keys, capsys):
    private, public, _ = keys
    assert main(["report", str(run_copy), "--sign", str(private), "--no-pdf"]) == 0
    assert (run_copy / "record.json.sig").is_file()
    assert "Ed25519, key fingerprint" in (run_copy / "report.html").read_text()
    capsys.readouterr()
    assert main(["verify", str(run_copy), "--pubkey", str(public)]) == 0
    assert "Ed25519 signature by key" in capsys.readouterr().out


def test_bad_signature_fails(run_copy, keys):
    private, public, stranger = keys
    write_report(run_copy, pdf=False, sign_key=private)
    signature_file = run_copy / "record.json.sig"
    signature = json.loads(signature_file.read_text())

    assert "not by the trusted key" in verify_run(run_copy, stranger).problems[0]

    raw = bytearray(base64.b64decode(signature["signature"]))
    raw[0] ^= 0xFF
    signature_file.write_text(json.dumps({**signature, "signature": base64.b64encode(bytes(raw)).decode()}))
    assert "signature does not match the record" in verify_run(run_copy, public).problems[0]
    assert not verify_run(run_copy).ok  # a present but broken signature fails even without --pubkey


def test_signature_catches_a_record_edit_that_recomputed_the_hash(run_copy, keys):
    private, public, _ = keys
    write_report(run_copy, pdf=False, sign_key=private)
    record = _record(run_copy)
    record["request"]["requested_by"] = "someone else"
    _write_record(run_copy, record, rehash=True)
    problems = verify_run(run_copy, public).problems
    assert len(problems) == 1 and "signature does not match the record" in problems[0]


def test_a_signed_record_has_a_signed_manifest_by_the_same_key(run_copy, keys):
    private, public, _ = keys
    write_report(run_copy, pdf=False, sign_key=private)
    assert verify_run(run_copy, public).ok and (run_copy / "manifest.json.sig").is_file()
    (run_copy / "report.html").write_text("<p>a friendlier verdict</p>")
    from safeedit.report.manifest import write_manifest

    write_manifest(run_copy, _record(run_copy)["integrity"]["sha256"])  # a forger rewrites the manifest, unsigned
    (run_copy / "manifest.json.sig").write_text((run_copy / "record.json.sig").read_text())
    problems = verify_run(run_copy, public).problems
    assert problems == ["manifest.json.sig: the signature does not match the manifest (the manifest or the "
                        "signature was altered)"]


def test_pubkey_without_signature_fails_and_keygen_never_overwrites(run_copy, keys):
    private, public, _ = keys
    assert "not signed" in verify_run(run_copy, public).problems[0]
    with pytest.raises(SafeEditError, match="refusing to overwrite"):
        from safeedit.report.signing import generate_key

        generate_key(private)
    with pytest.raises(SafeEditError, match="not an unencrypted PEM public key"):
        verify_run(run_copy, run_copy / "record.json")


def test_report_into_another_folder_carries_the_record_and_signature(run_copy, keys, tmp_path):
    private, _, _ = keys
    files = write_report(run_copy, tmp_path / "for-auditor", pdf=False, sign_key=private)
    assert files.record.read_bytes() == (run_copy / "record.json").read_bytes()
    assert files.signature.read_bytes() == (run_copy / "record.json.sig").read_bytes()
    assert files.html.parent == tmp_path / "for-auditor"


def test_a_report_into_a_new_folder_is_written_whole_or_not_at_all(run_copy, tmp_path, monkeypatch):
    import safeedit.report.render as render

    def broken_pdf(html, pdf):
        raise SafeEditError("Chromium crashed")

    monkeypatch.setattr(render, "html_to_pdf", broken_pdf)
    with pytest.raises(SafeEditError, match="Chromium crashed"):
        write_report(run_copy, tmp_path / "for-auditor", pdf=True)
    assert not (tmp_path / "for-auditor").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".for-auditor")]


def test_a_record_without_reference_masks_or_evidence_still_renders(run_folder):
    """Records of other kinds may lack any optional part: the page renders what is there, nothing breaks."""
    record = read_record(run_folder)
    del record["results"]["retrain"]
    for result in record["results"].values():
        result.update(mask=None, evidence=None, weight_changes=None, about=None, options=None)
    record["kind"] = "some-future-kind"
    html = render_html(record, run_folder / "record.json", verify_run(run_folder), None)
    assert "after: <b>salun</b>" in html and 'id="weights"' not in html and "data:image/svg+xml" in html
