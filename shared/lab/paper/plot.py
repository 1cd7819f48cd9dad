"""The PNG: theirs against ours, side by side per row (ratios on a log axis, ours with its
95 % interval; the arithmetic rows' hit rates in a second panel). matplotlib is the lab
extra's; without it there is no plot and the command says so."""

from __future__ import annotations

from pathlib import Path

from shared.lab.paper.table import RowResult


def plot(results: list[RowResult], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ratios = [r for r in results if r.kind == "measured"]
    arith = [r for r in results if r.kind == "arithmetic"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5),
                                  gridspec_kw={"width_ratios": [max(len(ratios), 1),
                                                                max(len(arith), 1) + 1]})
    xs = range(len(ratios))
    ax.bar([x - 0.2 for x in xs], [r.theirs_ratio for r in ratios], 0.4, label="theirs",
           color="#999999")
    ours = [r.ours or 0 for r in ratios]
    err = [[max(0.0, (r.ours or 0) - r.ours_ci95[0]) if r.ours_ci95 else 0 for r in ratios],
           [max(0.0, r.ours_ci95[1] - (r.ours or 0)) if r.ours_ci95 else 0 for r in ratios]]
    ax.bar([x + 0.2 for x in xs], ours, 0.4, yerr=err, capsize=3, label="ours (95 % CI)",
           color="#3060c0")
    ax.scatter([x + 0.2 for x in xs], [r.predicted or 0 for r in ratios], marker="_", s=300,
               color="#d04020", label="cost model", zorder=3)
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%gx"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks([0.5, 0.75, 1, 1.5, 2, 3, 4, 6])
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks(list(xs), [r.id for r in ratios])
    ax.set_ylabel("after / before")
    ax.set_title("published ratio vs pvnet's")
    ax.legend(fontsize=8)
    xa = range(len(arith))
    ax2.bar([x - 0.2 for x in xa], [r.theirs_after for r in arith], 0.4, color="#999999",
            label="theirs")
    ax2.bar([x + 0.2 for x in xa], [r.ours or 0 for r in arith], 0.4, color="#3060c0",
            label="ours")
    ax2.set_xticks(list(xa), [r.id for r in arith])
    ax2.set_ylim(0, 105)
    ax2.set_ylabel("grants reused, %")
    ax2.set_title("recycling (arithmetic)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
