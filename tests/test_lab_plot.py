"""lab.png (issue 21, item 19): CHAIR drawn as paired differences with their intervals, every layer axis
named by its convention with integer ticks, no label outside the picture."""
import json

import pytest

from hallupatch.eval import cli, lab

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "lab"
    results = cli.run(["lab", "--limit", "6", "--threshold", "0.5", "--no-progress", "--no-plot", "--output", str(out)])
    return out, results


def test_lab_png_draws_differences_and_names_each_layer_convention(lab_run):
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    out, results = lab_run
    fig = lab.figure(out, results)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        page = fig.bbox
        layer_axes = []
        for ax in fig.axes:
            for label in (ax.xaxis.label, ax.yaxis.label, ax.title):
                box = label.get_window_extent(renderer)
                if label.get_text():   # nothing clipped at the figure's edges
                    assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 \
                        and box.y1 <= page.y1 + 1, label.get_text()
            for axis in (ax.xaxis, ax.yaxis):
                if "layer" in axis.label.get_text():
                    layer_axes.append(axis)
        assert len(layer_axes) == 3
        for axis in layer_axes:
            text = axis.label.get_text()
            assert ("decoder layer" in text) != ("hidden-state index" in text), text   # one convention each
            assert all(float(t).is_integer() for t in axis.get_majorticklocs()), text

        chair = json.loads((out / "chair" / "comparison.json").read_text())
        others = [m for m in chair["methods"] if m != chair["baseline"]]
        ax = next(a for a in fig.axes if a.get_title().startswith("CHAIR"))
        assert [t.get_text() for t in ax.get_xticklabels()] == others   # the baseline has no bar of its own
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert len(bars) == 2
        for container, metric in zip(bars, ("CHAIRs", "CHAIRi")):
            heights = [bar.get_height() for bar in container]
            assert heights == pytest.approx([chair["methods"][m]["difference"][metric] for m in others])
            segments = container.errorbar.lines[2][0].get_segments()
            for (low, high), m in zip(([s[0][1], s[1][1]] for s in segments), others):
                assert (low, high) == pytest.approx(tuple(chair["methods"][m]["test"][metric]["ci95"]))
    finally:
        plt.close(fig)
