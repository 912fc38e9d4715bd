"""The PACS loop over DIMSE against a real Orthanc's DICOM port (tests/pacs/conftest.py):
``medseg run pipelines/pacs.yaml --set pacs.dimse.*`` -> C-FIND, C-GET, import, infer, C-STORE
-> each SEG read back from Orthanc equals the run's NIfTI mask voxel for voxel; a rerun stores
nothing (the ledger), a new run folder finds the medseg SEGs in Orthanc (C-FIND) and retrieves
nothing; Orthanc's DICOM port closed during the push is a per-case failure with the reason, the
SEG stays and the next run stores it. The DICOMweb loop (test_pacs_loop.py) covers the kill and
resume, which does not depend on the transport."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from dicom_helpers import STUDY_UID

from medseg.pacs.config import PacsConfig
from medseg.pacs.contract import PacsError

from .conftest import AET, CALLING_AE
from .test_pacs_loop import (
    PIPELINE,
    check_segs_in_orthanc,
    ledger,
    stored_once,
    tiny_ct_checkpoint,
    upload_series,
)


@pytest.fixture
def site_secret(monkeypatch):
    monkeypatch.delenv("MEDSEG_PACS_USER", raising=False)  # DIMSE has no credentials: none needed
    monkeypatch.delenv("MEDSEG_PACS_PASSWORD", raising=False)
    monkeypatch.setenv("MEDSEG_SITE_SECRET", "00112233445566778899aabbccddeeff")


def dimse_args(orthanc, checkpoint: Path, out: Path) -> list[str]:
    return ["run", str(PIPELINE), "--set", "pacs.dimse.host=127.0.0.1", "--set", f"pacs.dimse.port={orthanc.dicom_port}",
            "--set", f"pacs.dimse.called_ae={AET}", "--set", f"pacs.dimse.calling_ae={CALLING_AE}",
            "--set", f"pipeline.checkpoint={checkpoint}", "--set", "pacs.retries=1", "--set", "pacs.backoff_s=0.1",
            "--set", "pacs.timeout_s=10", "--set", f"pacs.study_uids=[{STUDY_UID}]", "--out", str(out),
            "--no-progress"]  # fmt: skip


def without_references(identifier):
    if "ReferencedSeriesSequence" in identifier:
        del identifier.ReferencedSeriesSequence
    return identifier


@pytest.mark.slow
def test_pacs_loop_over_dimse(orthanc, site_secret, tmp_path, monkeypatch, capsys):
    from medseg.cli import main
    from medseg.pacs.client import connect
    from medseg.pipeline.stages import STAGES, Stage

    checkpoint = tiny_ct_checkpoint(tmp_path)
    uids = upload_series(orthanc, tmp_path, 2, first=40)
    before = orthanc.instance_count()

    # 1. C-FIND, C-GET, infer, C-STORE: one SEG per series, equal to the NIfTI mask
    run1 = tmp_path / "run1"
    assert main(dimse_args(orthanc, checkpoint, run1)) == 0
    table = stored_once(orthanc, run1, uids, before)
    assert set(table["pacs_status"]) == {"C-STORE: stored"}
    for uid in uids:  # retrieved by C-GET: every instance of the series, one file each
        assert len(list((run1 / "pacs_in" / STUDY_UID / uid).glob("*.dcm"))) == 10
    assert check_segs_in_orthanc(orthanc, [run1], tmp_path) == 2

    # 2. same folder: nothing stored twice; a new folder: Orthanc's medseg SEGs answer both series
    assert main(dimse_args(orthanc, checkpoint, run1)) == 0
    assert main(dimse_args(orthanc, checkpoint, tmp_path / "run_new")) == 0
    assert "[pacs_pull] nothing to do: pacs: nothing to answer" in capsys.readouterr().out
    assert orthanc.instance_count() == before + 2
    client = connect(PacsConfig(dimse={"host": "127.0.0.1", "port": orthanc.dicom_port, "called_ae": AET,
                                       "calling_ae": CALLING_AE}))  # fmt: skip
    assert client.answered_series(STUDY_UID) == set(uids)  # Orthanc returns ReferencedSeriesSequence in C-FIND
    in_c_find = client._instances  # an archive that leaves the sequence out: the SEGs are read through C-GET
    monkeypatch.setattr(client, "_instances", lambda *a: [without_references(i) for i in in_c_find(*a)])
    assert client.answered_series(STUDY_UID) == set(uids)

    # 3. Orthanc stopped between inference and the push: a per-case failure naming the reason,
    # SEG and mask kept; with Orthanc back, the same folder stores the SEG
    [late_uid] = upload_series(orthanc, tmp_path, 1, first=50)
    before = orthanc.instance_count()
    real = STAGES["infer"]

    def infer_then_pacs_down(ctx, opts):
        real.run(ctx, opts)
        orthanc.stop()

    monkeypatch.setitem(STAGES, "infer", Stage(infer_then_pacs_down, real.options, real.output, real.restore, real.remember))
    run2 = tmp_path / "run2"
    assert main(dimse_args(orthanc, checkpoint, run2)) == 0
    failures = pd.read_csv(run2 / "failures.csv")
    assert failures["stage"].tolist() == ["pacs_push"]
    case_id, error = failures["case_id"][0], failures["error"][0]
    assert f"cannot connect to 127.0.0.1:{orthanc.dicom_port}" in error and "after 2 attempt(s)" in error, error
    assert (run2 / "predictions" / f"{case_id}_seg.dcm").is_file()
    assert (run2 / "predictions" / f"{case_id}_mask.nii.gz").is_file()
    assert ledger(run2)[["series_uid", "status"]].values.tolist() == [[late_uid, "failed"]]
    monkeypatch.setitem(STAGES, "infer", real)
    orthanc.start()
    assert orthanc.instance_count() == before
    assert main(dimse_args(orthanc, checkpoint, run2)) == 0
    assert orthanc.instance_count() == before + 1
    assert ledger(run2)[["series_uid", "status"]].values.tolist() == [[late_uid, "stored"]]
    assert check_segs_in_orthanc(orthanc, [run1, run2], tmp_path) == 3


@pytest.mark.slow
def test_dimse_echo_query_and_a_closed_port(orthanc):
    from medseg.pacs.client import connect

    def client(**dimse):
        return connect(PacsConfig(dimse={"host": "127.0.0.1", "port": orthanc.dicom_port, "called_ae": AET,
                                         "calling_ae": CALLING_AE, **dimse}, timeout_s=5))  # fmt: skip

    assert client().echo() == "C-ECHO: success"
    assert client().description == f"DIMSE {AET}@127.0.0.1:{orthanc.dicom_port} (as {CALLING_AE})"
    assert client().find_series(PacsConfig(study_uids=["1.2.3.4.5.6.7"]), ["CT"]) == []
    with pytest.raises(PacsError, match=r"^C-ECHO: cannot connect to 127\.0\.0\.1:9$"):
        client(port=9).echo()


def test_dimse_rejections_and_refusals_read_as_statuses(tmp_path):
    """A DIMSE peer (pynetdicom, in this process) that knows only its own AE title and refuses
    every store with 0xA700: the statuses that land in failures.csv and the ledger."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import SegmentationStorage, Verification

    from medseg.pacs.client import connect
    from medseg.pacs.contract import with_retries

    from .conftest import free_port

    peer = AE(ae_title="TINY_PACS")
    peer.require_called_aet = True
    peer.add_supported_context(Verification)
    peer.add_supported_context(SegmentationStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)])  # fmt: skip
    try:
        seg = Dataset()
        seg.SOPClassUID, seg.SOPInstanceUID, seg.Modality = SegmentationStorage, generate_uid(), "SEG"
        seg.file_meta = FileMetaDataset()
        seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        pydicom.dcmwrite(tmp_path / "seg.dcm", seg, enforce_file_format=True)
        cfg = PacsConfig(dimse={"host": "127.0.0.1", "port": port, "called_ae": "TINY_PACS"}, timeout_s=5, retries=1,
                         backoff_s=0.0)  # fmt: skip
        client = connect(cfg)
        assert client.echo() == "C-ECHO: success"
        with pytest.raises(PacsError, match=r"refused: status 0xA700 \(Refused: Out of Resources\) \(after 2 attempt"):
            with_retries(cfg, "store", lambda: client.store(tmp_path / "seg.dcm"))
        wrong = connect(PacsConfig(dimse={"host": "127.0.0.1", "port": port, "called_ae": "OTHER"}, timeout_s=5))
        with pytest.raises(PacsError, match=r"association rejected by OTHER@127.0.0.1:\d+ \(.*Called AE title not "
                                            r"recognised\); check pacs.dimse.called_ae"):  # fmt: skip
            wrong.echo()
        with pytest.raises(PacsError, match=r"C-FIND: TINY_PACS@127.0.0.1:\d+ does not accept Study Root Query/"
                                            r"Retrieve Information Model - FIND$"):  # fmt: skip
            client.find_series(PacsConfig(), ["CT"])  # C-ECHO is accepted, C-FIND is not
        with pytest.raises(PacsError, match=r"association aborted by .*none of the proposed presentation contexts"):
            client.answered_series("1.2.3")  # only C-FIND proposed: nothing accepted
    finally:
        server.shutdown()
