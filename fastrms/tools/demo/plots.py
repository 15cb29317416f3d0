"""Plots of the demos: the regression's loss curve and fit, the paths as contours and as a GIF.

Plotting needs matplotlib (``pip install "fastrms[plot]"``; pillow for GIFs); it is imported
only by the plotting functions, which raise :class:`PlotDependencyError` without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .paths import PathsResult
from .regression import RegressionResult
from .settings import REGRESSION_OPTIMIZERS
from .testfunctions import Objective

PLOT_INSTALL_HINT = 'plotting needs matplotlib: pip install "fastrms[plot]"'


class PlotDependencyError(ImportError):
    """matplotlib (or pillow, for GIFs) is not installed."""


#: Color and line style of each path optimizer, the same in every panel.
PATH_STYLES = {
    "momentum": ("tab:blue", "-"),
    "nesterov": ("tab:orange", "-"),
    "adagrad": ("tab:green", "-"),
    "rmsprop": ("tab:red", "-"),
    "rmsprop-torch": ("tab:purple", "--"),
    "adam": ("tab:brown", "-"),
    "graves": ("tab:pink", "-"),
}


def _figure_class():
    """matplotlib's ``Figure`` (drawn with Agg, without pyplot), or PlotDependencyError."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotDependencyError(PLOT_INSTALL_HINT) from None
    return Figure


def check_plotting() -> None:
    """Raise :class:`PlotDependencyError` unless matplotlib can be imported."""
    _figure_class()


#: Size of the regression figure, in inches, and its resolution.
REGRESSION_FIGSIZE = (10.0, 4.0)
PATHS_FIGSIZE = (15.0, 5.0)
PNG_DPI = 100


def plot_regression(result: RegressionResult, path: str, dpi: int = PNG_DPI) -> None:
    """Write the loss curve (log scale) and the fitted line to the PNG ``path``.

    The left panel shows the excess loss ``L(theta_k) - L(theta_lstsq)`` per epoch, which
    goes to zero as the fit converges; the right one the data with both lines.
    """
    Figure = _figure_class()
    fig = Figure(figsize=REGRESSION_FIGSIZE, dpi=dpi, layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    spec = REGRESSION_OPTIMIZERS[result.optimizer]
    mode = "full batch" if result.batch_size is None else f"batch size {result.batch_size}"
    excess = np.maximum(result.losses - result.lstsq_loss, np.finfo(np.float64).tiny)
    ax.semilogy(np.arange(len(excess)), excess, color="C0")
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"$L(\theta) - L(\theta_{\mathrm{lstsq}})$ (log scale)")
    lr = f"{result.lr:g}" if not result.lr_decay else f"{result.lr:g}/(1 + {result.lr_decay:g}k)"
    ax.set_title(f"{spec.label}, lr={lr}, {mode}: excess loss")
    ax.grid(True, which="both", alpha=0.3)

    order = np.argsort(result.x)
    xs = result.x[order]
    ax2.scatter(result.x, result.y, s=12, color="0.5", label="data")
    ax2.plot(xs, result.lstsq[0] + result.lstsq[1] * xs, "k--", lw=2, label="least squares")
    ax2.plot(xs, result.theta[0] + result.theta[1] * xs, color="C0", label="fastrms fit")
    ax2.plot(xs, 4 + 3 * xs, color="C2", lw=1, label="true: y = 4 + 3x")
    ax2.set_xlabel("x")
    ax2.set_ylabel("y")
    b, s = result.theta
    ax2.set_title(f"after {result.epochs} epochs ({result.steps} steps): y = {b:.3f} + {s:.3f}x")
    ax2.legend(loc="upper left")
    fig.savefig(path, format="png", dpi=dpi)


def _grid(objective: Objective, num: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x0, x1, y0, y1 = objective.bounds
    X, Y = np.meshgrid(np.linspace(x0, x1, num), np.linspace(y0, y1, num))
    return X, Y, objective.value(np.stack([X, Y]))


def _draw_panels(
    fig, result: PathsResult, marker_size: float = 6.0, line_width: float = 1.5, columns: int = 9
):
    """Contours, minima and start points; returns the axes and one empty line per path."""
    axes = fig.subplots(1, len(result.functions), squeeze=False)[0]
    lines = []
    for ax, fp in zip(axes, result.functions, strict=True):
        obj = fp.objective
        X, Y, Z = _grid(obj)
        if obj.log_levels:
            lo = max(float(Z.min()), 1e-3)
            levels = np.logspace(np.log10(lo), np.log10(float(Z.max())), 25)
        else:
            levels = np.linspace(float(Z.min()), float(Z.max()), 25)
        ax.contour(
            X, Y, Z, levels=levels, colors="0.72", linewidths=0.7, negative_linestyles="solid"
        )
        row = []
        for p in fp.paths:
            color, style = PATH_STYLES[p.optimizer]
            (line,) = ax.plot([], [], color=color, ls=style, lw=line_width, label=p.label)
            row.append(line)
        star = {"color": "gold", "mec": "black", "ms": 2.5 * marker_size, "zorder": 5}
        ax.plot(*fp.minimum, "*", label="minimum", **star)
        ax.plot(*obj.start, "o", color="black", ms=marker_size, zorder=5, label="start")
        lines.append(row)
        ax.set_xlim(obj.bounds[0], obj.bounds[1])
        ax.set_ylim(obj.bounds[2], obj.bounds[3])
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title(obj.title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=columns)
    return axes, lines


def plot_paths(result: PathsResult, path: str, dpi: int = PNG_DPI) -> None:
    """Write a contour plot with every path, one panel per function, to the PNG ``path``."""
    Figure = _figure_class()
    fig = Figure(figsize=PATHS_FIGSIZE, dpi=dpi, layout="constrained")
    _, lines = _draw_panels(fig, result)
    for fp, row in zip(result.functions, lines, strict=True):
        for p, line in zip(fp.paths, row, strict=True):
            line.set_data(p.points[:, 0], p.points[:, 1])
    fig.suptitle(f"Optimizer paths, {result.steps} steps (fastrms)")
    fig.savefig(path, format="png", dpi=dpi)


#: Size and resolution of the animation; kept small so the GIF stays well under 2 MB.
GIF_FIGSIZE = (12.0, 4.4)
GIF_DPI = 72


def frame_steps(steps: int, frames: int) -> np.ndarray:
    """Step shown in each frame: quadratically spaced, so the fast early moves get more frames.

    ``k_i = round(steps * (i / (frames - 1))**2)``, deduplicated, from 0 to ``steps``.
    """
    i = np.linspace(0.0, 1.0, max(frames, 2))
    return np.unique(np.round(steps * i**2).astype(int))


def animate_paths(
    result: PathsResult, path: str, frames: int = 40, fps: int = 10, dpi: int = GIF_DPI
) -> int:
    """Write an animated GIF of the paths (matplotlib's PillowWriter); returns the frame count.

    Frame ``i`` shows every path up to step :func:`frame_steps` ``(steps, frames)[i]``.
    """
    Figure = _figure_class()
    try:
        from matplotlib.animation import FuncAnimation, PillowWriter
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise PlotDependencyError(PLOT_INSTALL_HINT) from None
    fig = Figure(figsize=GIF_FIGSIZE, dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes, lines = _draw_panels(fig, result, marker_size=4.0, line_width=2.0, columns=5)
    title = fig.suptitle(" ")
    # Contours, axes and legend do not change, and redrawing them took most of the time per
    # frame; draw them once, then paint that picture under the moving lines and hide them.
    canvas.draw()
    background = np.asarray(canvas.buffer_rgba()).copy()
    fig.set_layout_engine("none")
    moving = {id(line) for row in lines for line in row}
    for ax in axes:
        for artist in ax.get_children():
            if id(artist) not in moving:
                artist.set_visible(False)
    for legend in fig.legends:
        legend.set_visible(False)
    fig.figimage(background, xo=0, yo=0, origin="upper", zorder=-10)
    ks = frame_steps(result.steps, frames)

    def draw(k: int) -> list:
        for fp, row in zip(result.functions, lines, strict=True):
            for p, line in zip(fp.paths, row, strict=True):
                line.set_data(p.points[: k + 1, 0], p.points[: k + 1, 1])
        title.set_text(f"Optimizer paths (fastrms), step {k} of {result.steps}")
        return [line for row in lines for line in row] + [title]

    anim = FuncAnimation(fig, draw, frames=ks, cache_frame_data=False)
    colors = [PATH_STYLES[p.optimizer][0] for p in result.functions[0].paths]
    anim.save(path, writer=_gif_writer(PillowWriter, fps, colors), dpi=dpi)
    return len(ks)


def _gif_writer(base: type, fps: int, colors: Sequence[str]):
    """A PillowWriter whose frames share one palette, without dithering.

    PillowWriter lets Pillow quantize and dither each frame on its own, so unchanged pixels
    differ from frame to frame and every frame is stored whole (1.5 MB here). With one palette
    and no dithering, each frame stores only what changed (about 0.6 MB). The palette comes from
    the last frame plus a swatch of every path color, so a path hidden under another keeps its
    own color.
    """
    from matplotlib.colors import to_rgb
    from PIL import Image

    class SharedPaletteWriter(base):
        def finish(self) -> None:
            frames = [f.convert("RGB") for f in self._frames]
            last = frames[-1]
            sample = Image.new("RGB", (last.width, last.height + 16), "white")
            sample.paste(last)
            side = max(1, last.width // max(1, len(colors)))
            for i, c in enumerate(colors):
                rgb = tuple(round(255 * v) for v in to_rgb(c))
                sample.paste(rgb, (i * side, last.height, (i + 1) * side, last.height + 16))
            palette = sample.quantize(255, method=Image.Quantize.MEDIANCUT)
            frames = [f.quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
            frames[0].save(
                self.outfile, save_all=True, append_images=frames[1:],
                duration=int(1000 / self.fps), loop=0,
            )  # fmt: skip

    return SharedPaletteWriter(fps=fps)
