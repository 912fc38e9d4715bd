"""The contract of the files medseg writes and reads back: names, types, markers (one owner).

Every module that writes or reads one of these files takes its name from here; writing goes
through :mod:`medseg.atomic` (temporary file + rename).

Prediction folder (``medseg infer``, read by ``evaluate``, ``stats`` on predictions, the report)
------------------------------------------------------------------------------------------
For every case ``<case_id>``, all on the source image's voxel grid (same shape and affine):

=======================  =================================================================
``mask_file``            ``<case_id>`` + :data:`MASK_SUFFIX`: uint8; 0 background, 1 lesion
                         (class index ``1..K`` for multi-class models). Required.
``prob_file``            + :data:`PROB_SUFFIX`: float32 foreground probability in [0, 1]
                         (``inference.write_prob``).
``lesions_file``         + :data:`LESIONS_SUFFIX`: lesion instance ids 0..n (0 background), in
                         the smallest unsigned type that holds them (uint8/uint16/uint32).
``lesion_table_file``    + :data:`LESIONS_CSV_SUFFIX`: one row per instance, at least
                         ``lesion_id, voxels, volume_ml, score_mean, score_max``; written
                         together with the instance map. ``score_source`` ``learned`` (an
                         instance model's scores) makes evaluation take the instances as the
                         predicted lesions (:mod:`medseg.evaluation.runner`).
``dicom_seg_file``       + :data:`DICOM_SEG_SUFFIX`: DICOM Segmentation of the mask referencing the
                         source series (``inference.output_format`` dicom-seg or both; with
                         dicom-seg alone no ``mask_file`` is written).
``marker_file``          + :data:`MARKER_SUFFIX`: JSON written last (settings fingerprint, file
                         sizes); a case is done only when it vouches for every file.
=======================  =================================================================

Batch records: :data:`FAILURES_FILE` (``case_id, error``; header only when nothing failed) in
every batch output folder, :data:`INFERENCE_RECORD` (settings, the model's identity, counts) and
:data:`CASES_TABLE` (the cohort table of ``medseg infer``: one row per predicted case with
:data:`CASES_COLUMNS`; volumes in mL, ``slices_with_lesion`` along the model's slice axis,
``qc_score`` the model's doubt about the case and ``qc_flag`` whether it is on the review
list (:mod:`medseg.review`; empty without a calibration), ``dicom_seg`` what became of the
case's SEG: ``written``, ``written (new frame of reference)``, ``not asked`` or the reason it
failed).

Evaluation folder (``medseg evaluate``): :data:`EVAL_PER_CASE`, :data:`EVAL_LESION_MATCHES`,
:data:`EVAL_PR_CURVE`, :data:`EVAL_SUMMARY`, plus :data:`FAILURES_FILE`.

Statistics folder (``medseg stats``, the ``stats`` stage; :mod:`medseg.stats.dataset`):
:data:`SLICE_STATS`, :data:`CASE_STATS`, :data:`LESION_CURVE`, :data:`LESION_CURVE_PER_CASE`,
:data:`LESION_CURVE_PNG`, :data:`LESION_VOLUMES`, :data:`RUN_CONFIG`, plus :data:`FAILURES_FILE`.
A report folder holds :data:`REPORT_PAGE` and its PNGs.

Run files (training runs, cross-validation, pipeline runs, model folders)
------------------------------------------------------------------------
:data:`RUN_CONFIG` the resolved config saved with a run (``medseg train``, a CV candidate, a
pipeline run, ``medseg stats``); :data:`LAST_CHECKPOINT` a training run's weights after its last
epoch (where ``--resume`` continues; a CV fold's model) and :data:`BEST_CHECKPOINT` those of its
best validation epoch; :data:`MODEL_RECORD` a model folder's record (:mod:`medseg.auto.model_folder`,
written last); :data:`CV_TABLE` / :data:`CV_SUMMARY` the out-of-fold table and its summary
(:mod:`medseg.auto.cross_validation`), also in a model folder's :data:`CV_CHOSEN_DIR` (the
out-of-fold predictions under the chosen post-processing); :data:`POSTPROCESS_SELECTION` the
post-processing rule chosen on them (``chosen`` / ``current``: rules with exactly the keys
:data:`POSTPROCESS_RULE_KEYS`, :class:`medseg.config.InferenceConfig` fields) and
:data:`POSTPROCESS_CANDIDATES` every rule tried (:mod:`medseg.auto.postprocess_selection`);
:data:`CANDIDATES_CHOICE` / :data:`CANDIDATES_TABLE` the configuration chosen among
``cv.candidates`` and every combination's scores (:mod:`medseg.auto.candidates`); :data:`QC_RECORD`
the QC score's calibration a model folder ships (:mod:`medseg.review`); :data:`BACKENDS_DIR` /
:data:`BACKENDS_RECORD` its compiled models and each one's check against the fp32 torch
ensemble (:mod:`medseg.inference.backends`); :data:`STUDENT_DIR` / :data:`DISTILL_RECORD` its
distilled student and that student's out-of-fold check (:mod:`medseg.auto.distill`).
:data:`RUN_LOG` every log line of a run (``medseg infer``, ``medseg run``); :data:`PROVENANCE` a
pipeline run's record (versions, the model that ran).
"""

from __future__ import annotations

from pathlib import Path

MASK_SUFFIX = "_mask.nii.gz"
PROB_SUFFIX = "_prob.nii.gz"
LESIONS_SUFFIX = "_lesions.nii.gz"
LESIONS_CSV_SUFFIX = "_lesions.csv"
DICOM_SEG_SUFFIX = "_seg.dcm"
MARKER_SUFFIX = "_complete.json"
CASE_SUFFIXES = (MASK_SUFFIX, PROB_SUFFIX, LESIONS_SUFFIX, LESIONS_CSV_SUFFIX, DICOM_SEG_SUFFIX)  # marker excluded
LABEL_SUFFIX = "_label.nii.gz"  # labels medseg converts (import dicom --labels)

FAILURES_FILE = "failures.csv"
INFERENCE_RECORD = "inference.json"
CASES_TABLE = "cases.csv"
CASES_COLUMNS = ("case_id", "n_lesions", "total_volume_ml", "largest_volume_ml", "slices_with_lesion", "qc_score",
                 "qc_flag", "dicom_seg")

EVAL_PER_CASE = "metrics_per_case.csv"
EVAL_LESION_MATCHES = "lesion_matches.csv"
EVAL_PR_CURVE = "pr_curve.csv"
EVAL_SUMMARY = "summary.json"

SLICE_STATS = "slice_stats.csv"
CASE_STATS = "case_stats.csv"
LESION_CURVE = "lesion_curve.csv"
LESION_CURVE_PER_CASE = "lesion_curve_per_case.csv"
LESION_CURVE_PNG = "lesion_curve.png"
LESION_VOLUMES = "lesion_volumes.csv"  # one row per 3-D lesion: case_id, lesion (1..N), volume_ml
REPORT_PAGE = "report.html"

RUN_CONFIG = "config.yaml"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
MODEL_RECORD = "model.json"
CV_TABLE = "cv_table.csv"
CV_SUMMARY = "cv_summary.json"
CV_CHOSEN_DIR = "cv_chosen"
POSTPROCESS_SELECTION = "postprocess.json"
POSTPROCESS_CANDIDATES = "postprocess_candidates.csv"
RUN_LOG = "run.log"
PROVENANCE = "provenance.json"
CANDIDATES_CHOICE = "candidates.json"
CANDIDATES_TABLE = "candidates_table.csv"
QC_RECORD = "qc.json"
BACKENDS_DIR = "backends"  # a model folder's compiled models (medseg accelerate)
BACKENDS_RECORD = "backends.json"  # each backend/precision's check against the fp32 torch ensemble
STUDENT_DIR = "student"  # a model folder's distilled student (medseg distill)
DISTILL_RECORD = "distill.json"  # the student's out-of-fold check against the ensemble
POSTPROCESS_RULE_KEYS = ("threshold", "min_lesion_mm3", "min_component_fraction", "fill_holes", "largest_component")


def mask_file(folder: str | Path, case_id: str) -> Path:
    return Path(folder) / f"{case_id}{MASK_SUFFIX}"


def prob_file(folder: str | Path, case_id: str) -> Path:
    return Path(folder) / f"{case_id}{PROB_SUFFIX}"


def lesions_file(folder: str | Path, case_id: str) -> Path:
    return Path(folder) / f"{case_id}{LESIONS_SUFFIX}"


def lesion_table_file(folder: str | Path, case_id: str) -> Path:
    return Path(folder) / f"{case_id}{LESIONS_CSV_SUFFIX}"


def dicom_seg_file(folder: str | Path, case_id: str) -> Path:
    return Path(folder) / f"{case_id}{DICOM_SEG_SUFFIX}"


def label_file(folder: str | Path, case_id: str) -> Path:
    return Path(folder) / f"{case_id}{LABEL_SUFFIX}"


def marker_file(folder: str | Path, case_id: str) -> Path:
    return Path(folder) / f"{case_id}{MARKER_SUFFIX}"


def case_output_names(case_id: str, write_prob: bool, write_lesions: bool, output_format: str = "nifti") -> list[str]:
    """File names one case's outputs take under the given settings (the marker excluded)."""
    names = [case_id + MASK_SUFFIX] if output_format in ("nifti", "both") else []
    if output_format in ("dicom-seg", "both"):
        names.append(case_id + DICOM_SEG_SUFFIX)
    if write_prob:
        names.append(case_id + PROB_SUFFIX)
    if write_lesions:
        names += [case_id + LESIONS_SUFFIX, case_id + LESIONS_CSV_SUFFIX]
    return names


def predicted_case_ids(folder: str | Path) -> set[str]:
    """Case ids that have a mask in ``folder`` (empty when the folder does not exist)."""
    return {p.name[: -len(MASK_SUFFIX)] for p in Path(folder).glob(f"*{MASK_SUFFIX}")}
