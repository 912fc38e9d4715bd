"""Plots and reports. Every figure is written atomically as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from medseg.atomic import atomic_path  # noqa: E402

AXIS_ENDS = {"axial": ("inferior", "superior"), "coronal": ("posterior", "anterior"), "sagittal": ("left", "right")}


def plot_lesion_curve(
    curve: pd.DataFrame,
    out_path: str | Path,
    axis_name: str = "axial",
    extent: str = "foreground",
    per_case: pd.DataFrame | None = None,
    title: str = "",
    reference: pd.DataFrame | None = None,
    label: str = "lesion area",
) -> Path:
    """Lesion-distribution curve: mean lesion area (mm²) with inter-quartile band against the
    normalised slice position, individual cases faintly, and the share of cases with lesion.

    ``curve``: output of ``lesion_distribution_curve``; ``reference``: an optional second
    aggregate (e.g. reference masks when ``curve`` holds predictions) drawn dashed.
    """
    fig, (ax, ax_share) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    if per_case is not None and len(per_case) and per_case["case_id"].nunique() <= 200:
        value_col = [c for c in per_case.columns if c not in ("case_id", "position")][0]
        for _, group in per_case.groupby("case_id", sort=False):
            ax.plot(group["position"], group[value_col], color="0.75", lw=0.6, zorder=1)
    ax.fill_between(curve["position"], curve["q25"], curve["q75"], color="tab:red", alpha=0.25, label="inter-quartile band", zorder=2)
    ax.plot(curve["position"], curve["mean"], color="tab:red", lw=2, label=f"mean {label}", zorder=3)
    ax.plot(curve["position"], curve["median"], color="tab:red", lw=1, ls=":", label="median", zorder=3)
    if reference is not None and len(reference):
        ax.plot(reference["position"], reference["mean"], color="k", lw=1.5, ls="--", label="reference mean", zorder=3)
    n_cases = int(curve["n_cases"].iloc[0]) if len(curve) else 0
    ax.set_ylabel("lesion area per slice (mm²)")
    ax.set_title(title or f"Lesion distribution along the {axis_name} axis ({n_cases} cases)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    ax_share.fill_between(curve["position"], 0, curve["share_with_lesion"], color="tab:blue", alpha=0.4, step="mid")
    ax_share.set_ylim(0, 1)
    ax_share.set_ylabel("cases with\nlesion")
    low, high = AXIS_ENDS.get(axis_name, ("start", "end"))
    span = "body/brain extent" if extent == "foreground" else "volume"
    ax_share.set_xlabel(f"normalised position over the {span} (0 = {low}, 1 = {high})")
    ax_share.grid(alpha=0.3)
    ax_share.set_xlim(0, 1)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(out_path)
