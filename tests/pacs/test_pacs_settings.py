"""The ``pacs:`` section, credentials, retries, the ledger and the stage table (no PACS needed)."""

from __future__ import annotations

import json

import pytest

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.pacs.config import PacsConfig
from medseg.pacs.contract import PacsError, with_retries
from medseg.pacs.credentials import pacs_credentials
from medseg.pacs.ledger import FAILED, STORED, Ledger


def test_pacs_section_from_set_and_its_errors():
    cfg = load_config(None, ["pacs.dicomweb_url=http://pacs:8042/dicom-web/", "pacs.study_date=20260101-20260131",
                             "pacs.accession_numbers=12345", "pacs.study_uids=[1.2.3, 1.2.4]", "pacs.modality=CT"])  # fmt: skip
    assert cfg.pacs.dicomweb_url == "http://pacs:8042/dicom-web"
    assert cfg.pacs.accession_numbers == ["12345"] and cfg.pacs.study_uids == ["1.2.3", "1.2.4"]
    assert load_config(None).pacs == PacsConfig() and not PacsConfig().configured  # other pipelines: untouched
    bad = {
        "pacs.password=x": "unknown key",
        "pacs.study_date=20260132": "not a date",
        "pacs.study_date=2026-01": "not a date",
        "pacs.study_date=20260201-20260101": "ends before it starts",
        "pacs.dicomweb_url=http://user:secret@pacs/dicom-web": "never in the config",
        "pacs.retries=99": "less than or equal to 10",
        "pacs.study_uids=abc": "not a DICOM UID",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message) as info:
            load_config(None, [override])
        assert "secret" not in str(info.value)
    with pytest.raises(ConfigError, match=r"pacs.dicomweb_url \(DICOMweb\) and pacs.dimse \(DIMSE\), not both"):
        load_config(None, ["pacs.dicomweb_url=http://pacs/dicom-web", "pacs.dimse={host: pacs, port: 104, called_ae: PACS}"])
    assert PacsConfig(study_date="20260101-").study_date == "20260101-"


def test_credentials_from_environment_or_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSEG_PACS_USER", raising=False)
    monkeypatch.delenv("MEDSEG_PACS_PASSWORD", raising=False)
    assert pacs_credentials(PacsConfig()) is None
    monkeypatch.setenv("MEDSEG_PACS_USER", "reader")
    with pytest.raises(ConfigError, match="MEDSEG_PACS_PASSWORD"):
        pacs_credentials(PacsConfig())
    monkeypatch.setenv("MEDSEG_PACS_PASSWORD", "pw1")
    assert pacs_credentials(PacsConfig()) == ("reader", "pw1")
    path = tmp_path / "pacs.json"
    path.write_text(json.dumps({"user": "filer", "password": "pw2"}))
    path.chmod(0o600)
    assert pacs_credentials(PacsConfig(credentials_file=str(path))) == ("filer", "pw2")
    path.write_text(json.dumps({"user": "filer"}))
    with pytest.raises(ConfigError, match="expected") as info:
        pacs_credentials(PacsConfig(credentials_file=str(path)))
    assert "pw" not in str(info.value)


def test_retries_are_bounded_with_exponential_backoff():
    waits: list[float] = []
    calls = []

    def down():
        calls.append(1)
        raise PacsError("store", "HTTP 503 Service Unavailable")

    with pytest.raises(PacsError, match=r"HTTP 503 Service Unavailable \(after 3 attempt\(s\)\)"):
        with_retries(PacsConfig(retries=2, backoff_s=1.5), "store", down, sleep=waits.append)
    assert len(calls) == 3 and waits == [1.5, 3.0]
    answers = iter([PacsError("store", "down"), "ok"])

    def flaky():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert with_retries(PacsConfig(retries=1, backoff_s=0.0), "store", flaky, sleep=waits.append) == "ok"


def test_ledger_round_trip(tmp_path):
    ledger = Ledger(tmp_path / "pacs_ledger.csv")
    ledger.record("1.2.3", "1.2", "P1_s1", "1.2.3.9", FAILED, "HTTP 503")
    assert not ledger.answered("1.2.3")
    ledger.record("1.2.3", "1.2", "P1_s1", "1.2.3.9", STORED, "STOW-RS: stored")
    again = Ledger(tmp_path / "pacs_ledger.csv")
    assert again.answered("1.2.3") and not again.answered("1.2.4")
    assert len(again.rows) == 1 and again.rows["1.2.3"].seg_sop_uid == "1.2.3.9"


def test_pacs_stages_sit_in_pipeline_order():
    from medseg.pipeline import STAGES, load_pipeline

    order = list(STAGES)
    assert order.index("import") < order.index("pacs_pull") < order.index("validate")
    assert order.index("infer") < order.index("pacs_push") < order.index("prediction_stats")
    spec, cfg, _ = load_pipeline("pipelines/pacs.yaml", ["pacs.dicomweb_url=http://pacs/dicom-web", "pacs.retries=0"])
    assert [s.name for s in spec.stages] == ["pacs_pull", "validate", "infer", "pacs_push", "prediction_stats", "report"]
    assert spec.stages[2].options == {"output_format": "both"}
    assert cfg.pacs.dicomweb_url == "http://pacs/dicom-web" and cfg.pacs.retries == 0
    spec, cfg, _ = load_pipeline("pipelines/infer_report.yaml")
    assert "pacs_pull" not in [s.name for s in spec.stages] and not cfg.pacs.configured


def test_without_a_pacs_the_error_says_what_to_set():
    from medseg.pacs.client import connect

    with pytest.raises(ConfigError, match="set pacs.dicomweb_url"):
        connect(PacsConfig())
    dimse = {"host": "pacs", "port": 104, "called_ae": "PACS"}
    assert connect(PacsConfig(dimse=dimse)).description == "DIMSE PACS@pacs:104 (as MEDSEG)"  # nothing sent yet
    both = PacsConfig.model_construct(dicomweb_url="http://pacs/dicom-web", dimse=PacsConfig(dimse=dimse).dimse)
    with pytest.raises(ConfigError, match="pacs.dicomweb_url and pacs.dimse, not both"):
        connect(both)
