import matplotlib

matplotlib.use("Agg")

import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from numpyro_pma.plots import (  # noqa: E402
    plot_elbo_trace,
    plot_khat,
    plot_marginals,
    plot_pair,
    plot_regret,
)
from numpyro_pma.regret import regret_report  # noqa: E402


@pytest.fixture(autouse=True)
def close_new_figures():
    before = set(plt.get_fignums())
    yield
    for number in set(plt.get_fignums()) - before:
        plt.close(number)


def make_draws(seed, shift=0.0):
    rng = np.random.default_rng(seed)
    return {"mu": rng.normal(shift, 1.0, 300), "theta": rng.normal(size=(300, 3))}


def make_trace(num_steps=30):
    steps = np.arange(num_steps)
    return {
        "step_size": 0.5 / np.sqrt(steps + 1.0),
        "elbo": -1.0 - np.exp(-steps / 5.0),
        "elbo_stderr": np.full(num_steps, 0.02),
        "displacement": np.exp(-steps / 3.0),
        "accepted": steps % 9 != 4,
    }


def test_plot_marginals_one_axis_per_parameter():
    idata = az.from_dict(
        posterior={key: value[None] for key, value in make_draws(0).items()}
    )
    fig = plot_marginals({"fit": idata, "reference": make_draws(1, shift=0.3)})
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == [
        "mu",
        "theta[0]",
        "theta[1]",
        "theta[2]",
    ]
    for ax in fig.axes:
        assert len(ax.get_lines()) == 2
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["fit", "reference"]


def test_plot_marginals_var_names_and_axes():
    fig = plot_marginals({"a": make_draws(2)}, var_names=["theta"])
    assert len(fig.axes) == 3

    fig, axes = plt.subplots(1, 2)
    returned = plot_marginals(
        {"a": make_draws(3)}, var_names=["mu", "theta[2]"], axes=axes
    )
    assert returned is fig
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="axes has 2 axes"):
        plot_marginals({"a": make_draws(3)}, axes=axes)


def test_plot_marginals_constant_column():
    draws = {"c": np.full(50, 2.0), "x": np.linspace(0.0, 1.0, 50)}
    fig = plot_marginals({"a": draws})
    assert len(fig.axes) == 2
    assert len(fig.axes[0].get_lines()) == 1


def test_plot_marginals_missing_column_raises():
    with pytest.raises(ValueError, match="no columns"):
        plot_marginals({"a": make_draws(4), "b": {"mu": np.zeros(10)}})


@pytest.mark.parametrize(
    ("var_names", "num_axes"), [(["mu", "theta[0]"], 1), (["theta"], 3)]
)
def test_plot_pair_axes(var_names, num_axes):
    fig = plot_pair(make_draws(5), var_names)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == num_axes


def test_plot_pair_one_column_raises():
    with pytest.raises(ValueError, match="at least 2 columns"):
        plot_pair(make_draws(6), ["mu"])


def test_plot_elbo_trace_twin_axis():
    fig = plot_elbo_trace(make_trace())
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    assert fig.axes[1].get_yscale() == "log"
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "rejected step" in labels

    fig, ax = plt.subplots()
    assert plot_elbo_trace(make_trace(), ax=ax) is fig


def test_plot_regret_two_panels():
    report = regret_report(make_trace(), log_z=-1.0, log_z_stderr=0.01)
    fig = plot_regret(report)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    assert fig.axes[1].get_yscale() == "log"


def test_plot_khat_title_has_khat():
    rng = np.random.default_rng(7)
    # Log weights of a Student-t(3) target under a standard normal proposal have
    # a heavy right tail; the exact k-hat is whatever arviz.psislw returns.
    draws = rng.normal(size=1000)
    log_weights = -2.0 * np.log1p(draws**2 / 3.0) + 0.5 * draws**2
    _, khat = az.psislw(log_weights)
    fig = plot_khat(log_weights)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 1
    assert f"k-hat = {float(khat):.2f}" in fig.axes[0].get_title()


def test_plot_khat_invalid_raises():
    with pytest.raises(ValueError, match="shape"):
        plot_khat(np.zeros((3, 100)))
    with pytest.raises(ValueError, match="non-finite"):
        plot_khat(np.r_[np.zeros(20), np.inf])
