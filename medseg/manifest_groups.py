"""Cases grouped by a manifest column (``site``, ``scanner``, ``timepoint``, ...), for reports
that compare cohorts (:mod:`medseg.report.stats_page`). Torch-free and reads no volume, so a command
checks its ``--group-by`` before any work.

A group column is ``modality``, ``split``, ``patient_id`` or any extra column of the manifest
(:func:`medseg.manifest.read_manifest` keeps them in ``Case.extra``). A blank value is the group
:data:`EMPTY_GROUP`. Refused, with a :class:`~medseg.errors.ConfigError` naming the option and
the manifest: a column the manifest lacks (its columns listed), a column of files or ids
(``image_*``, ``label``, ``case_id``), and more than :data:`MAX_GROUPS` groups (one figure
cannot show them apart).
"""

from __future__ import annotations

from pathlib import Path

from medseg.errors import ConfigError
from medseg.manifest import CHANNEL_PREFIX, Case

MAX_GROUPS = 10  # curves one figure can show apart (colours x line styles)
EMPTY_GROUP = "(empty)"  # the group of rows whose group column is blank
GROUPABLE = ("patient_id", "modality", "split")  # manifest columns of its own that group cases (besides extra ones)


def manifest_columns(cases: list[Case]) -> list[str]:
    """The manifest's columns, as :func:`medseg.manifest.read_manifest` read them: the required
    ones, one ``image_<channel>`` per channel, then the extra columns in file order."""
    first = cases[0] if cases else Case("", "", "", {}, None, "")
    return ["case_id", "patient_id", "modality", *(CHANNEL_PREFIX + c for c in first.channels), "label", "split",
            *first.extra]


def case_groups(cases: list[Case], column: str, manifest: str | Path, option: str | None = None) -> dict[str, str]:
    """case_id -> the case's value in ``column`` (:data:`EMPTY_GROUP` when blank).

    Raises :class:`ConfigError`, starting with ``option`` (how the user gave the column; default
    ``--group-by COLUMN``) and naming ``manifest``, when the manifest has no such column (listing
    its columns), when the column holds ids or files rather than groups, and when it splits the
    cases into more than :data:`MAX_GROUPS` groups.
    """
    option = option or f"--group-by {column}"
    columns = manifest_columns(cases)
    extra = list(cases[0].extra) if cases else []
    if column not in columns:
        raise ConfigError(f"{option}: {manifest} has no column {column!r}; its columns are {', '.join(columns)}. "
                          "Add a column (e.g. site, scanner or timepoint, one value per row) or group by one of these")
    if column not in GROUPABLE and column not in extra:
        raise ConfigError(f"{option}: column {column!r} of {manifest} names a file or a case, not a group; "
                          f"group by one of {', '.join([*GROUPABLE, *extra])}")
    values = {c.case_id: (getattr(c, column) if column in GROUPABLE else c.extra.get(column, "")) or EMPTY_GROUP
              for c in cases}
    distinct = sorted(set(values.values()))
    if len(distinct) > MAX_GROUPS:
        raise ConfigError(f"{option}: column {column!r} of {manifest} has {len(distinct)} distinct values "
                          f"({', '.join(distinct[:5])}, ...); one figure shows at most {MAX_GROUPS} groups apart. "
                          "Group by a column with fewer values")
    return values


def group_label(column: str, value: str, n_cases: int) -> str:
    """The legend entry of a group: ``site A (n=6)``."""
    return f"{column} {value} (n={n_cases})"
