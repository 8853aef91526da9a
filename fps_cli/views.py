"""How ``fps inspect`` shows its numbers: plain-text tables and bars for the terminal, and a matplotlib figure.

The functions take the dicts :mod:`.inspection` builds and return text (the CLI prints it) or write a file;
nothing here reads fps files or does tensor math. matplotlib is optional (``pip install 'fps-cli[plot]'``)
and imported only to draw.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FpsError

if TYPE_CHECKING:
    from .outputs import Transaction

BAR = 24
_EIGHTHS = " ▏▎▍▌▋▊▉█"
PLOT_SUFFIXES = (".png", ".svg")


def bar(fraction: float, width: int = BAR) -> str:
    """A horizontal bar of ``fraction`` (0..1) of ``width`` characters, in eighths of a character."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, rest = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[rest] if rest else "")).ljust(width)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """Fixed-width columns; ``align`` has one ``<`` or ``>`` per column (default: first left, others right)."""
    rows = [[str(c) for c in row] for row in rows]
    align = align or "<" + ">" * (len(header) - 1)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{a}{w}}}" for a, w in zip(align, widths, strict=True))
    return ["  " + fmt.format(*header).rstrip()] + ["  " + fmt.format(*r).rstrip() for r in rows]


def _n(x: int) -> str:
    return f"{x:,}"


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _provenance_line(prov: dict[str, Any], keys: Sequence[str]) -> str:
    parts = []
    for key in keys:
        value = prov.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, list):
            value = f"{len(value)} ({', '.join(map(str, value[:4]))}{', …' if len(value) > 4 else ''})"
        if isinstance(value, dict):
            if not value:
                continue
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        parts.append(f"{key} {value}")
    return "  " + "; ".join(parts)


def _task_lines(prov: dict[str, Any]) -> list[str]:
    """The task a file was made for, its data options, and the data's layout and splits (files from before the task
    seam or the layouts have none)."""
    lines = [_provenance_line(prov, keys) for keys in (("task", "data_options"), SPLIT_KEYS)]
    return [line for line in lines if line.strip()]


# What a header records about the data's layout and which split trained, validated and tested (fps_cli.data).
SPLIT_KEYS = ("layout", "train_split", "val_split", "test_split")


# ------------------------------------------------------------------------------------------------ masks


def render_mask(report: dict[str, Any]) -> str:
    """Provenance, totals, the per-layer table, the per-depth view and the per-neuron distribution."""
    prov, t = report["provenance"], report["totals"]
    lines = [f"{report['file']}: mask of {prov.get('model')}"]
    lines.append(_provenance_line(prov, ("method", "norm", "granularity", "budget", "topk_per_neuron", "train_bias")))
    lines.append(_provenance_line(prov, ("pretrained_tag", "pretrained", "checkpoint", "num_classes", "img_size")))
    lines.append(_provenance_line(prov, ("data", "num_samples", "classes", "seed")))
    lines += _task_lines(prov)
    lines += ["", "totals"]
    lines += table(
        ("", "entries", "% of model"),
        [
            ("selected", _n(t["selected"]), f"{t['selected_pct']:.3f}"),
            (f"fully trainable ({t['fully_trainable_tensors']} tensors)", _n(t["fully_trainable"]), ""),
            ("trainable", _n(t["trainable"]), f"{t['trainable_pct']:.3f}"),
            ("frozen", _n(t["frozen"]), f"{100 - t['trainable_pct']:.3f}"),
            ("all parameters", _n(t["total_params"]), "100"),
        ],
    )
    selected = [r for r in report["layers"] if r["role"] == "selected"]
    lines += ["", f"per layer: {len(selected)} partially selected"]
    lines += table(
        ("name", "shape", "selected", "%"),
        [(r["name"], "x".join(map(str, r["shape"])), _n(r["selected"]), f"{r['pct']:.2f}") for r in selected],
        "<>>>",
    )
    full = [r["name"] for r in report["layers"] if r["role"] == "full"]
    if full:
        shown = ", ".join(full[:6]) + (f", … ({len(full) - 6} more)" if len(full) > 6 else "")
        lines.append(f"  fully trainable: {shown}")
    lines += ["", *render_depth(report["depth"])]
    lines += ["", *render_histogram(report["per_neuron"])]
    if report.get("columns", {}).get("layers"):
        lines += ["", *render_columns(report["columns"])]
    return "\n".join(lines)


def _columns(top: list[list[int]]) -> str:
    return " ".join(f"{c}:{n}" if len(rest) == 0 else f"{c}:{n}/{rest[0]}" for c, n, *rest in top)


def render_columns(columns: dict[str, Any]) -> list[str]:
    """Per layer, how many input columns receive selections and the share of the most-selected ones."""
    s = columns["summary"]
    top_pct = round(100 * s["top_fraction"])
    lines = [
        f"input columns: which inputs of each layer the selection uses; mean over {s['layers']} layers: "
        f"{s['distinct_pct_mean']:.1f}% of columns used, {100 * s['top_share_mean']:.1f}% of entries in the top "
        f"{top_pct}% of columns ({top_pct}% if spread evenly)"
    ]
    lines += table(
        ("name", "inputs", "used", "used %", f"top {top_pct}% share", "", "top columns (column:entries)"),
        [
            (
                r["name"],
                _n(r["inputs"]),
                _n(r["distinct"]),
                f"{r['distinct_pct']:.1f}",
                f"{100 * r['top_share']:.1f}",
                bar(r["top_share"], 12),
                _columns(r["top"]),
            )
            for r in columns["layers"]
        ],
        "<>>>><<",
    )
    return lines


def render_depth(depth: dict[str, Any]) -> list[str]:
    """Selected entries per block (a bar) and the % selected of each layer type there."""
    rows = depth["rows"]
    types = [t for t in depth["types"] if any(t in r["by_type"] for r in rows)]
    most = max([r["selected"] for r in rows] + [1])
    body = []
    for r in rows:
        cells = []
        for t in types:
            cell = r["by_type"].get(t)
            cells.append("-" if cell is None else f"{cell['pct']:.2f}")
        body.append((r["block"], _n(r["selected"]), bar(r["selected"] / most), *cells))
    head = ["per depth: selected entries per block, and % of each layer type's entries selected"]
    return head + table(("block", "selected", "", *types), body, "<><" + ">" * len(types))


def render_histogram(dist: dict[str, Any], bins: int = 16) -> list[str]:
    """Selected entries per neuron: how many rows have each count (grouped into ``bins`` ranges if many)."""
    if not dist["rows"]:
        return ["per neuron: no partially selected parameter"]
    lines = [
        f"per neuron: {_n(dist['rows'])} rows of partially selected parameters; selected entries per row "
        f"min {dist['min']}, mean {dist['mean']:.2f}, max {dist['max']}"
    ]
    hist = dist["histogram"]
    lo, hi = dist["min"], dist["max"]
    if hi - lo + 1 <= bins:
        groups = [(str(k), n) for k, n in hist]
    else:
        step = -(-(hi - lo + 1) // bins)
        counts: dict[int, int] = {}
        for k, n in hist:
            counts[(k - lo) // step] = counts.get((k - lo) // step, 0) + n
        groups = [(f"{lo + g * step}-{lo + (g + 1) * step - 1}", n) for g, n in sorted(counts.items())]
    most = max(n for _, n in groups)
    lines += table(("entries", "rows", ""), [(k, _n(n), bar(n / most)) for k, n in groups], "<><")
    return lines


def render_comparison(comparison: dict[str, Any], a: str, b: str) -> str:
    """Total and per-layer overlap and Jaccard of two masks."""
    lines = [
        f"{a} vs {b}: {_n(comparison['intersection'])} entries shared of {_n(comparison['selected_a'])} and "
        f"{_n(comparison['selected_b'])}; overlap {comparison['overlap']:.4f}, jaccard {comparison['jaccard']:.4f}"
        + ("" if comparison["same_fully_trainable"] else "; the fully trainable tensors differ")
    ]
    lines += table(
        ("name", "a", "b", "both", "overlap", "jaccard"),
        [
            (
                name,
                _n(c["selected_a"]),
                _n(c["selected_b"]),
                _n(c["intersection"]),
                f"{c['overlap']:.3f}",
                f"{c['jaccard']:.3f}",
            )
            for name, c in comparison["layers"].items()
        ],
    )
    columns = comparison.get("columns")
    if columns and columns["layers"]:
        lines += [
            "",
            f"input columns each mask uses, per layer; mean column jaccard {columns['columns_jaccard_mean']:.3f}",
        ]
        lines += table(
            ("name", "cols a", "cols b", "both", "jaccard", "most different (column:a/b)"),
            [
                (
                    name,
                    _n(c["columns_a"]),
                    _n(c["columns_b"]),
                    _n(c["columns_both"]),
                    f"{c['columns_jaccard']:.3f}",
                    _columns(c["most_different"]),
                )
                for name, c in columns["layers"].items()
            ],
            "<>>>><",
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- scores and deltas


def render_scores(report: dict[str, Any]) -> str:
    """The distribution of each layer's statistic."""
    prov = report["provenance"]
    lines = [f"{report['file']}: {report['statistic']} scores of {prov.get('model')}; per layer: {report['shown']}"]
    lines.append(_provenance_line(prov, ("method", "gps_loss", "augment", "pretrained_tag", "num_classes", "img_size")))
    lines.append(_provenance_line(prov, ("data", "num_samples", "classes", "seed")))
    lines += _task_lines(prov)
    lines.append("")
    cols = ("mean", "min", "q05", "q25", "q50", "q75", "q95", "max")
    lines += table(
        ("name", "shape", *cols),
        [(r["name"], "x".join(map(str, r["shape"])), *(_g(r.get(c)) for c in cols)) for r in report["layers"]],
    )
    return "\n".join(lines)


def render_delta(report: dict[str, Any]) -> str:
    """Base identity, training configuration, final metrics and per-layer change norms."""
    prov, t = report["provenance"], report["totals"]
    lines = [f"{report['file']}: delta of {prov.get('model')}"]
    lines.append(_provenance_line(prov, ("pretrained_tag", "pretrained", "checkpoint", "num_classes", "img_size")))
    lines.append(_provenance_line(prov, ("mask", "data", "train_samples", "val_samples", "classes")))
    lines += _task_lines(prov)
    if prov.get("selection"):
        lines.append(_provenance_line(prov["selection"], tuple(prov["selection"])))
    if report["train_config"]:
        lines += ["", "training", _provenance_line(report["train_config"], tuple(report["train_config"]))]
    if report["metrics"]:
        metrics = {k: round(v, 4) if isinstance(v, float) else v for k, v in report["metrics"].items()}
        lines += ["", "final metrics", _provenance_line(metrics, tuple(metrics))]
    lines += [
        "",
        f"trained {_n(t['trained'])} of {_n(t['total_params'])} parameters: {_n(t['partial_entries'])} entries "
        f"in {t['partial_tensors']} tensors (change L2 {t['change_l2']:.4g}), {_n(t['full_entries'])} in "
        f"{t['full_tensors']} fully trained tensors",
    ]
    lines += table(
        ("name", "shape", "kind", "entries", "change L2", "max |change|", "value L2"),
        [
            (
                r["name"],
                "x".join(map(str, r["shape"])),
                r["kind"],
                _n(r["entries"]),
                _g(r.get("change_l2")),
                _g(r.get("change_max_abs")),
                _g(r.get("value_l2")),
            )
            for r in report["layers"]
        ],
        "<<<>>>>",
    )
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The text view of any report from :func:`.inspection.inspect_files`."""
    return {"mask": render_mask, "scores": render_scores, "delta": render_delta}[report["kind"]](report)


# ------------------------------------------------------------------------------------------------- plots


def _figure_api():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise FpsError("--plot needs matplotlib: pip install 'fps-cli[plot]'") from None
    return Figure, FigureCanvasAgg


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in PLOT_SUFFIXES:
        raise ValueError(f"a plot is written as .png or .svg, not {path.name!r}")
    return suffix


def _short(name: str) -> str:
    return name.removesuffix(".weight")


def _plot_columns(ax, layers: list[dict[str, Any]], label: str = "") -> None:
    """Per layer (model order): % of input columns used and % of entries in the top columns."""
    x = range(len(layers))
    ax.plot(x, [r["distinct_pct"] for r in layers], "o-", ms=3, label=f"{label}columns used (%)")
    ax.plot(x, [100 * r["top_share"] for r in layers], "s--", ms=3, label=f"{label}entries in top 10% columns (%)")


def plot_mask(report: dict[str, Any], path: str | os.PathLike, *, tx: Transaction | None = None) -> None:
    """Write a figure of a mask report (PNG or SVG, from the suffix): a heatmap of the % of entries selected
    per block x layer type, the histogram of selected entries per neuron, and per layer how concentrated the
    selection is over input columns (what differs between tasks). Written atomically.

    Raises:
        FpsError: matplotlib is not installed.
        ValueError: the suffix is not .png or .svg.
    """
    path = Path(path)
    _check_suffix(path)
    Figure, FigureCanvasAgg = _figure_api()

    rows = report["depth"]["rows"]
    types = [t for t in report["depth"]["types"] if any(t in r["by_type"] for r in rows)]
    grid = [[r["by_type"][t]["pct"] if t in r["by_type"] else float("nan") for t in types] for r in rows]
    dist = report["per_neuron"]
    columns = report.get("columns", {}).get("layers", [])

    fig = Figure(figsize=(16, max(4.5, 0.28 * len(rows) + 1.5)), layout="constrained")
    FigureCanvasAgg(fig)  # an explicit Agg canvas: no global backend switch, no display needed
    heat, hist, cols = fig.subplots(1, 3, width_ratios=(max(len(types), 2), 4, 5))
    image = heat.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    heat.set_xticks(range(len(types)), types)
    heat.set_yticks(range(len(rows)), [r["block"] for r in rows])
    heat.set_xlabel("layer type")
    heat.set_ylabel("block")
    heat.set_title("% of entries selected")
    fig.colorbar(image, ax=heat, shrink=0.8)
    if dist["rows"]:
        hist.bar([k for k, _ in dist["histogram"]], [n for _, n in dist["histogram"]], width=0.9, color="tab:blue")
    hist.xaxis.get_major_locator().set_params(integer=True)
    hist.set_xlabel("selected entries per neuron (row)")
    hist.set_ylabel("rows")
    hist.set_title(f"per neuron: {dist['rows']:,} rows, mean {dist['mean']:.2f}")
    _plot_columns(cols, columns)
    cols.axhline(10, color="grey", lw=0.8, ls=":")  # the top-10% share of an even spread
    cols.set_xticks(range(len(columns)), [_short(r["name"]) for r in columns], rotation=90, fontsize=6)
    cols.set_ylim(0, 105)
    cols.set_ylabel("%")
    cols.set_title("input columns per layer")
    cols.legend(fontsize=7, loc="lower right")
    prov = report["provenance"]
    fig.suptitle(f"{prov.get('model')} — {prov.get('method')} mask, {report['totals']['trainable_pct']:.3f}% trainable")
    _save(fig, path, tx)


def plot_comparison(
    reports: Sequence[dict[str, Any]],
    comparison: dict[str, Any],
    path: str | os.PathLike,
    names: Sequence[str],
    *,
    tx: Transaction | None = None,
) -> None:
    """Write a figure of two masks' differences: per layer the Jaccard of their entries and of the input columns
    they use, and each mask's column concentration. Written atomically (PNG or SVG)."""
    path = Path(path)
    _check_suffix(path)
    Figure, FigureCanvasAgg = _figure_api()
    layers = list(comparison["columns"]["layers"])
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    sim, conc = fig.subplots(1, 2)
    x = range(len(layers))
    sim.plot(x, [comparison["layers"].get(n, {}).get("jaccard", 0.0) for n in layers], "o-", ms=3, label="entries")
    sim.plot(x, [comparison["columns"]["layers"][n]["columns_jaccard"] for n in layers], "s--", ms=3, label="columns")
    sim.set_ylim(0, 1.05)
    sim.set_title("jaccard of the two masks, per layer")
    sim.legend(fontsize=7)
    for report, name, marker in zip(reports, names, ("o-", "s--"), strict=True):
        by_name = {r["name"]: r for r in report["columns"]["layers"]}
        values = [by_name[n]["distinct_pct"] if n in by_name else 0.0 for n in layers]
        conc.plot(x, values, marker, ms=3, label=f"{name}: columns used (%)")
    conc.set_ylim(0, 105)
    conc.set_title("input columns used, per layer")
    conc.legend(fontsize=7)
    for ax in (sim, conc):
        ax.set_xticks(list(x), [_short(n) for n in layers], rotation=90, fontsize=6)
    fig.suptitle(f"{names[0]} vs {names[1]}: overlap {comparison['overlap']:.3f}, jaccard {comparison['jaccard']:.3f}")
    _save(fig, path, tx)


def _save(fig, path: Path, tx: Transaction | None) -> None:
    suffix = path.suffix.lower()
    # Reproducible bytes: no creation date in the file.
    metadata = {"Date": None} if suffix == ".svg" else {"Software": None}
    from .outputs import Transaction

    def writer(tmp: Path) -> None:
        fig.savefig(tmp, format=suffix[1:], metadata=metadata, dpi=110)

    if tx is not None:
        tx.write(path, writer)
        return
    with Transaction(replace=True) as own:
        own.write(path, writer)
