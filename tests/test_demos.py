"""Tests of the worked examples (fastrms.tools.demo) and their plots."""

from __future__ import annotations

import argparse
import struct
import sys

import numpy as np
import pytest
from scipy import linalg, optimize

import fastrms
from fastrms.tools.demo import command, paths, plots, regression, settings
from fastrms.tools.demo.testfunctions import BEALE, OBJECTIVES, ROSENBROCK, WAVY

# -- test functions ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_gradient_matches_finite_differences(name):
    obj = OBJECTIVES[name]

    def grad(p):
        out = np.empty(2)
        obj.gradient(p, out)
        return out

    for p in (np.array(obj.start), np.array([0.3, -0.7]), np.array([2.0, 0.4])):
        g = grad(p)
        fd = optimize.approx_fprime(p, obj.value, 1e-7)
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-4 * max(1.0, np.abs(g).max()))


def test_minima():
    assert BEALE.value(np.array([3.0, 0.5])) == 0.0
    assert ROSENBROCK.value(np.array([1.0, 1.0])) == 0.0
    m = WAVY.minimum()  # scipy's, from the start point
    g = np.empty(2)
    WAVY.gradient(m, g)
    assert np.abs(g).max() < 1e-8
    assert m == pytest.approx([3.8375, 0.0], abs=1e-3)
    # a minimum, not a saddle: the Hessian 0.2 - sin(x), 4 - sin(x) (at y = 0) is positive
    assert 0.2 - np.sin(m[0]) > 0
    # vectorized values (for the contour grid) agree with point values
    grid = np.stack(np.meshgrid([0.0, 1.0], [0.5, -1.0]))
    for obj in OBJECTIVES.values():
        values = obj.value(grid)
        assert values.shape == (2, 2)
        assert values[1, 0] == pytest.approx(obj.value(np.array([0.0, -1.0])))


# -- regression -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [None, 20])
def test_regression_reaches_lstsq(batch_size):
    r = regression.fit_regression("rmsprop", batch_size=batch_size)
    x, y = r.x, r.y
    X = np.column_stack([np.ones_like(x), x])
    np.testing.assert_allclose(r.lstsq, linalg.lstsq(X, y)[0])
    assert r.converged
    assert r.distance < 0.05
    assert np.abs(r.theta - r.lstsq).max() < 0.05
    assert r.losses[-1] == pytest.approx(np.mean((X @ r.theta - y) ** 2))
    batches = 1 if batch_size is None else 5
    assert r.steps == r.epochs * batches
    assert len(r.losses) == r.epochs + 1


def test_regression_data():
    x, y = regression.regression_data(np.random.default_rng(3), 100)
    assert x.shape == y.shape == (100,)
    assert x.min() >= 0 and x.max() < 2
    noise = y - (4 + 3 * x)
    assert abs(noise.mean()) < 0.3 and 0.7 < noise.std() < 1.3
    r1 = regression.fit_regression(max_iter=2, seed=3)
    np.testing.assert_array_equal(r1.x, x)  # the data comes first from the seeded generator


def test_regression_gradient_uses_batch_size():
    """One epoch of plain SGD, batches 30, 30, 30, 10, against a loop written here."""
    lr = 0.1
    r = regression.fit_regression("sgd", batch_size=30, lr=lr, tol=0.0, max_iter=1, seed=5)
    rng = np.random.default_rng(5)
    x, y = regression.regression_data(rng, 100)
    X = np.column_stack([np.ones(100), x])
    order = np.arange(100)
    rng.shuffle(order)
    theta = np.zeros(2)
    buggy = np.zeros(2)
    for start in range(0, 100, 30):
        idx = order[start : start + 30]
        theta -= lr * 2 / len(idx) * X[idx].T @ (X[idx] @ theta - y[idx])
        buggy -= lr * 2 / 100 * X[idx].T @ (X[idx] @ buggy - y[idx])
    assert r.steps == 4
    np.testing.assert_allclose(r.theta, theta, rtol=1e-12)
    assert np.abs(r.theta - buggy).max() > 0.1  # dividing by the data size is a different fit


def test_regression_every_optimizer_and_max_iter():
    for name in settings.REGRESSION_OPTIMIZERS:
        r = regression.fit_regression(name, max_iter=3)
        assert r.epochs == 3 and not r.converged
        assert r.losses[-1] < r.losses[0]
    text = regression.format_regression(r)
    assert "max-iter reached" in text and "3 epochs" in text
    with pytest.raises(ValueError, match="optimizer"):
        regression.fit_regression("lbfgs")


# -- paths --------------------------------------------------------------------------------------


def test_adaptive_paths_reach_the_wavy_minimum():
    result = paths.run_paths(["wavy"], ["adam", "rmsprop", "rmsprop-torch"])
    (fp,) = result.functions
    np.testing.assert_allclose(fp.minimum, WAVY.minimum())
    for path in fp.paths:
        assert path.points.shape == (result.steps + 1, 2)
        assert path.distance < 1e-2, path.label
    adam, in_sqrt, outside = fp.paths
    # eps = 1e-3 inside the sqrt damps the steps near the minimum and converges; outside it
    # RMSProp hovers about lr = 1e-2 away (see the demos module docstring)
    assert adam.steps_to() is not None and in_sqrt.steps_to() is not None
    assert outside.steps_to() is None and outside.distance > 1e-3


def test_path_is_the_optimizer_run_step_by_step():
    steps = 25
    path = paths.run_path(BEALE, "adam", steps)
    p = np.array(BEALE.start)
    g = np.empty(2)
    opt = fastrms.Adam(p, lr=settings.PATH_LR["beale"]["adam"])
    for k in range(1, steps + 1):
        BEALE.gradient(p, g)
        opt.step(g)
        np.testing.assert_array_equal(path.points[k], p)
    np.testing.assert_array_equal(path.points[0], BEALE.start)
    assert path.values[-1] == BEALE.value(p)


def test_steps_to_and_table():
    path = paths.Path(
        "adam", "Adam", 0.1, np.array([[0.0, 0.0], [0.5, 0.0], [0.9995, 0.0], [1.0, 0.0]]),
        np.zeros(4), np.array([1.0, 0.0]),
    )  # fmt: skip
    assert path.steps_to(1e-3) == 2
    assert path.steps_to(1e-6) == 3
    assert path.steps_to(2.0) == 0
    # reached means: and stays there to the last step
    passing = paths.Path(
        "sgd", "SGD", 0.1, np.array([[0.0, 0.0], [1.0, 0.0], [0.9, 0.0], [1.0, 0.0]]),
        np.zeros(4), np.array([1.0, 0.0]),
    )  # fmt: skip
    assert passing.steps_to(1e-3) == 3
    passing.points = passing.points[:3]
    assert passing.steps_to(1e-3) is None

    result = paths.run_paths(["rosenbrock"], ["adagrad", "graves"], steps=50)
    text = paths.format_paths(result)
    assert "rosenbrock" in text and "AdaGrad" in text and "RMSProp (Graves)" in text
    assert text.count("not reached") == 2  # 50 steps are far too few on Rosenbrock


def test_diverging_path_stops():
    path = paths.run_path(ROSENBROCK, "momentum", 200, lr=0.05)
    assert path.diverged
    assert len(path.points) < 201
    assert "diverged" in paths.format_paths(
        paths.PathsResult(200, [paths.FunctionPaths(ROSENBROCK, ROSENBROCK.minimum(), [path])])
    )


def test_run_paths_rejects_unknown_names():
    with pytest.raises(ValueError, match="function"):
        paths.run_paths(["himmelblau"])
    with pytest.raises(ValueError, match="optimizer"):
        paths.run_paths(optimizers=["lion"])


# -- Nesterov: the PyTorch form is the look-ahead form in other variables -----------------------


def _look_ahead_nesterov(gradient, start, lr, mu, steps):
    """Sutskever et al. (2013): v = mu*v - lr*grad(x + mu*v); x = x + v. Returns x and v."""
    x = np.array(start, dtype=np.float64)
    v = np.zeros(2)
    g = np.empty(2)
    xs, vs = [x.copy()], [v.copy()]
    for _ in range(steps):
        gradient(x + mu * v, g)
        v = mu * v - lr * g
        x = x + v
        xs.append(x)
        vs.append(v)
    return np.array(xs), np.array(vs)


def test_nesterov_iterates_are_the_look_ahead_points():
    """fastrms's (PyTorch's) Nesterov parameter is phi = x + mu*v of the look-ahead form.

    With phi = x + mu*v and buf = -v/lr, the look-ahead update becomes buf = mu*buf + g,
    phi -= lr*(g + mu*buf) with g = grad(phi): PyTorch's form. PyTorch starts its buffer at g
    on the first step, which is mu*0 + g, so v = 0 at the start matches exactly (dampening 0).
    The two compute the same numbers in a different order, so they agree to rounding only: a
    few ulps per step that the contracting iteration does not amplify (observed below 5e-15
    over 500 steps); 1e-12 leaves a wide margin and is far below a one-step difference.
    """
    mu = 0.9
    A = np.array([[3.0, 1.0], [1.0, 20.0]])
    b = np.array([1.0, -2.0])

    def quadratic_gradient(p, out):
        out[:] = A @ p - b

    cases = [(quadratic_gradient, (2.0, 1.0), 0.04, 200)]
    cases.append((BEALE.gradient, BEALE.start, settings.PATH_LR["beale"]["nesterov"], 500))
    for gradient, start, lr, steps in cases:
        p = np.array(start)
        g = np.empty(2)
        opt = fastrms.SGD(p, lr=lr, momentum=mu, nesterov=True)
        phi = [p.copy()]
        for _ in range(steps):
            gradient(p, g)
            opt.step(g)
            phi.append(p.copy())
        xs, vs = _look_ahead_nesterov(gradient, start, lr, mu, steps)
        np.testing.assert_allclose(np.array(phi), xs + mu * vs, rtol=1e-12, atol=1e-12)
        # the momentum buffer is -v/lr
        np.testing.assert_allclose(
            opt.state["momentum_buffer"][0], -vs[-1] / lr, rtol=1e-9, atol=1e-12
        )
        # the parameter is the look-ahead point, not x itself ...
        assert np.abs(np.array(phi) - xs).max() > 1e-3
        # ... nor the "x + v" look-ahead of some tutorials, which is a different method
        _, ws = _look_ahead_variant(gradient, start, lr, mu, steps)
        assert np.abs(np.array(phi) - ws).max() > 1e-4


def _look_ahead_variant(gradient, start, lr, mu, steps):
    """The non-standard variant: v = mu*v - lr*grad(x + v); x = x + v. Returns x and x + v."""
    x = np.array(start, dtype=np.float64)
    v = np.zeros(2)
    g = np.empty(2)
    xs, ws = [x.copy()], [x.copy()]
    for _ in range(steps):
        gradient(x + v, g)
        v = mu * v - lr * g
        x = x + v
        xs.append(x)
        ws.append(x + v)
    return np.array(xs), np.array(ws)


def test_demo_nesterov_path_is_fastrms_sgd():
    path = paths.run_path(BEALE, "nesterov", 100)
    lr = settings.PATH_LR["beale"]["nesterov"]
    xs, vs = _look_ahead_nesterov(BEALE.gradient, BEALE.start, lr, 0.9, 100)
    np.testing.assert_allclose(path.points, xs + 0.9 * vs, rtol=1e-12, atol=1e-12)


# -- plots --------------------------------------------------------------------------------------


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _expected(figsize, dpi) -> tuple[int, int]:
    return round(figsize[0] * dpi), round(figsize[1] * dpi)


def test_regression_plot(tmp_path):
    pytest.importorskip("matplotlib")
    Image = pytest.importorskip("PIL.Image")
    out = tmp_path / "regression.png"
    plots.plot_regression(regression.fit_regression(max_iter=20), str(out), dpi=40)
    assert _png_size(out) == _expected(plots.REGRESSION_FIGSIZE, 40)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == _expected(plots.REGRESSION_FIGSIZE, 40)


@pytest.fixture(scope="module")
def small_paths():
    return paths.run_paths(["beale", "wavy"], ["momentum", "adam"], steps=30)


def test_paths_plot(tmp_path, small_paths):
    pytest.importorskip("matplotlib")
    out = tmp_path / "paths.png"
    plots.plot_paths(small_paths, str(out), dpi=40)
    assert _png_size(out) == _expected(plots.PATHS_FIGSIZE, 40)


def test_paths_animation(tmp_path, small_paths):
    pytest.importorskip("matplotlib")
    Image = pytest.importorskip("PIL.Image")
    out = tmp_path / "paths.gif"
    n = plots.animate_paths(small_paths, str(out), frames=6, dpi=30)
    with Image.open(out) as im:
        assert im.format == "GIF"
        assert im.size == _expected(plots.GIF_FIGSIZE, 30)
        assert im.n_frames == n > 1
        first = np.asarray(im.convert("RGB"))
        im.seek(n - 1)
        last = np.asarray(im.convert("RGB"))
    assert (first != last).any()  # the paths grow
    assert out.stat().st_size < 2_000_000


def test_frame_steps():
    ks = plots.frame_steps(1000, 40)
    assert ks[0] == 0 and ks[-1] == 1000
    assert np.all(np.diff(ks) > 0)
    assert ks[len(ks) // 2] < 500  # early steps get more frames
    assert list(plots.frame_steps(3, 40)) == [0, 1, 2, 3]


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Make every ``import matplotlib...`` fail, as without the package."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_missing_matplotlib_raises_a_clear_error(no_matplotlib, tmp_path, small_paths):
    fitted = regression.fit_regression(max_iter=2)
    calls = [(plots.plot_regression, fitted)]
    calls += [(plots.plot_paths, small_paths), (plots.animate_paths, small_paths)]
    for draw, result in calls:
        with pytest.raises(plots.PlotDependencyError, match=r'pip install "fastrms\[plot\]"'):
            draw(result, str(tmp_path / "x"))
    assert not list(tmp_path.iterdir())


def _demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrms")
    command.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "regression", "--max-iter", "3"],
        ["demo", "paths", "--steps", "5", "--functions", "wavy", "--animate", "{tmp}/x.gif"],
    ],
)
def test_cli_without_matplotlib_says_what_to_install(no_matplotlib, tmp_path, capsys, argv):
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--plot", str(tmp_path / "plot.png")]
    args = _demo_parser().parse_args(argv)
    assert args.func(args) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == f"fastrms demo: {plots.PLOT_INSTALL_HINT}"
    assert 'pip install "fastrms[plot]"' in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not list(tmp_path.iterdir())


def test_cli_commands(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    parser = _demo_parser()
    out = tmp_path / "reg.png"
    args = parser.parse_args(
        ["demo", "regression", "--batch-size", "25", "--max-iter", "5", "--plot", str(out)]
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "mini-batches of 25" in text and "distance to lstsq" in text and "5 epochs" in text
    assert out.exists()

    args = parser.parse_args(["demo", "paths", "--steps", "10", "--optimizers", "adam", "graves"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    for obj in OBJECTIVES.values():
        assert f"{obj.name}: start" in text
    assert text.count("Adam") == 3 and "SGD" not in text

    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        parser.parse_args(["demo", "paths", "--steps", "0"])
    assert "argument --steps" in capsys.readouterr().err


def test_fastrms_command_has_the_demos(capsys):
    cli = pytest.importorskip("fastrms.cli")
    pytest.importorskip("fastrms.tools.bench.command")
    assert cli.main(["demo", "regression", "--max-iter", "2"]) == 0
    assert "iterations: 2 epochs" in capsys.readouterr().out
