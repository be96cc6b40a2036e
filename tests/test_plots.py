"""The run's f1_per_round.png: integer round ticks, each site's noise parameters in its legend
entry, and with many sites their median and quartiles instead of a line each."""

from __future__ import annotations

import matplotlib.pyplot as plt

from snowfed.report.plots import MAX_NODE_LEGEND, f1_figure, noise_label, plot_f1_per_round


def _records(sites: list[str], rounds: int = 3) -> list[dict]:
    records = [{"round": r, "scope": "global", "f1": 0.2 * r} for r in range(rounds + 1)]
    for r in range(1, rounds + 1):
        for i, site in enumerate(sites):
            records.append({"round": r, "scope": "node", "node": site, "phase": "evaluate",
                            "f1": (i + r) / (len(sites) + rounds)})
            records.append({"round": r, "scope": "node", "node": site, "phase": "train",
                            "local-f1": 0.5})
    return records


def test_noise_label_names_the_parameters_that_act():
    assert noise_label("symmetric", {"kind": "symmetric", "rate": 0.4}) == "symmetric rate 0.4"
    assert noise_label("clean", {"p_remove": 0.0, "sigma": 0.0, "simplify_every": 1,
                                 "bounding_box": False}) == "clean"
    assert noise_label("noisy_hd", {"p_remove": 0.5, "sigma": 4.0, "simplify_every": 8,
                                    "bounding_box": False}) == "noisy_hd p_remove 0.5 sigma 4 simplify 8"
    assert noise_label("bb", {"p_remove": 0.0, "sigma": 0.0, "simplify_every": 1,
                              "bounding_box": True}) == "bb bounding box"
    assert noise_label("crowd", {"noise": [{}, {}, {}], "fusion": "dawid_skene"}) == \
        "crowd: 3 annotators, dawid_skene"


def test_legend_names_each_sites_noise_and_rounds_are_integers():
    sites = ["site0", "site1"]
    labels = {"site0": "symmetric rate 0", "site1": "symmetric rate 0.4"}
    fig = f1_figure(_records(sites), labels)
    ax = fig.axes[0]
    entries = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "site1 (symmetric rate 0.4)" in entries and "site0 (symmetric rate 0)" in entries
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plt.close(fig)


def test_many_sites_are_a_median_and_a_band(tmp_path):
    sites = [f"site{i}" for i in range(MAX_NODE_LEGEND + 30)]
    fig = f1_figure(_records(sites))
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 2  # the global model and the sites' median, not 42 lines
    entries = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"sites: median of {len(sites)}" in entries and "sites: quartiles" in entries
    plt.close(fig)
    plot_f1_per_round(_records(sites), tmp_path / "f1.png")
    assert (tmp_path / "f1.png").read_bytes()[:4] == b"\x89PNG"
