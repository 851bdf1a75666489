"""The theory panel (analysis/theory.py): exact oracle curves per regime, no training."""

import pandas as pd

from deepgrpo.cli import main as deepgrpo_main


def test_theory_panel_curves_obey_the_identity(tmp_path, capsys):
    assert deepgrpo_main(["study", "theory", "--out", str(tmp_path)]) == 0
    d = tmp_path / "theory"
    t = pd.read_csv(d / "curves.csv")
    assert len(t) == 3 * 2 * 13 and set(t.recovery) == {"fatal", "constant", "decay"}
    assert (t.identity - t.s_fail).abs().max() < 1e-12  # E[s|fail] = (p - E[s^2]) / (1 - p)
    assert (t.s_fail <= t.p + 1e-12).all()  # never more recoverable than the root, per continuation
    last = t[t.k == t.k.max()]
    assert (last.s_fail.abs() < 1e-12).all() and (last.mixed.abs() < 1e-12).all()  # a finished failed chain
    # fatal errors: the mixed-group chance only falls with depth (a derailed chain never recovers)
    for _, g in t[t.recovery == "fatal"].groupby("heterogeneity"):
        assert (g.mixed.diff().dropna() <= 1e-12).all()
    section = (d / "section.md").read_text()
    assert section.count("below p at every depth") == 6 and (d / "theory.png").stat().st_size > 10_000
    assert deepgrpo_main(["study", "theory", "--K", "1", "--out", str(tmp_path)]) == 2
    assert "--K" in capsys.readouterr().err
