"""The statistics and figures of :mod:`subspace_lab.analysis`."""

import pytest

from subspace_lab import analysis


def test_mcnemar_exact():
    mcnemar = analysis.mcnemar
    assert mcnemar("1010", "1010") == {"only_a": 0, "only_b": 0, "p_value": 1.0}
    assert mcnemar("000000", "111111") == {"only_a": 0, "only_b": 6, "p_value": 2 / 64}
    a, b = "1101101110011", "0110011101110"
    assert mcnemar(a, b)["p_value"] == mcnemar(b, a)["p_value"]
    with pytest.raises(ValueError):
        mcnemar("10", "1")


def test_largest_decline_spans_any_two_ranks_and_is_paired():
    decline = analysis.largest_decline
    rows = lambda *accs: [{"rank": 2 ** i, "test_accuracy": a} for i, a in enumerate(accs)]
    assert decline({"sweep": rows(0.2, 0.4, 0.4, 0.9)}) is None        # never falls
    # two neighbour falls of 0.1 add up to 0.2 between ranks 2 and 8
    fall = decline({"sweep": rows(0.1, 0.6, 0.5, 0.4, 0.7),
                    "test_correct": {"2": "11111100", "8": "11000011"}})
    assert (fall["low"], fall["high"], fall["only_low"], fall["only_high"]) == (2, 8, 4, 2)
    assert fall["points"] == pytest.approx(20.0)
    assert fall["p_value"] == pytest.approx(2 * (1 + 6 + 15) / 64)
    assert fall["pairs"] == 10 and fall["p_bonferroni"] == 1.0        # the worst of 10 pairs
    in_process = decline({"sweep": rows(0.1, 0.6, 0.5, 0.4, 0.7),     # int keys before JSON
                          "test_correct": {2: "11111100", 8: "11000011"}})
    assert in_process == fall
    assert "p_value" not in decline({"sweep": rows(0.5, 0.25)})          # no per-text record


def test_plots_write_one_png_per_call_and_refuse_nothing_to_draw(tmp_path):
    curves = analysis.plot_curves(tmp_path / "a" / "c.png", {
        "loss": {"x": ([1, 2, 3], [3.0, 2.0, 1.0])}, "acc": {"x": ([1, 2], [0.1, 0.2])}},
        logy=["loss"], title="t")
    bars = analysis.plot_bars(tmp_path / "b.png", {"m": {"val": 0.5}, "n": {"val": 0.7}})
    assert curves.read_bytes()[:4] == bars.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="panels is empty"):
        analysis.plot_curves(tmp_path / "x.png", {})
    with pytest.raises(ValueError, match="groups is empty"):
        analysis.plot_bars(tmp_path / "x.png", {})
