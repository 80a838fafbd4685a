"""Figures drawn from recorded numbers (a run's similarity profile): used by the pipeline at the end of a run
and by the report; no method code here."""

from __future__ import annotations


def plot_profile(mean_cos: dict[int, list[float]], num_layers: int, path,
                 chosen: tuple[int, int] | list[tuple[int, int]] | None = None, title: str = "") -> None:
    """Heat map of mean cos(x^(l), x^(l+n)) over (n, l) (`mean_cos[n][l]`, as a similarity profile holds it and
    results.json records it), the chosen block(s) (start, n) marked, and the profile of single layers (n=1)
    beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks = [chosen] if isinstance(chosen, tuple) else list(chosen or [])
    ns = sorted(mean_cos)
    L = num_layers
    grid = np.full((len(ns), L), np.nan)
    for r, n in enumerate(ns):
        vals = mean_cos[n]
        grid[r, :len(vals)] = vals
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    im = axes[0].imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                        extent=(-0.5, L - 0.5, -0.5, len(ns) - 0.5))
    axes[0].set_yticks(range(len(ns)), [str(n) for n in ns])
    axes[0].set_xlabel("block start l")
    axes[0].set_ylabel("block size n")
    axes[0].set_title("mean cos(x^(l), x^(l+n))")
    fig.colorbar(im, ax=axes[0])
    for k, (start, n) in enumerate(sorted(set(blocks), key=lambda b: b[1])):
        if n in ns:
            axes[0].plot([start], [ns.index(n)], "rx", markersize=10, mew=2.5,
                         label="chosen block (removed)" if k == 0 else None)
    if blocks:
        axes[0].legend(loc="upper right")
    axes[1].plot(range(len(mean_cos[ns[0]])), mean_cos[ns[0]], "o-", label=f"n={ns[0]}")
    for n in sorted({b[1] for b in blocks}):  # one curve per block size
        if n in mean_cos and n != ns[0]:
            axes[1].plot(range(len(mean_cos[n])), mean_cos[n], "s-", ms=3, label=f"n={n}")
    axes[1].set_xlabel("block start l")
    axes[1].set_ylabel("mean cosine")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
