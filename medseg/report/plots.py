"""Plots and reports. Every figure is written atomically as PNG (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from medseg.atomic import atomic_path  # noqa: E402

AXIS_ENDS = {"axial": ("inferior", "superior"), "coronal": ("posterior", "anterior"), "sagittal": ("left", "right")}
LINE_STYLES = ("-", "--", ":", "-.")  # series i is drawn with style i: identical series stay told apart


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
    fig, (ax, ax_share) = _curve_axes()
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
    shown_title = title or f"Lesion distribution along the {axis_name} axis ({n_cases} cases)"
    ax_share.fill_between(curve["position"], 0, curve["share_with_lesion"], color="tab:blue", alpha=0.4, step="mid")
    return _finish_curve_axes(fig, ax, ax_share, out_path, shown_title, axis_name, extent)


def plot_group_curves(
    groups: dict[str, pd.DataFrame], out_path: str | Path, axis_name: str = "axial", extent: str = "foreground",
    title: str = "",
) -> Path:
    """Lesion-distribution curves of several cohorts in one figure: per group (legend entry =
    the dict key, e.g. ``site A (n=6)``) the mean lesion area as a step line with its
    inter-quartile band (translucent), and below the share of the group's cases with lesion.
    Each group has its own colour and line style, so that no curve hides another, even two
    identical ones. ``groups``: aggregates of ``lesion_distribution_curve``, in legend order.
    The PNG's ``Description`` metadata lists the legend entries (``; ``-separated)."""
    fig, (ax, ax_share) = _curve_axes()
    colours = plt.get_cmap("tab10")
    for i, (name, curve) in enumerate(groups.items()):
        style = {"color": colours(i % 10), "ls": LINE_STYLES[i % len(LINE_STYLES)], "drawstyle": "steps-mid"}
        ax.fill_between(curve["position"], curve["q25"], curve["q75"], color=colours(i % 10), alpha=0.12, step="mid")
        ax.plot(curve["position"], curve["mean"], lw=2, label=name, zorder=3, **style)
        ax_share.plot(curve["position"], curve["share_with_lesion"], lw=1.5, **style)
    shown_title = title or f"Lesion distribution along the {axis_name} axis, by group (mean, inter-quartile band)"
    return _finish_curve_axes(fig, ax, ax_share, out_path, shown_title, axis_name, extent)


def _curve_axes() -> tuple[plt.Figure, tuple[plt.Axes, plt.Axes]]:
    """The lesion-distribution figure: lesion area above, share of cases with lesion below."""
    return plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True)


def _finish_curve_axes(fig: plt.Figure, ax: plt.Axes, ax_share: plt.Axes, out_path: str | Path, title: str,
                       axis_name: str, extent: str) -> Path:
    """Labels, legend, limits of a :func:`_curve_axes` figure; saved with its title and legend
    entries as PNG metadata."""
    ax.set_ylabel("lesion area per slice (mm²)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    legend = "; ".join(ax.get_legend_handles_labels()[1])
    ax.grid(alpha=0.3)
    ax_share.set_ylim(0, 1.05)  # a share of 1 stays visible above the frame's edge
    ax_share.set_ylabel("cases with\nlesion")
    low, high = AXIS_ENDS.get(axis_name, ("start", "end"))
    span = "body/brain extent" if extent == "foreground" else "volume"
    ax_share.set_xlabel(f"normalised position over the {span} (0 = {low}, 1 = {high})")
    ax_share.grid(alpha=0.3)
    ax_share.set_xlim(0, 1)
    return _save(fig, out_path, {"Title": title, "Description": f"legend: {legend}"})


def plot_case_histograms(series: dict[str, np.ndarray], out_path: str | Path, xlabel: str, title: str,
                         log_bins: bool = False) -> Path:
    """Step histograms of one value per named series (e.g. per-lesion volumes, or slices with
    lesion per case, one series per group), each in its own colour and line style; the PNG's
    ``Description`` metadata lists the legend entries."""
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    colours = [plt.get_cmap("tab10")(i % 10) for i in range(len(series))]
    if not _step_histograms(ax, series, colours, log_bins):
        ax.text(0.5, 0.5, "no lesions", ha="center", va="center", transform=ax.transAxes)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
    if not log_bins:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # one bin per integer value
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, out_path, {"Title": title, "Description": "legend: " + "; ".join(ax.get_legend_handles_labels()[1])})


def _save(fig: plt.Figure, out_path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", metadata=metadata)
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


def _step_histograms(ax: plt.Axes, series: dict[str, np.ndarray], colours: list[str | tuple[float, ...]],
                     log_bins: bool) -> bool:
    """One step-outline histogram per named series on shared bins (25 logarithmic bins over the
    positive values, or one bin per integer), so that no series hides another; the legend
    entry is the series' name. Returns False (nothing drawn) when no series has a value to bin."""
    values = [np.asarray(v, dtype=float) for v in series.values()]
    values = [v[v > 0] if log_bins else v[np.isfinite(v)] for v in values]
    pooled = np.concatenate(values) if values else np.zeros(0)
    if not len(pooled):
        return False
    if log_bins:
        bins = np.logspace(np.log10(max(pooled.min(), 1e-3)), np.log10(pooled.max() * 1.01), 25)
    else:
        bins = np.arange(np.floor(pooled.min()), np.ceil(pooled.max()) + 2) - 0.5
    for i, (name, colour) in enumerate(zip(series, colours, strict=True)):
        if len(values[i]):
            ax.hist(values[i], bins=bins, histtype="step", lw=1.5, color=colour, ls=LINE_STYLES[i % len(LINE_STYLES)],
                    label=name)
    if log_bins:
        ax.set_xscale("log")
    ax.legend(fontsize=8)
    return True



def plot_lesion_sizes(matches: pd.DataFrame, out_path: str | Path, edges_mm3: tuple[float, float]) -> Path:
    """Histogram of lesion volumes (log scale) for reference and predicted lesions."""
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    volumes = {side: matches.loc[matches["side"] == side, "volume_mm3"].to_numpy(float) for side in ("reference", "prediction")}
    named = {f"{side} ({len(v)})": v for side, v in volumes.items() if len(v)}
    colours = [c for (side, v), c in zip(volumes.items(), ("k", "tab:red"), strict=True) if len(v)]
    if _step_histograms(ax, named, colours, log_bins=True):
        for edge in edges_mm3:
            ax.axvline(edge, color="0.5", ls=":", lw=1)
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


def plot_postprocess_tradeoff(candidates: pd.DataFrame, out_path: str | Path) -> Path:
    """Dice against lesion F1 of every post-processing candidate (out-of-fold means): one grey
    point per rule, the config's own rule as a black ring, the chosen one as a red star drawn
    last (on top), so no marker hides another. ``candidates``: a ``postprocess_candidates.csv``
    (``mean_dice``, ``mean_lesion_f1``, ``is_current``, ``chosen``)."""
    def flag(name: str) -> np.ndarray:
        column = candidates.get(name)
        if column is None:
            return np.zeros(len(candidates), dtype=bool)
        return column.astype(str).str.lower().isin(("true", "1")).to_numpy()

    dice = candidates["mean_dice"].to_numpy(float)
    f1 = candidates["mean_lesion_f1"].to_numpy(float)
    current, chosen = flag("is_current"), flag("chosen")
    fig, ax = plt.subplots(figsize=(6.0, 4.5), constrained_layout=True)
    ax.scatter(dice, f1, s=18, c="0.55", alpha=0.6, label=f"candidate rules ({len(dice)})")
    if current.any():
        ax.scatter(dice[current], f1[current], s=110, facecolors="none", edgecolors="k", lw=1.5, label="config's rule")
    if chosen.any():
        ax.scatter(dice[chosen], f1[chosen], s=140, marker="*", c="tab:red", zorder=3, label="chosen")
    ax.set_xlabel("mean Dice (out-of-fold)")
    ax.set_ylabel("mean lesion F1 (out-of-fold)")
    ax.set_title("Post-processing candidates: voxels (Dice) against lesions (F1)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    return _save(fig, out_path)

