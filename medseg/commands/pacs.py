"""`medseg pacs query|pull|push`: the archive of the config's ``pacs:`` section (thin over
:mod:`medseg.pacs`; the ``pacs_pull`` / ``pacs_push`` pipeline stages do the same in a run folder)."""

from __future__ import annotations

import argparse

from medseg.commands import add_set_option

HELP = "query a PACS, retrieve its series as a manifest, store DICOM SEGs back (pacs: section)"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="config file with a pacs: section")
    add_set_option(parser, "config override, e.g. pacs.dicomweb_url=http://pacs:8042/dicom-web (repeatable)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    p = sub.add_parser("query", help="list the series the query settings match (UIDs, no patient attributes)")
    p.add_argument("--model", metavar="PATH", help="model folder or checkpoint: only series of its modality")
    _common(p)
    p = sub.add_parser("pull", help="retrieve the series not answered yet into OUT/pacs_in and write OUT/manifest.csv")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for pacs_in/, dicom_series/ and manifest.csv")
    p.add_argument("--model", metavar="PATH", help="model folder or checkpoint: its modality and channel names")
    p.add_argument("--ledger", metavar="CSV", help="ledger of answered series (default OUT/pacs_ledger.csv)")
    _common(p)
    p = sub.add_parser("push", help="store every <case>_seg.dcm of PRED_DIR not in the ledger")
    p.add_argument("predictions", metavar="PRED_DIR", help="predictions folder of medseg infer --output-format both")
    p.add_argument("--ledger", metavar="CSV", help="ledger of answered series (default PRED_DIR/../pacs_ledger.csv, "
                                                   "the run folder's for a pipeline run)")
    _common(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medseg.config import load_config
    from medseg.pacs.client import connect
    from medseg.pacs.ledger import LEDGER_FILE, Ledger
    from medseg.pacs.transfer import pull, push

    cfg = load_config(args.config, args.overrides).pacs
    client = connect(cfg)
    if args.action == "query":
        from medseg.auto.model_folder import read_model_inputs
        from medseg.pacs.transfer import find

        modalities = {cfg.modality} if cfg.modality else {"CT", "MR"}
        if args.model:
            modalities &= {read_model_inputs(args.model).modality}
        found = find(client, cfg, modalities)
        print("study_date,modality,series_number,instances,study_uid,series_uid")
        for s in found:
            print(f"{s.study_date},{s.modality},{s.series_number},{'' if s.n_instances is None else s.n_instances},"
                  f"{s.study_uid},{s.series_uid}")
        print(f"{len(found)} series on {client.description}")
        return 0
    if args.action == "pull":
        out = Path(args.out)
        ledger = Ledger(args.ledger or out / LEDGER_FILE)
        result = pull(client, cfg, out / "pacs_in", out, ledger, model=Path(args.model) if args.model else None)
        for failure in result.failures:
            print(f"{failure['case_id']}: {failure['error']}")
        print(f"{len(result.cases)} case(s) in {result.manifest} ({result.matched} series matched, {result.answered} "
              f"answered before, {result.retrieved} retrieved now)")
        return 1 if result.failures else 0
    pred_dir = Path(args.predictions)
    if not pred_dir.is_dir():
        from medseg.errors import MedsegError

        raise MedsegError(f"{pred_dir}: predictions folder not found")
    ledger = Ledger(args.ledger or pred_dir.resolve().parent / LEDGER_FILE)
    result = push(client, cfg, pred_dir, ledger)
    for failure in result.failures:
        print(f"{failure['case_id']}: {failure['error']}")
    print(f"{len(result.stored)} SEG(s) stored, {len(result.skipped)} answered before, {len(result.failures)} failed "
          f"(ledger {ledger.path})")
    return 1 if result.failures else 0
