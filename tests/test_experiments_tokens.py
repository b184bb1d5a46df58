"""Token experiments (ablation, shuffle, object extension, attention knockout) on tiny LLaVA and
InternVL models: documented columns, one row per query and condition, conditions that change the
model where they must and not where they must not, seeded determinism, IG completeness, and
loud errors for bad arguments."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pandas as pd
import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm import interventions as iv
from hooked_vlm.data.synthetic import SyntheticLocalization
from hooked_vlm.experiments import (
    attention_knockout, extension_matrix, object_extension, token_ablation, token_shuffle,
)  # fmt: skip
from hooked_vlm.experiments._conditions import random_set
from hooked_vlm.experiments.attention_knockout import layer_windows
from hooked_vlm.experiments.attribution import integrated_gradients, teacher_forced_inputs
from hooked_vlm.experiments.data import as_samples
from hooked_vlm.experiments.evaluate import task_prompt
from hooked_vlm.experiments.object_extension import enlarged_box, score_against_enlarged, token_size
from hooked_vlm.experiments.token_ablation import register_tokens

LOCALIZATION = ["sample_id", "class_name", "task", "prompt", "response", "image_width", "image_height", "gt_box",
                "pred_box", "n_boxes", "iou", "hit@0.5", "hit@0.7", "hit@0.9", "loc_score", "condition"]  # fmt: skip
LIST = ["sample_id", "class_name", "task", "prompt", "response", "correct", "condition"]
ANSWERED = ["finished", "area", "size_class", "excluded"]  # every evaluate row (PROTOCOL-AUDIT A4, A7, A12)
LOCALIZATION, LIST = (columns[:-1] + ANSWERED + ["condition"] for columns in (LOCALIZATION, LIST))
N = 4  # samples


def localization_columns(model) -> list[str]:
    """InternVL rows also say whether the box was written as [0, 1] floats (PROTOCOL-AUDIT B2)."""
    if model.cfg.family != "internvl":
        return LOCALIZATION
    at = LOCALIZATION.index("loc_score") + 1
    return LOCALIZATION[:at] + ["float_box"] + LOCALIZATION[at:]


@pytest.fixture(scope="module", params=["llava_multilayer", "internvl_6b"])
def model(request, tiny_checkpoint):
    model = HookedVLM.from_pretrained(tiny_checkpoint(request.param))
    if model.cfg.family == "llava":  # the paper pads LLaVA's images to a square (§1.1); this checkpoint crops
        model.preprocessing = replace(model.preprocessing, image_mode="pad")
    return model


@pytest.fixture(scope="module")
def dataset():
    return SyntheticLocalization(N, seed=0, image_sizes=((112, 56),))  # InternVL: two 56-px tiles + a thumbnail


@pytest.fixture(scope="module")
def samples(dataset):
    return list(as_samples(dataset))


@pytest.fixture(scope="module")
def mean(model, samples):
    return iv.compute_mean_embedding(model, [s.image for s in samples], progress=False)


def one_by_one(model, samples, make_set):
    """`make_set(inputs, sample)` evaluated on each sample alone: token counts per sample."""
    return [int(make_set(model.prepare([s.image], ["Hi"]), s).count()[0]) for s in samples]


# ------------------------------------------------------------------------------ token ablation
ABLATION = dict(
    strategies=("object", "random", "register", "ig"), paddings=(0, 1), fractions=(0.25,), seeds=(0, 1), ig_steps=4
)
ABLATION_LABELS = ["strategy", "padding", "fraction", "seed", "views", "fill"]


@pytest.fixture(scope="module")
def ablation(model, dataset, mean):
    return token_ablation(model, dataset, mean=mean, batch_size=3, progress=False, **ABLATION)


def ablation_counts(model) -> list[str]:
    counts = ["n_ablated", "n_image_tokens", "pct_ablated"]
    if model.cfg.family == "internvl":
        counts += ["n_ablated_global", "n_ablated_local", "pct_ablated_global", "pct_ablated_local"]
    return counts


def test_token_ablation_returns_the_documented_columns_once_per_query_and_condition(model, ablation):
    assert list(ablation.columns) == localization_columns(model) + ABLATION_LABELS + ablation_counts(model)
    assert len(ablation) == N * (1 + 2 + 2 + 1 + 1)  # baseline, object x2, random x2, register, ig
    assert ablation.groupby("condition").size().eq(N).all()


def test_object_ablation_changes_some_answers(ablation):
    baseline = ablation[ablation.strategy == "baseline"].set_index("sample_id")["response"]
    ablated = ablation[ablation.condition == "object+1"].set_index("sample_id")["response"]
    assert (ablated != baseline.loc[ablated.index]).any()


def test_n_ablated_counts_the_tokens_of_each_set(model, samples, ablation):
    def rows(condition):
        return ablation[ablation.condition == condition].set_index("sample_id").loc[[s.id for s in samples]]

    for padding in (0, 1):
        expected = one_by_one(
            model, samples, lambda inputs, s: iv.object_tokens(inputs, s.mask, dilation=padding, allow_empty=True)
        )
        assert rows(f"object{padding:+d}")["n_ablated"].tolist() == expected
    views = [model.prepare([s.image], ["Hi"]).layout.views[0] for s in samples]
    assert rows("random 25% s0")["n_ablated"].tolist() == [sum(round(0.25 * v.n_tokens) for v in vs) for vs in views]
    assert rows("ig 25%")["n_ablated"].eq((0.25 * rows("ig 25%")["n_image_tokens"]).round().astype(int)).all()
    assert rows("baseline")["n_ablated"].eq(0).all()
    assert (ablation["pct_ablated"] == 100 * ablation["n_ablated"] / ablation["n_image_tokens"]).all()


def test_token_ablation_is_deterministic_given_the_seed(model, dataset, mean, ablation):
    again = token_ablation(model, dataset, mean=mean, batch_size=3, progress=False, **ABLATION)
    pd.testing.assert_frame_equal(again, ablation)


def test_random_sets_depend_on_the_seed_and_not_on_the_batch(model, samples):
    inputs = model.prepare([s.image for s in samples], ["Hi"] * N)
    first, second = random_set(inputs, samples, 0.5, seed=0), random_set(inputs, samples, 0.5, seed=1)
    assert not torch.equal(first.mask, second.mask)
    alone = model.prepare([samples[2].image], ["Hi"])
    cells = lambda inputs, tokens, row: {  # noqa: E731  (view, row, col) of the chosen tokens
        tuple(v) for v in torch.stack([inputs.layout.view, inputs.layout.row, inputs.layout.col], 1)[
            tokens.mask[inputs.layout.batch, inputs.layout.position] & (inputs.layout.batch == row)].tolist()
    }  # fmt: skip
    assert cells(inputs, first, 2) == cells(alone, random_set(alone, samples[2:3], 0.5, seed=0), 0)


def test_noise_ablation_of_a_sample_does_not_depend_on_its_batch(model, samples):
    """A sample alone, and in row 2 of a batch of 3 where its shorter prompt is left-padded."""
    ordered = sorted(samples, key=lambda s: len(model.prepare(s.image, task_prompt("localization", s)).input_ids[0]))
    batch_samples, target = [ordered[-1], ordered[-2], ordered[0]], ordered[0]
    padded = model.prepare([s.image for s in batch_samples], [task_prompt("localization", s) for s in batch_samples])
    assert (padded.attention_mask[2] == 0).any()
    kwargs = dict(strategies=["random"], fractions=[0.5], seeds=[0], fill="noise", progress=False)
    alone = token_ablation(model, [target], batch_size=1, **kwargs).set_index("condition")
    batch = token_ablation(model, batch_samples, batch_size=3, **kwargs).set_index("condition")
    pd.testing.assert_frame_equal(batch[batch.sample_id == target.id][alone.columns], alone)


@pytest.mark.parametrize("experiment", [token_ablation, token_shuffle, object_extension, attention_knockout])
def test_token_experiments_refuse_an_empty_dataset(model, experiment):
    with pytest.raises(ValueError, match="the dataset holds no sample"):
        experiment(model, [], progress=False)  # token_ablation: before computing a mean over no image


def test_token_ablation_takes_the_mean_as_a_plain_tensor(model, samples, mean):
    kwargs = dict(strategies=["object", "ig"], paddings=[0], fractions=[0.25], ig_steps=2, progress=False)
    as_tensor = token_ablation(model, samples[:2], mean=mean.vector, **kwargs)
    pd.testing.assert_frame_equal(as_tensor, token_ablation(model, samples[:2], mean=mean, **kwargs))
    with pytest.raises(ValueError, match=r"mean has shape \(3,\)"):
        token_ablation(model, samples[:2], mean=torch.zeros(3), **kwargs)
    with pytest.raises(TypeError, match="mean must be a MeanEmbedding, a \\[d_model\\] tensor"):
        token_ablation(model, samples[:2], mean=[0.0] * model.cfg.d_model, **kwargs)


def test_internvl_views_restrict_ablation_to_the_thumbnail_or_the_tiles(model, dataset, mean):
    if model.cfg.family != "internvl":
        with pytest.raises(ValueError, match="needs InternVL"):
            token_ablation(model, dataset, mean=mean, views="global", progress=False)
        return
    for views, other in (("global", "local"), ("local", "global")):
        results = token_ablation(
            model, dataset, strategies=("object",), paddings=(1,), mean=mean, views=views, progress=False
        )
        ablated = results[results.strategy == "object"]
        assert ablated[f"n_ablated_{other}"].eq(0).all() and ablated[f"n_ablated_{views}"].gt(0).all()
        assert set(results["views"]) == {views}


def test_list_classification_ablation_with_zero_fill_needs_no_mean(model, dataset):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        results = token_ablation(
            model, dataset, task="list", strategies=("object", "ig"), paddings=(0,), fractions=(0.5,), fill="zero",
            ig_baseline="zero", ig_steps=2, progress=False,
        )  # fmt: skip
    assert list(results.columns) == LIST + ABLATION_LABELS + ablation_counts(model)
    assert len(results) == N * 3 and set(results["fill"]) == {"zero"}


def test_computing_the_mean_on_the_dataset_warns_that_the_paper_uses_imagenet(model, dataset):
    with pytest.warns(UserWarning, match="ImageNet"):
        results = token_ablation(model, dataset, strategies=("object",), paddings=(0,), progress=False)
    assert set(results["fill"]) == {"mean"}


@pytest.mark.parametrize("task", ["localization", "list"])
def test_integrated_gradients_sum_to_the_metric_difference(model, samples, mean, task):
    inputs, token_filter = teacher_forced_inputs(model, samples, task)
    result = integrated_gradients(model, inputs, mean.vector, steps=32, token_filter=token_filter, reduce="sum")
    totals = torch.stack([result.of_image(i).sum() for i in range(N)])
    torch.testing.assert_close(totals, result.f_input - result.f_baseline, atol=0.02, rtol=0.02)
    assert len(result.scores) == len(inputs.layout)


def test_register_tokens_are_the_norm_outliers_of_their_image(model, samples):
    inputs = model.prepare([s.image for s in samples], ["Hi"] * N)
    assert register_tokens(model, inputs, n_sd=0.0).count().gt(0).all()  # above the mean: some always are
    assert register_tokens(model, inputs, n_sd=100.0).count().eq(0).all()
    assert not (register_tokens(model, inputs).mask & ~iv.image_tokens(inputs).mask).any()  # image tokens only


# ------------------------------------------------------------------------------ token shuffle
SHUFFLE = dict(task="list", modes=("full", "object"), seeds=(0, 1), batch_size=3)


@pytest.fixture(scope="module")
def shuffled(model, dataset):
    return token_shuffle(model, dataset, progress=False, **SHUFFLE)


def test_token_shuffle_returns_the_documented_columns_once_per_query_and_condition(model, samples, shuffled):
    assert list(shuffled.columns) == LIST + ["mode", "seed", "scope", "n_shuffled"]
    assert len(shuffled) == N * (1 + 2 * 2)
    full = shuffled[shuffled.condition == "full s0"].set_index("sample_id").loc[[s.id for s in samples]]
    obj = shuffled[shuffled.condition == "object s1"].set_index("sample_id").loc[[s.id for s in samples]]
    assert full["n_shuffled"].tolist() == one_by_one(model, samples, lambda inputs, s: iv.image_tokens(inputs))
    assert obj["n_shuffled"].tolist() == one_by_one(model, samples, lambda inputs, s: iv.object_tokens(inputs, s.mask))


def test_full_shuffle_changes_some_answers_and_is_deterministic(model, dataset, shuffled):
    baseline = shuffled[shuffled["mode"] == "baseline"]["response"].to_numpy()
    assert (shuffled[shuffled.condition == "full s0"]["response"].to_numpy() != baseline).any()
    again = token_shuffle(model, dataset, progress=False, **SHUFFLE)
    pd.testing.assert_frame_equal(again, shuffled)


# ------------------------------------------------------------------------------ object extension
def test_object_extension_scores_every_padding_seed_and_gt_scale(model, dataset, samples):
    results = object_extension(
        model, dataset, paddings=(0, 1), gt_scales=(0, 1, 2), seeds=(0, 1), batch_size=3, progress=False
    )
    labels = ["padding", "seed", "gt_scale", "views", "n_extended", "token_width", "token_height"]
    assert list(results.columns) == localization_columns(model) + labels
    assert len(results) == N * (1 + 2) * 3  # padding 0 runs once, padding 1 per seed; each scored at 3 scales

    def ring(inputs, sample):
        return iv.object_tokens(inputs, sample.mask, dilation=1) - iv.object_tokens(inputs, sample.mask)

    rings = one_by_one(model, samples, ring)
    extended = results[(results.padding == 1) & (results.gt_scale == 0) & (results.seed == 0)].set_index("sample_id")
    assert extended.loc[[s.id for s in samples], "n_extended"].tolist() == rings
    matrix = extension_matrix(results)
    assert list(matrix.index) == [0, 1]
    assert list(matrix.columns) == [(stat, s) for stat in ("mean", "sd") for s in (0, 1, 2)]


def test_the_token_width_is_the_thumbnail_token_in_original_pixels(model, samples):
    inputs = model.prepare([samples[0].image], ["Hi"])
    # 112 x 56: LLaVA pads to a 112-px square of 4 x 4 tokens; InternVL's thumbnail is 2 x 2 tokens over the image
    expected = (28.0, 28.0) if model.cfg.family == "llava" else (56.0, 28.0)
    assert token_size(inputs.layout.views[0], "global") == expected
    if model.cfg.family == "internvl":
        assert token_size(inputs.layout.views[0], "local") == (28.0, 28.0)  # a 56-px tile of 2 x 2 tokens


def test_enlarged_gt_boxes_grow_by_token_sizes_and_stay_in_the_image():
    assert enlarged_box((10, 10, 20, 20), (100, 50), (8, 4), 2) == (0.0, 2.0, 36.0, 28.0)
    assert enlarged_box((10, 10, 20, 20), (100, 50), (8, 4), 0) == (10.0, 10.0, 20.0, 20.0)


def test_predictions_are_rescored_against_the_enlarged_box():
    row = dict(pred_box=(0.0, 0.0, 40.0, 40.0), gt_box=(10.0, 10.0, 30.0, 30.0), image_width=100, image_height=100,
               token_width=10.0, token_height=10.0, iou=0.25, loc_score=0.0)  # fmt: skip
    table = pd.DataFrame([row, {**row, "pred_box": None}])
    scored = score_against_enlarged(table, 1)
    assert scored["gt_box"].tolist() == [(0.0, 0.0, 40.0, 40.0)] * 2
    assert scored["iou"].iloc[0] == 1.0 and scored["loc_score"].tolist() == [1.0, 0.0]
    assert scored["gt_scale"].eq(1).all()


# ------------------------------------------------------------------------------ attention knockout
KNOCKOUT = dict(group_size=(1, "all"), paddings=(0,), seeds=(0,), batch_size=3)


@pytest.fixture(scope="module")
def knocked_out(model, dataset):
    return attention_knockout(model, dataset, progress=False, **KNOCKOUT)


def test_attention_knockout_returns_the_documented_columns_once_per_query_and_condition(model, knocked_out):
    columns = ["group_size", "layer_start", "layer_end", "layers", "target", "padding", "seed", "n_blocked"]
    assert list(knocked_out.columns) == localization_columns(model) + columns
    assert len(knocked_out) == N * (1 + 4 * 2)  # baseline; layers 0, 1, 2, all x (object, random)
    assert set(knocked_out["layers"].dropna()) == {"0", "1", "2", "all"}


def test_the_random_control_blocks_as_many_tokens_as_the_object(model, samples, knocked_out):
    knocked = knocked_out.set_index(["layers", "sample_id"])
    obj, rnd = knocked[knocked.target == "object"]["n_blocked"], knocked[knocked.target == "random"]["n_blocked"]
    assert obj.sort_index().tolist() == rnd.sort_index().tolist()
    expected = one_by_one(model, samples, lambda inputs, s: iv.object_tokens(inputs, s.mask))
    assert obj.loc["all"].loc[[s.id for s in samples]].tolist() == expected


def test_knockout_of_nothing_equals_the_baseline_and_of_everything_does_not(model, dataset):
    results = attention_knockout(model, dataset, group_size="all", paddings=(-10, 10), controls=(), progress=False)
    baseline = results[results.target == "baseline"].reset_index(drop=True)
    nothing = results[results.padding == -10]  # eroded away: an empty target set, hooks still attached
    assert nothing["n_blocked"].eq(0).all()
    for column in ("response", "iou", "loc_score"):
        pd.testing.assert_series_equal(nothing[column].reset_index(drop=True), baseline[column])
    everything = results[results.padding == 10]["response"].reset_index(drop=True)
    assert (everything != baseline["response"]).any()


def test_knockout_is_deterministic_and_its_random_sets_depend_on_the_seed(model, dataset, samples, knocked_out):
    again = attention_knockout(model, dataset, progress=False, **KNOCKOUT)
    pd.testing.assert_frame_equal(again, knocked_out)
    inputs = model.prepare([s.image for s in samples], ["Hi"] * N)
    target = iv.object_tokens(inputs, [s.mask for s in samples])
    assert not torch.equal(random_set(inputs, samples, target, 0).mask, random_set(inputs, samples, target, 1).mask)


def test_layer_windows_are_contiguous_groups_from_layer_zero_plus_all():
    assert layer_windows(10, 4) == [(4, 0, 3), (4, 4, 7), (4, 8, 9)]
    assert layer_windows(10, [4, "all", 10]) == [(4, 0, 3), (4, 4, 7), (4, 8, 9), (10, 0, 9)]
    assert layer_windows(3, 1) == [(1, 0, 0), (1, 1, 1), (1, 2, 2)]
    assert layer_windows(3, (4, "all")) == [(4, 0, 2)]  # one group of 4 covers a 3-layer model: it is "all"


# ------------------------------------------------------------------------------ bad arguments
BAD = [
    (token_ablation, dict(strategies=("object", "saliency")), "unknown strategies"),
    (token_ablation, dict(strategies=()), "strategies is empty"),
    (token_ablation, dict(paddings=()), "paddings is empty"),
    (token_ablation, dict(fractions=(0.0,)), "share of image tokens"),
    (token_ablation, dict(fractions=(8,)), "share of image tokens"),
    (token_ablation, dict(fill="blur"), "unknown fill"),
    (token_ablation, dict(views="side"), "unknown view set"),
    (token_ablation, dict(task="binary"), "unknown task"),
    (token_ablation, dict(ig_steps=0), "ig_steps"),
    (token_ablation, dict(ig_baseline="blur"), "unknown IG baseline"),
    (token_shuffle, dict(modes=("rows",)), "unknown shuffle modes"),
    (token_shuffle, dict(seeds=()), "seeds is empty"),
    (object_extension, dict(paddings=(-1,)), "must be >= 0"),
    (object_extension, dict(gt_scales=()), "gt_scales is empty"),
    (attention_knockout, dict(group_size=0), "must be >= 1"),
    (attention_knockout, dict(group_size=[]), "group_size is empty"),
    (attention_knockout, dict(group_size=4.5), 'an int or "all"'),
    (attention_knockout, dict(paddings=()), "paddings is empty"),
    (attention_knockout, dict(controls=("shuffled",)), "unknown controls"),
]


@pytest.mark.parametrize("experiment, kwargs, message", BAD, ids=[f"{e.__name__}-{m}" for e, _, m in BAD])
def test_bad_arguments_raise_before_any_work(model, dataset, experiment, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        experiment(model, dataset, progress=False, **kwargs)


def test_views_and_scale_views_that_need_internvl_are_refused_on_llava(tiny_checkpoint, dataset):
    model = HookedVLM.from_pretrained(tiny_checkpoint("llava_multilayer"))
    with pytest.raises(ValueError, match="needs InternVL"):
        object_extension(model, dataset, scale_view="local", progress=False)
    with pytest.raises(ValueError, match="needs InternVL"):
        object_extension(model, dataset, views="local", progress=False)
