"""Plotting: every function returns a Figure with the expected panels, token cells are drawn at
the layout's pixel boxes (LLaVA pad and crop, InternVL tiles and thumbnail), NaN cells stay blank
(hatched grey in head maps, where blank would read as 0), and save_figure never leaves a partial
file."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from PIL import Image

from hooked_vlm import HookedVLM
from hooked_vlm.plotting.charts import NOT_MEASURED, NOT_MEASURED_NOTE
from hooked_vlm.plotting import (
    attention_knockout_figure,
    attention_to_image,
    head_heatmap,
    head_mediation_figure,
    layer_curves,
    matrix_plot,
    save_figure,
    token_overlay,
    top_heads,
)


@pytest.fixture(scope="module")
def llava(tiny_checkpoint):
    return HookedVLM.from_pretrained(tiny_checkpoint("llava_base"))


@pytest.fixture(scope="module")
def internvl(tiny_checkpoint):
    return HookedVLM.from_pretrained(tiny_checkpoint("internvl_6b"))


def collection(ax, gid: str) -> PatchCollection:
    (found,) = [c for c in ax.collections if c.get_gid() == gid]
    return found


def drawn_boxes(ax, gid: str) -> np.ndarray:
    """The cells of a token collection as (x1, y1, x2, y2) in data (= original-image pixel) coordinates."""
    cells = collection(ax, gid)
    assert cells.get_transform() == ax.transData
    return np.array([[*p.get_extents().min, *p.get_extents().max] for p in cells.get_paths()]).reshape(-1, 4)


def visible(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


# ----------------------------------------------------------------------------- head_heatmap
def test_head_heatmap_returns_a_map_and_a_colorbar():
    fig = head_heatmap(torch.rand(4, 6), title="MF")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    assert fig.axes[0].images[0].get_array().shape == (4, 6)
    assert fig.axes[0].get_title() == "MF"


def test_head_heatmap_centres_signed_values_at_zero_with_a_diverging_map():
    values = np.array([[0.2, -0.1], [0.9, 0.0]])
    image = head_heatmap(values).axes[0].images[0]
    assert (image.norm.vmin, image.norm.vmax) == (-0.9, 0.9)
    assert image.cmap.name.startswith("RdBu_r")
    unsigned = head_heatmap(np.abs(values)).axes[0].images[0]
    assert (unsigned.norm.vmin, unsigned.norm.vmax) == (0.0, 0.9)


def test_head_heatmap_draws_unmeasured_heads_hatched_grey_not_as_zero():
    """On the diverging map 0 is white; a NaN head (not measured) is an opaque grey cell under
    hatching, and the axis says so."""
    values = np.array([[0.5, np.nan], [np.nan, -0.5]])
    ax = head_heatmap(values).axes[0]
    image = ax.images[0]
    np.testing.assert_array_equal(np.ma.getmaskarray(image.get_array()), [[False, True], [True, False]])
    colours = image.to_rgba(image.get_array())
    grey, zero = colours[0, 1], image.cmap(image.norm(0.0))
    assert tuple(grey) == tuple(colours[1, 0]) == NOT_MEASURED == tuple(image.cmap.get_bad()) and grey[3] == 1
    assert np.abs(np.array(grey[:3]) - np.array(zero[:3])).max() > 0.05  # distinguishable from MF 0
    hatched = [p for p in ax.patches if p.get_gid() == "not-measured"]
    assert sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in hatched) == [(0, 1), (1, 0)]  # (head, layer)
    assert all(p.get_hatch() for p in hatched) and NOT_MEASURED_NOTE in ax.get_xlabel()


def test_head_heatmap_without_nan_has_no_not_measured_note():
    ax = head_heatmap(np.array([[0.5, 0.0], [0.1, -0.5]])).axes[0]
    assert ax.get_xlabel() == "head" and not [p for p in ax.patches if p.get_gid() == "not-measured"]


def test_head_heatmap_marks_and_labels_the_top_k_heads():
    values = np.zeros((3, 4))
    values[2, 1], values[0, 3], values[1, 0] = 0.9, 0.7, -1.0
    values[1, 2] = np.nan
    ax = head_heatmap(values, annotate_top=2).axes[0]
    marks = [p for p in ax.patches if p.get_gid() == "top-head"]
    assert [(p.get_x() + 0.5, p.get_y() + 0.5) for p in marks] == [(1, 2), (3, 0)]
    assert [t.get_text() for t in ax.texts] == ["L2H1", "L0H3"]
    assert top_heads(values, 100)[-1] == (1, 0)  # the NaN head is never ranked; negatives rank last


def test_head_heatmap_draws_into_a_given_axes():
    fig = Figure()
    ax = fig.add_subplot()
    assert head_heatmap(np.ones((2, 2)), ax=ax) is fig
    assert len(ax.images) == 1


def test_head_heatmap_rejects_a_non_matrix():
    with pytest.raises(ValueError, match="layer, head"):
        head_heatmap(np.ones(5))


# ----------------------------------------------------------------------------- layer_curves
@pytest.fixture
def knockout_table() -> pd.DataFrame:
    groups = ["0–3", "4–7", "8–11", "12–15", "all"]
    rows = [
        dict(task=task, group=g, seed=s, accuracy=base - 0.1 * i + 0.01 * s)
        for task, base in (("localization", 0.4), ("classification", 0.6))
        for i, g in enumerate(groups)
        for s in range(3)
    ]
    return pd.DataFrame(rows)


def test_layer_curves_draw_one_line_and_sd_band_per_condition_and_a_dashed_baseline(knockout_table):
    per_task = {"localization": 0.4, "classification": 0.6}
    fig = layer_curves(knockout_table, x="group", condition="task", baseline=per_task)
    (ax,) = fig.axes
    lines = [line for line in ax.lines if line.get_gid() != "baseline"]
    assert [line.get_label() for line in lines] == ["localization", "classification"]
    expected = knockout_table.groupby(["task", "group"], sort=False)["accuracy"].agg(["mean", "std"])
    np.testing.assert_allclose(lines[0].get_ydata(), expected.loc["localization"]["mean"])
    bands = [c for c in ax.collections if c.get_gid() == "sd-band"]
    assert len(bands) == 2
    top = bands[0].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx((expected.loc["localization"]["mean"] + expected.loc["localization"]["std"]).max())
    baselines = [line for line in ax.lines if line.get_gid() == "baseline"]
    assert [line.get_linestyle() for line in baselines] == ["--", "--"]
    assert baselines[0].get_color() == lines[0].get_color()  # coloured like its condition


def test_layer_curves_ci95_band_is_the_confidence_interval_of_the_mean(knockout_table):
    ax = layer_curves(knockout_table, x="group", condition="task", band="ci95").axes[0]
    (band, _) = [c for c in ax.collections if c.get_gid() == "ci95-band"]
    expected = knockout_table.groupby(["task", "group"], sort=False)["accuracy"].agg(["mean", "std", "count"])
    half = 1.96 * expected["std"] / np.sqrt(expected["count"])
    top = band.get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx((expected.loc["localization"]["mean"] + half.loc["localization"]).max())
    with pytest.raises(ValueError, match="band"):
        layer_curves(knockout_table, x="group", condition="task", band="iqr")


def test_layer_curves_keep_group_labels_in_order_of_appearance(knockout_table):
    ax = layer_curves(knockout_table, x="group", condition="task").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0–3", "4–7", "8–11", "12–15", "all"]


def test_layer_curves_take_a_dict_of_series_with_numeric_x():
    curves = {
        "localization heads": pd.Series([0.4, 0.1, 0.05], index=[0.0, 0.02, 0.01]),
        "control": pd.Series([0.4, 0.39, 0.38], index=[0.0, 0.01, 0.02]),
    }
    (ax,) = layer_curves(curves, x="fraction of heads removed", baseline=0.4).axes
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [0.0, 0.01, 0.02])  # sorted
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.4, 0.05, 0.1])
    assert not [c for c in ax.collections if c.get_gid() == "sd-band"]  # one value per x: no band
    assert ax.get_xlabel() == "fraction of heads removed"


def test_layer_curves_mark_section_boundaries():
    probe = pd.DataFrame({"layer": range(10), "accuracy": np.linspace(0.9, 0.3, 10)})
    sections = {"vision": (0, 4), "projector": (5, 5), "LM": (6, 9)}
    ax = layer_curves(probe, sections=sections).axes[0]
    boundaries = [line.get_xdata()[0] for line in ax.lines if line.get_gid() == "section-boundary"]
    assert boundaries == [4.5, 5.5]
    assert [t.get_text() for t in ax.texts] == ["vision", "projector", "LM"]
    with pytest.raises(KeyError, match="section"):
        layer_curves(probe, sections={"LM": (6, 12)})


def test_layer_curves_reject_missing_columns(knockout_table):
    with pytest.raises(KeyError, match="layer"):
        layer_curves(knockout_table)


# ----------------------------------------------------------------------------- matrix_plot
def test_matrix_plot_annotates_the_mean_of_each_cell_and_leaves_missing_ones_blank():
    df = pd.DataFrame(
        [dict(p=p, s=s, seed=seed, accuracy=10 * p + s + seed) for p in (1, 2) for s in (0, 1, 2) for seed in (0, 1)]
    ).query("not (p == 2 and s == 0)")
    fig = matrix_plot(df, "p", "s", "accuracy")
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["10.5", "11.5", "12.5", "21.5", "22.5"]
    image = ax.images[0]
    assert image.to_rgba(image.get_array())[1, 0, 3] == 0


# ----------------------------------------------------------------------------- token_overlay
@pytest.mark.parametrize("photo", ["coffee_wide", "grace_hopper_tall"])
@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_token_overlay_draws_highlighted_tokens_at_their_layout_boxes(llava, photos, mode, photo):
    image = photos[photo]
    layout = llava.prepare(image, "Where is it?", image_mode=mode).layout
    chosen = layout.position[::2]  # every other token, padding-only ones included
    fig = token_overlay(image, layout, positions=chosen)
    (ax,) = fig.axes
    assert ax.images[0].get_extent() == [0, image.width, image.height, 0]  # data coords = original pixels
    expected = layout.box[::2][visible(layout.box[::2])]
    np.testing.assert_allclose(drawn_boxes(ax, "token-highlight"), expected.numpy(), atol=1e-4)
    assert ax.get_title() == "grid"


def test_token_overlay_skips_tokens_that_see_only_padding(llava, photos):
    layout = llava.prepare(photos["coffee_wide"], "Where?", image_mode="pad").layout
    assert not visible(layout.box).all()  # the fixture really has padding-only tokens
    ax = token_overlay(photos["coffee_wide"], layout, values=torch.arange(len(layout)).float()).axes[0]
    cells = collection(ax, "token-values")
    np.testing.assert_array_equal(cells.get_array(), torch.nonzero(visible(layout.box))[:, 0].float().numpy())


def test_token_overlay_colours_values_with_a_colorbar_and_outlines_highlights(llava, photos):
    image = photos["chelsea"]
    layout = llava.prepare(image, "Where?").layout
    values = torch.linspace(0, 1, len(layout))
    values[3] = float("nan")
    fig = token_overlay(image, layout, values=values, positions=layout.position[:2], box={"GT": (10, 20, 200, 150)})
    assert len(fig.axes) == 2  # the panel and one colorbar
    ax = fig.axes[0]
    assert len(collection(ax, "token-values").get_array()) == len(layout) - 1  # the NaN cell is not drawn
    outlines = collection(ax, "token-highlight")
    assert outlines.get_facecolor().size == 0 and len(outlines.get_paths()) == 2  # outlined, not filled
    (gt,) = [p for p in ax.patches if p.get_gid() == "pixel-box"]
    assert gt.get_bbox().bounds == (10, 20, 190, 130)


def test_token_overlay_rejects_values_of_the_wrong_length(llava, photos):
    layout = llava.prepare(photos["chelsea"], "Where?").layout
    with pytest.raises(ValueError, match="one number per image token"):
        token_overlay(photos["chelsea"], layout, values=np.zeros(len(layout) + 1))


@pytest.mark.parametrize("views", ["tiles", "local", 1, [0, 3], True])
def test_token_overlay_rejects_unknown_views(llava, photos, views):
    layout = llava.prepare(photos["chelsea"], "Where?").layout
    with pytest.raises(ValueError, match="view"):
        token_overlay(photos["chelsea"], layout, views=views)


def test_token_overlay_rejects_positions_and_images_that_are_not_the_layouts(llava, photos):
    layout = llava.prepare(photos["chelsea"], "Where?").layout
    with pytest.raises(ValueError, match="not image tokens"):
        token_overlay(photos["chelsea"], layout, positions=[0])
    with pytest.raises(ValueError, match="layout's image 0"):
        token_overlay(photos["rocket"], layout)


def test_token_overlay_draws_one_panel_per_internvl_view_tiles_then_thumbnail(internvl, photos):
    image = photos["coffee_wide"]
    layout = internvl.prepare(image, "Where?").layout
    names = layout.view_names()
    assert len(names) > 1 and names[-1] == "thumbnail"
    fig = token_overlay(image, layout, positions=layout.position)
    assert [ax.get_title() for ax in fig.axes] == names
    for v, ax in enumerate(fig.axes):
        in_view = layout.box[layout.view == v]
        np.testing.assert_allclose(drawn_boxes(ax, "token-highlight"), in_view[visible(in_view)].numpy(), atol=1e-4)
        extents = [p.get_bbox().extents for p in ax.patches if p.get_gid() == "view-extent"]
        if layout.views[0][v].is_global:
            assert extents == []
        else:  # a tile is outlined where its tokens lie
            expected = [*in_view[:, :2].min(0).values, *in_view[:, 2:].max(0).values]
            np.testing.assert_allclose(extents, [expected], atol=1e-4)
    assert [ax.get_title() for ax in token_overlay(image, layout, views="global").axes] == ["thumbnail"]
    assert [ax.get_title() for ax in token_overlay(image, layout, views="local").axes] == names[:-1]
    chosen = token_overlay(image, layout, views=[len(names) - 1, 0])
    assert [ax.get_title() for ax in chosen.axes] == [names[0], "thumbnail"]


# ----------------------------------------------------------------------------- attention_to_image
def test_attention_to_image_reads_one_heads_pattern_row_at_the_image_tokens(llava, photos):
    inputs = llava.prepare(photos["chelsea"], "Where is the cat?")
    _, cache = llava.run_with_cache(inputs, names_filter=lambda name: name.endswith("attn.hook_pattern"))
    values = attention_to_image(cache, inputs.layout, layer=1, head=2, query_position=-1)
    pattern = cache["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(values, pattern[0, 2, -1, inputs.layout.positions()])
    assert values.shape == (len(inputs.layout),) and 0 < values.sum() <= 1
    assert isinstance(token_overlay(photos["chelsea"], inputs.layout, values=values), Figure)


def test_attention_to_image_reads_the_images_batch_row(llava, photos):
    layout = llava.prepare([photos["chelsea"], photos["rocket"]], ["Where?", "Where is the rocket?"]).layout
    n_pos = int(layout.position.max()) + 1
    pattern = torch.arange(2 * 3 * n_pos * n_pos, dtype=torch.float).reshape(2, 3, n_pos, n_pos)
    cache = {"blocks.0.attn.hook_pattern": pattern}
    row = layout.image_batch_row[1]
    expected = pattern[row, 1, 5, layout.positions(1)]
    torch.testing.assert_close(attention_to_image(cache, layout, 0, 1, 5, image_index=1), expected)
    other = attention_to_image(cache, layout, 0, 1, 5, image_index=1, batch_index=1 - row)
    torch.testing.assert_close(other, pattern[1 - row, 1, 5, layout.positions(1)])


@pytest.mark.parametrize(
    "where, message",
    [(dict(layer=7), "layer 7"), (dict(head=3), "head 3"), (dict(query_position=99), "query position 99"),
     (dict(image_index=2), "image index 2")],
)  # fmt: skip
def test_attention_to_image_names_what_is_out_of_range(llava, photos, where, message):
    layout = llava.prepare(photos["chelsea"], "Where?").layout
    n_pos = int(layout.position.max()) + 2
    cache = {"blocks.0.attn.hook_pattern": torch.rand(1, 3, n_pos, n_pos)}
    args = dict(layer=0, head=0, query_position=-1) | where
    with pytest.raises(IndexError, match=message):
        attention_to_image(cache, layout, **args)


# ----------------------------------------------------------------------------- experiment figures
def test_knockout_figure_draws_each_target_and_padding_and_the_unablated_baseline():
    rows = [{"target": "baseline", "layers": None, "group_size": None, "padding": None, "loc_score": 0.9}]
    for layers in ("0", "1", "all"):
        for target in ("object", "random"):
            for padding in (0, 1):
                score = 0.0 if padding else (0.3 if target == "object" else 0.6)
                rows.append({"target": target, "layers": layers, "group_size": 1, "padding": padding, "loc_score": score})
    results = pd.DataFrame(rows).astype({"padding": "Int64", "group_size": "Int64"})
    axes = attention_knockout_figure(results).axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert {"object+0", "object+1", "random+0", "random+1"} <= set(lines)
    assert list(lines["random+0"].get_ydata()) == [0.6, 0.6, 0.6]
    assert [line.get_ydata()[0] for line in axes.get_lines() if line.get_gid() == "baseline"] == [0.9]


def _annotated_heads(mf: list[list[float]]) -> int:
    rows = [{"pair_id": 0, "layer": layer, "head": head, "mf": value} for layer, values in enumerate(mf) for head, value in enumerate(values)]
    figure = head_mediation_figure(pd.DataFrame(rows))
    return sum(patch.get_gid() == "top-head" for patch in figure.axes[0].patches)


def test_head_map_labels_only_heads_with_a_share_of_the_largest_mediation():
    assert _annotated_heads([[0.4, 4e-8, 3e-8, 0.0], [0.1, -0.2, 2e-8, 1e-8]]) == 2
    assert _annotated_heads([[-0.1, -1e-8], [0.0, -0.3]]) == 0


# ----------------------------------------------------------------------------- save_figure
def test_save_figure_writes_a_png_and_no_temporary_file(tmp_path):
    path = save_figure(head_heatmap(np.random.rand(3, 4)), tmp_path / "new" / "dir" / "mf.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 0
    assert [p.name for p in path.parent.iterdir()] == ["mf.png"]


def test_save_figure_failing_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    fig = head_heatmap(np.random.rand(3, 4))
    kept = save_figure(fig, tmp_path / "kept.png").read_bytes()

    def half_written(file, **kwargs):
        file.write(b"\x89PNG\r\n\x1a\n partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, tmp_path / "fresh.png")
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, tmp_path / "kept.png")
    assert [p.name for p in tmp_path.iterdir()] == ["kept.png"]  # no fresh.png, no temporary file
    assert (tmp_path / "kept.png").read_bytes() == kept


def test_figures_are_not_registered_with_pyplot():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    head_heatmap(np.ones((2, 2)))
    matrix_plot(pd.DataFrame({"p": [0, 1], "s": [0, 1], "accuracy": [1.0, 2.0]}), "p", "s", "accuracy")
    assert plt.get_fignums() == before  # nothing for pyplot to leak or show


@pytest.mark.parametrize("family", ["toy-llava"])
def test_every_experiment_figure_draws_from_its_table(family):
    """Each `*_figure` draws the table its experiment returns (the CLI saves them as figure.png)."""
    from hooked_vlm import plotting
    from hooked_vlm.experiments import (attention_knockout, cumulative_head_ablation, evaluate, head_mediation, mediation_map,
                                        object_extension, position_probe, token_ablation, token_shuffle)  # fmt: skip
    from hooked_vlm.toy_models import toy_dataset

    model = HookedVLM.from_pretrained(family)
    data, pairs = toy_dataset(family, 4), toy_dataset(family, 3, split="pairs")
    mediation = head_mediation(model, pairs, progress=False)
    tables = {
        "evaluate_figure": evaluate(model, data, "localization", progress=False),
        "token_ablation_figure": token_ablation(model, data, strategies=("object", "random"), paddings=(0,), fractions=(0.1,), seeds=(0,), fill="zero", progress=False),
        "token_shuffle_figure": token_shuffle(model, data, seeds=(0,), progress=False),
        "object_extension_figure": object_extension(model, data, paddings=(1,), gt_scales=(0, 1), seeds=(0,), progress=False),
        "attention_knockout_figure": attention_knockout(model, data, group_size=(2, "all"), paddings=(0,), seeds=(0,), progress=False),
        "head_mediation_figure": mediation,
        "cumulative_head_ablation_figure": cumulative_head_ablation(model, data, {"mf": mediation_map(mediation)}, fractions=(0, 0.25), progress=False),
        "position_probe_figure": position_probe(model, data, toy_dataset(family, 2, split="probe"), epochs=2, progress=False),
    }
    for name, table in tables.items():
        figure = getattr(plotting, name)(table)
        assert isinstance(figure, Figure) and figure.axes and figure.axes[0].has_data(), name
