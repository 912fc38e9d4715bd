"""Plots and reports. Every figure is written atomically as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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
    aggregate (e.g. reference masks when ``curve`` holds predictions) drawn dashed (None: no
    reference line and no legend entry for one). The PNG's ``Title`` and ``Description``
    metadata hold the title and the legend's entries (``; ``-separated), for readers of the file.
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
    shown_title = title or f"Lesion distribution along the {axis_name} axis ({n_cases} cases)"
    ax.set_title(shown_title)
    ax.legend(loc="upper right", fontsize=8)
    legend = "; ".join(ax.get_legend_handles_labels()[1])
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
        fig.savefig(tmp, dpi=110, format="png", metadata={"Title": shown_title, "Description": f"legend: {legend}"})
    plt.close(fig)
    return Path(out_path)


def _save(fig: plt.Figure, out_path: str | Path) -> Path:
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(out_path)


def plot_pr_curves(pr_curve: pd.DataFrame, ap_by_class: dict[str, float], out_path: str | Path, iou_threshold: float) -> Path:
    """Precision-recall curve per class at one IoU threshold (from evaluation's pr_curve.csv)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5), constrained_layout=True)
    subset = pr_curve[abs(pr_curve["iou_threshold"] - iou_threshold) < 1e-9]
    for name, group in subset.groupby("class", sort=False):
        group = group.sort_values("rank")
        ap = ap_by_class.get(str(name), float("nan"))
        ax.step([0, *group["recall"]], [1, *group["precision"]], where="post", label=f"{name} (AP {ap:.3f})")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("lesion recall")
    ax.set_ylabel("lesion precision")
    ax.set_title(f"Lesion detection, IoU > {iou_threshold:g}")
    ax.grid(alpha=0.3)
    if len(subset):
        ax.legend(loc="lower left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no predicted lesions", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, out_path)


def plot_lesion_sizes(matches: pd.DataFrame, out_path: str | Path, edges_mm3: tuple[float, float]) -> Path:
    """Histogram of lesion volumes (log scale) for reference and predicted lesions."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    volumes = {side: matches.loc[matches["side"] == side, "volume_mm3"].to_numpy(float) for side in ("reference", "prediction")}
    positive = [v[v > 0] for v in volumes.values() if len(v)]
    if positive and any(len(v) for v in positive):
        allv = np.concatenate(positive)
        bins = np.logspace(np.log10(max(allv.min(), 1e-3)), np.log10(allv.max() * 1.01), 25)
        for (side, v), colour in zip(volumes.items(), ("k", "tab:red"), strict=True):
            if len(v):
                ax.hist(v[v > 0], bins=bins, histtype="step", lw=1.5, color=colour, label=f"{side} ({len(v)})")
        ax.set_xscale("log")
        for edge in edges_mm3:
            ax.axvline(edge, color="0.5", ls=":", lw=1)
        ax.legend(fontsize=8)
    ax.set_xlabel("lesion volume (mm³)")
    ax.set_ylabel("lesions")
    ax.set_title("Lesion sizes (dotted: small / medium / large edges)")
    return _save(fig, out_path)


def plot_recall_by_size(recall_by_size: dict[str, dict], out_path: str | Path) -> Path:
    """Bar chart of lesion-wise detection recall per size bucket (with counts)."""
    fig, ax = plt.subplots(figsize=(5, 3.8), constrained_layout=True)
    names = list(recall_by_size)
    values = [recall_by_size[n].get("recall") for n in names]
    bars = ax.bar(names, [v if v is not None else 0 for v in values], color="tab:blue", alpha=0.7)
    for bar, n in zip(bars, names, strict=True):
        info = recall_by_size[n]
        text = f"{info.get('detected', 0)}/{info.get('n_ref', 0)}" if info.get("n_ref") else "none"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02, text, ha="center", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("detection recall")
    ax.set_title("Detection recall by lesion size")
    return _save(fig, out_path)


def plot_overlay(
    image: np.ndarray,
    reference: np.ndarray | None,
    prediction: np.ndarray | None,
    spacing: tuple[float, float],
    out_path: str | Path,
    title: str,
) -> Path:
    """One axial slice (R, A) with reference (green) and predicted (red) lesion contours.

    Arrays are 2-D (R, A) of the RAS-oriented volume; displayed radiologically (patient's
    right on the image's left, anterior up), with the pixel aspect from ``spacing``.
    """
    import numpy as np

    fig, ax = plt.subplots(figsize=(4.2, 4.4), constrained_layout=True)
    shown = np.flipud(np.asarray(image, dtype=np.float32).T)  # rows: anterior at top; cols: R..L? see below
    shown = shown[:, ::-1]  # radiological convention: patient right on the left
    lo, hi = np.percentile(shown, [1, 99]) if shown.size else (0, 1)
    extent = (0, shown.shape[1] * spacing[0], 0, shown.shape[0] * spacing[1])
    ax.imshow(shown, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, extent=extent, interpolation="nearest")
    for mask, colour in ((reference, "lime"), (prediction, "red")):
        if mask is not None and np.asarray(mask).any():
            m = np.flipud(np.asarray(mask, dtype=np.float32).T)[:, ::-1]
            ax.contour(m, levels=[0.5], colors=colour, linewidths=1.0, extent=extent, origin="upper")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return _save(fig, out_path)


def plot_cv_dice(table: pd.DataFrame, out_path: str | Path) -> Path:
    """Out-of-fold Dice per case: one bar per case, grouped and coloured by fold (cases sorted
    by Dice within a fold), the fold means as short dashed lines and the mean over cases as a
    black line. ``table``: a ``cv_table.csv`` (``case_id``, ``fold``, ``dice``); its ``mean`` row
    (fold -1) is left out. Cases with undefined Dice (NaN) get no bar."""
    cases = table[table["case_id"].astype(str) != "mean"]
    cases = cases[cases["fold"] >= 0].sort_values(["fold", "dice"], ascending=[True, False], kind="stable")
    fig, ax = plt.subplots(figsize=(max(7.5, min(14.0, 0.22 * len(cases) + 3)), 4.5), constrained_layout=True)
    colours = plt.get_cmap("tab10")
    x = np.arange(len(cases))
    folds = cases["fold"].to_numpy(int)
    dice = cases["dice"].to_numpy(float)
    for fold in np.unique(folds):
        at = folds == fold
        ax.bar(x[at], dice[at], color=colours(int(fold) % 10), alpha=0.8, label=f"fold {fold} ({int(at.sum())})")
        fold_mean = np.nanmean(dice[at]) if np.isfinite(dice[at]).any() else np.nan
        if np.isfinite(fold_mean):
            ax.hlines(fold_mean, x[at].min() - 0.4, x[at].max() + 0.4, colors=colours(int(fold) % 10), linestyles="--", lw=1.2)
    if np.isfinite(dice).any():
        mean = float(np.nanmean(dice))
        ax.axhline(mean, color="k", lw=1.5, label=f"mean {mean:.3f}")
    if 0 < len(cases) <= 40:
        ax.set_xticks(x, cases["case_id"].astype(str), rotation=90, fontsize=7)
    else:
        ax.set_xticks([])
    ax.set_xlim(-0.6, max(len(cases), 1) - 0.4)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("Dice (out-of-fold)")
    ax.set_xlabel("case (grouped by fold)")
    ax.set_title("Out-of-fold Dice per case (dashed: fold mean)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(cases):
        ax.legend(loc="lower left", fontsize=7, ncol=min(3, len(np.unique(folds)) + 1), framealpha=0.9)
    return _save(fig, out_path)
