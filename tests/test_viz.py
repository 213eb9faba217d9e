"""The figures' helpers: lines that can be told apart."""

from maetok.viz import line_style, plot_overlay


def test_thirty_lines_of_a_panel_each_look_different():
    styles = {tuple(sorted(line_style(j).items())) for j in range(30)}
    assert len(styles) == 30


def test_overlay_of_more_lines_than_colours_writes_a_figure(tmp_path):
    lines = {f"run {j}": ([0, 1, 2], [1.0, 0.5 / (j + 1), None]) for j in range(12)}
    out = plot_overlay([("runs", lines)], tmp_path / "curves.png", ylabel="loss")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
