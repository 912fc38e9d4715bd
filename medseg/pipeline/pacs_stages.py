"""The PACS stages of a pipeline (``pacs_pull``, ``pacs_push``; ``pipelines/pacs.yaml``): the
archive in and out around the other stages of :mod:`medseg.pipeline.stages`, which registers
them. The archive, query and retries are the config's ``pacs:`` section."""

from __future__ import annotations

import logging
from typing import Any

from medseg.config import StrictModel
from medseg.manifest import read_manifest
from medseg.pipeline.state import RunContext

log = logging.getLogger("medseg.pipeline.stages")  # the stages' logger, as before the split


class PacsPullOptions(StrictModel):
    """``pacs_pull``: the query, the archive and the retries are the config's ``pacs:`` section
    (``--set pacs.dicomweb_url=URL``, ``pacs.study_date``, ...; :class:`medseg.pacs.config.PacsConfig`)."""


class PacsPushOptions(StrictModel):
    """``pacs_push``: the archive and the retries are the config's ``pacs:`` section."""


PACS_IN = "pacs_in"  # retrieved series, <study>/<series>/ (medseg.pacs.transfer)


def stage_pacs_pull(ctx: RunContext, opts: PacsPullOptions) -> None:
    """Query the archive of ``pacs:``, retrieve the series not answered yet into ``pacs_in/`` and
    import them as the run's manifest (``pacs_pull/manifest.csv``; channels and modality from
    the pipeline's model), as the ``import`` stage does for a folder. Series not retrieved and
    series the import refuses are the run's failures; a rerun of the run folder tries again."""
    from medseg.pacs.client import connect
    from medseg.pacs.ledger import LEDGER_FILE, Ledger
    from medseg.pacs.transfer import pull

    cfg = ctx.cfg.pacs
    result = pull(connect(cfg), cfg, ctx.run_dir / PACS_IN, ctx.stage_dir("pacs_pull"), Ledger(ctx.run_dir / LEDGER_FILE),
                  model=ctx.model_dir or ctx.checkpoint)  # fmt: skip
    for failure in result.failures:
        log.warning("pacs_pull: %s: %s", failure["case_id"], failure["error"])
    ctx.failures += [{**f, "stage": "pacs_pull"} for f in result.failures]
    ctx.manifest = result.manifest
    read_manifest(ctx.manifest)
    log.info("pacs_pull: %d case(s) in %s (%d series matched, %d answered before, %d retrieved now)", len(result.cases),
             ctx.manifest, result.matched, result.answered, result.retrieved)


def remember_pacs_pull(ctx: RunContext) -> dict[str, Any]:
    """The manifest; status ``incomplete`` (the stage runs again next time) when a series could
    not be retrieved."""
    retry = any(f.get("stage") == "pacs_pull" and str(f.get("error", "")).startswith("not retrieved") for f in ctx.failures)
    return {"manifest": str(ctx.manifest), **({"status": "incomplete"} if retry else {})}


def stage_pacs_push(ctx: RunContext, opts: PacsPushOptions) -> None:
    """Store each ``predictions/<case>_seg.dcm`` of the manifest's cases that ``pacs_ledger.csv``
    does not list as answered (:func:`medseg.pacs.transfer.push`). A store the PACS refuses or
    cannot take is a failure of that case with the PACS's status; its files stay."""
    from medseg.pacs.client import connect
    from medseg.pacs.ledger import LEDGER_FILE, Ledger
    from medseg.pacs.transfer import push, seg_files

    pred_dir = ctx.run_dir / "predictions"
    case_ids = {c.case_id for c in ctx.cases()}
    if not seg_files(pred_dir, case_ids):
        log.info("pacs_push: no DICOM SEG in %s (set stage.infer.output_format=both); nothing to store", pred_dir)
        return
    cfg = ctx.cfg.pacs
    result = push(connect(cfg), cfg, pred_dir, Ledger(ctx.run_dir / LEDGER_FILE), case_ids)
    ctx.failures += [{**f, "stage": "pacs_push"} for f in result.failures]
    log.info("pacs_push: %d SEG(s) stored, %d answered before, %d failed", len(result.stored), len(result.skipped),
             len(result.failures))


def remember_pacs_push(ctx: RunContext) -> dict[str, Any]:
    """Status ``incomplete`` while a SEG is not stored, so that the next run of the folder tries again."""
    return {"status": "incomplete"} if any(f.get("stage") == "pacs_push" for f in ctx.failures) else {}
