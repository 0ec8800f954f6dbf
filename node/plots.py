"""Routing heatmap (layers × experts), written as a PNG with matplotlib's headless backend."""
from __future__ import annotations

from pathlib import Path


def routing_heatmap(profile: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted(profile["layers"], key=int)
    n, k = profile["tokens"], profile["top_k"]
    grid = np.array([[c / (n * k) for c in profile["layers"][l]["counts"]] for l in layers])
    fig, ax = plt.subplots(figsize=(max(6, grid.shape[1] * 0.18), 1 + 0.5 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), [f"layer {l}" for l in layers])
    ax.set_xlabel("expert")
    ax.set_title(f"share of routed tokens ({n:,} tokens, top-{k})")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
