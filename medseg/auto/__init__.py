"""The auto-configuration, from a dataset to a model folder (``pipelines/auto.yaml``).

Pure decisions: :mod:`.fingerprint` (the dataset measured), :mod:`.plan_rules` (one
``determine_*`` per planning decision), :mod:`.folds` (patient-level k-fold assignment),
:mod:`.postprocess_rules` (the post-processing rule grid), :mod:`.candidates` (single / pair /
mirroring chosen on out-of-fold Dice), :mod:`.model_folder` (the fold models as one ensemble).

Orchestration: :mod:`.planning` (fingerprint -> plan -> files; :mod:`.plan_speed` times the
planned model's steps), :mod:`.cross_validation` (train folds, predict each held-out patient
once), :mod:`.candidate_runs` (one CV per candidate), :mod:`.postprocess_selection` (the rule
chosen on the out-of-fold predictions).
"""
