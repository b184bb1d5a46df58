"""The attention viewer: what it stores equals what the model computes (LM attention of prompt and
answer tokens, vision attention pooled to image cells, the logit lens), the page is one
self-contained file, and a real headless Chromium draws the stored values, cell by cell, at the
boxes the image tokens cover in the original image (InternVL tiles + thumbnail, LLaVA padding).

The browser tests need Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); they
fail, never skip, without them."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from hooked_vlm import HookedVLM
from hooked_vlm.cli import main
from hooked_vlm.viewer import attention_view
from hooked_vlm.viewer.browser import headless_chromium, open_page
from hooked_vlm.viewer.page import colormap_lut, geometry, page_data, quantise_rows

PROMPT = "Describe the picture."
N_NEW = 4


@pytest.fixture(scope="module")
def internvl(tiny_checkpoint):
    return HookedVLM.from_pretrained(tiny_checkpoint("internvl_6b"))


@pytest.fixture(scope="module")
def llava(tiny_checkpoint):
    return HookedVLM.from_pretrained(tiny_checkpoint("llava_base"))


@pytest.fixture(scope="module")
def internvl_view(internvl, photos):
    """4 tiles (2x2 tokens each) + thumbnail; 3 LM layers x 4 heads; a generated answer; every vision head."""
    return attention_view(internvl, photos["astronaut"], PROMPT, max_new_tokens=N_NEW, vision_heads="all")


@pytest.fixture(scope="module")
def llava_view(llava, photos):
    """A wide photo in LLaVA's pad mode: the 3x3 grid's top and bottom rows lie partly on padding."""
    return attention_view(llava, llava.prepare(photos["coffee_wide"], PROMPT, image_mode="pad"))


@pytest.fixture(scope="module")
def browser():
    with headless_chromium(width=1300, height=2400) as driver:
        yield driver


@pytest.fixture(scope="module")
def internvl_page(internvl_view, tmp_path_factory):
    return internvl_view.save(tmp_path_factory.mktemp("viewer") / "internvl.html")


# ----------------------------------------------------------------------------- what is stored
def test_prompt_tokens_attention_is_the_patterns_image_columns(internvl, photos):
    inputs = internvl.prepare(photos["astronaut"], PROMPT)
    view = attention_view(internvl, inputs)
    _, cache = internvl.run_with_cache(inputs, names_filter=lambda n: n.startswith("blocks.") and n.endswith("hook_pattern"))
    image = inputs.layout.position
    assert view.queries.min() > image.max()  # the text after the image
    for i, layer in enumerate(view.layers):
        expected = cache[f"blocks.{layer}.attn.hook_pattern"][0][:, view.queries][:, :, image]
        # fp32 to rounding: the view's forward also materialises vision patterns (eager, not SDPA)
        torch.testing.assert_close(torch.from_numpy(view.lm_attention[i]), expected, rtol=1e-5, atol=1e-6)


def test_answer_tokens_are_the_greedy_answer_and_their_attention_is_read_while_generating(internvl, photos, internvl_view):
    inputs = internvl.prepare(photos["astronaut"], PROMPT)
    steps: dict[int, list[torch.Tensor]] = {layer: [] for layer in internvl_view.layers}
    hooks = [(f"blocks.{l}.attn.hook_pattern", lambda p, hook, l=l: steps[l].append(p[0, :, -1].clone())) for l in steps]
    tokens = internvl.generate(inputs, N_NEW, fwd_hooks=hooks, return_tokens=True)[0]
    start = internvl_view.answer_start
    assert start == inputs.input_ids.shape[1]
    assert internvl_view.labels[start:] == internvl.tokenizer.batch_decode(tokens[:, None], clean_up_tokenization_spaces=False)
    image = inputs.layout.position
    for step in range(1, len(tokens)):  # decoding step k reads answer token k-1 (the last is never fed)
        q = int(np.flatnonzero(internvl_view.queries == start + step - 1)[0])
        for i, layer in enumerate(internvl_view.layers):
            during = steps[layer][step][:, image]
            torch.testing.assert_close(torch.from_numpy(internvl_view.lm_attention[i, :, q]), during, rtol=1e-4, atol=1e-6)


def test_an_answer_that_ends_early_offers_only_its_own_tokens(internvl, photos, monkeypatch):
    generate = internvl.generate
    monkeypatch.setattr(internvl, "generate", lambda inputs, n, **kwargs: generate(inputs, 2, **kwargs))  # as if EOS came second
    view = attention_view(internvl, photos["astronaut"], PROMPT, max_new_tokens=10)
    assert len(view.labels) == view.answer_start + 2
    assert view.queries.max() == view.answer_start + 1 and view.lm_attention.shape[2] == len(view.queries)
    with pytest.raises(IndexError, match="ended early"):
        attention_view(internvl, photos["astronaut"], PROMPT, max_new_tokens=10, queries=[view.answer_start + 5])


def test_vision_attention_pools_each_cells_2x2_patches(internvl, photos):
    inputs = internvl.prepare(photos["astronaut"], PROMPT)
    view = attention_view(internvl, inputs, vision_heads="all")
    _, cache = internvl.run_with_cache(inputs, names_filter=lambda n: n.startswith("vision.") and n.endswith("hook_pattern"))
    grid = internvl.cfg.vision.n_grid // 2  # tokens per side of a view after the 2x2 pixel shuffle
    for i, layer in enumerate(view.vision_layers):
        patches = cache[f"vision.blocks.{layer}.attn.hook_pattern"][:, :, 1:, 1:]  # CLS dropped
        blocks = rearrange(
            patches, "view head (r i c j) (R I C J) -> head (view r c) (i j) (R C) (I J)", i=2, j=2, I=2, J=2, r=grid, R=grid
        )
        expected = blocks.mean(2).sum(-1)  # a cell attends as its patches' mean row, is attended as their sum
        torch.testing.assert_close(torch.from_numpy(view.vision_attention[i]), expected, rtol=1e-5, atol=1e-7)


def test_logit_lens_after_the_last_layer_is_the_models_own_prediction(internvl, photos):
    inputs = internvl.prepare(photos["astronaut"], PROMPT)
    view = attention_view(internvl, inputs, lens_top_k=3)
    probs = internvl(inputs)[0, inputs.layout.position].float().softmax(-1)
    top = probs.topk(3, dim=-1)
    assert view.lens_layers[-1] == internvl.cfg.text.n_layers - 1
    np.testing.assert_array_equal(view.lens_ids[-1], top.indices.numpy())
    np.testing.assert_allclose(view.lens_probs[-1], top.values.numpy(), rtol=1e-5)
    assert all(view.lens_vocab[int(i)] == internvl.tokenizer.decode([int(i)]) for i in view.lens_ids[-1, :, 0])


def test_labels_name_each_image_token_by_its_place_in_the_image_map(internvl_view):
    layout = internvl_view.layout
    for p, v, r, c in zip(*(t.tolist() for t in (layout.position, layout.view, layout.row, layout.col))):
        assert internvl_view.labels[p] == f"<img v{v} r{r} c{c}>"
    assert len(internvl_view.labels) == internvl_view.answer_start + N_NEW


def test_bf16_model_gives_the_float32_view_within_bf16_precision(tiny_checkpoint, photos, internvl_view):
    model = HookedVLM.from_pretrained(tiny_checkpoint("internvl_6b"), dtype=torch.bfloat16)
    inputs = model.prepare(photos["astronaut"], PROMPT)
    view = attention_view(model, inputs, queries=internvl_view.queries[internvl_view.queries < internvl_view.answer_start])
    n = len(view.queries)
    assert view.lm_attention.dtype == np.float32
    np.testing.assert_allclose(view.lm_attention, internvl_view.lm_attention[:, :, :n], atol=2e-2)
    np.testing.assert_allclose(view.vision_attention, internvl_view.vision_attention.mean(1, keepdims=True), atol=2e-2)


def test_a_teacher_forced_answer_is_marked_and_selectable(internvl, photos):
    inputs = internvl.prepare(photos["astronaut"], PROMPT, answers="a red square")
    view = attention_view(internvl, inputs)
    answer = inputs.answer_mask[0].nonzero().flatten().tolist()
    assert view.answer_start == answer[0]
    assert set(answer) <= set(view.queries.tolist())
    with pytest.raises(ValueError, match="already end in a teacher-forced answer"):  # generating after its end of turn
        attention_view(internvl, inputs, max_new_tokens=3)


def test_a_cls_image_token_is_labelled_but_is_no_cell_of_the_vision_map(tiny_checkpoint, photos):
    model = HookedVLM.from_pretrained(tiny_checkpoint("llava_full"))  # "full": CLS + 2x2 patches per image
    view = attention_view(model, photos["astronaut"], PROMPT)
    cls = int(view.layout.position[view.layout.row < 0][0])
    assert view.labels[cls] == "<img v0 cls>"
    assert view.vision_attention.shape[-2:] == (4, 4)
    assert page_data(view)["vision"]["cells"] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- size and storage
def test_quantised_rows_keep_large_weights_to_a_level_and_small_ones_visible():
    values = np.random.default_rng(0).dirichlet(np.ones(50), size=(3, 7)).astype(np.float32)
    values[0, 0] = 0.0
    values[1, 1, :2] = values[1, 1].max() * np.array([1e-3, 1e-2])  # beside a sink, far below the maximum
    q, scale = quantise_rows(values)
    assert q.dtype == np.uint8 and scale.dtype == np.float32
    assert (q.max(-1)[scale > 0] == 255).all() and (q[0, 0] == 0).all()
    decoded = (q / 255) ** 2 * scale[..., None]
    assert np.abs(decoded - values).max() <= scale.max() / 255
    small = decoded[1, 1, :2] / values[1, 1, :2]
    assert np.all(np.abs(small - 1) < 0.15)  # a linear byte would make both 0


def test_page_stores_one_byte_per_attention_weight_for_image_columns_only(internvl_view):
    data = page_data(internvl_view)
    n_layers, n_heads, n_queries, n_image = internvl_view.lm_attention.shape
    assert n_image == len(internvl_view.layout)
    assert (data["lm"]["att"]["dtype"], data["lm"]["att"]["shape"]) == ("uint8", [n_layers, n_heads, n_queries, n_image])
    n_vision_layers, n_vision_heads = len(internvl_view.vision_layers), internvl_view.vision_attention.shape[1]
    assert (data["vision"]["att"]["dtype"], data["vision"]["att"]["shape"]) == ("uint8", [n_vision_layers, n_vision_heads, n_image, 4])


def test_default_layers_are_thinned_to_the_size_limit_keeping_the_last(internvl, photos):
    inputs = internvl.prepare(photos["astronaut"], PROMPT)
    full = attention_view(internvl, inputs)
    per_layer, others = full.lm_attention[0].size, full.vision_attention.size + full.lens_ids.size * 5
    with pytest.warns(UserWarning, match=r"kept 2 of 3 language-model layers \(\[0, 2\]\)"):
        thinned = attention_view(internvl, inputs, max_megabytes=(others + 2 * per_layer + 1) / 2**20)
    assert thinned.layers == [0, 2]
    np.testing.assert_allclose(thinned.lm_attention, full.lm_attention[[0, 2]], atol=1e-6)  # layer 1 now runs SDPA


def test_explicit_layers_over_the_size_limit_are_refused_before_running(internvl, photos):
    with pytest.raises(ValueError, match=r"max_megabytes.*layers=.*queries=.*vision_heads='mean'"):
        attention_view(internvl, photos["astronaut"], PROMPT, layers=[0, 1, 2], max_megabytes=1e-4)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(layers=[7]), IndexError, "layer 7 out of range"),
        (dict(vision_layers=[5]), IndexError, "vision tower"),
        (dict(queries=[10_000]), IndexError, "query positions"),
        (dict(vision_heads="some"), ValueError, "vision_heads"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    ],
)
def test_bad_choices_are_errors_that_name_them(internvl, photos, kwargs, error, message):
    with pytest.raises(error, match=message):
        attention_view(internvl, photos["astronaut"], PROMPT, **kwargs)


def test_a_batch_of_two_pairs_is_refused(internvl, photos):
    inputs = internvl.prepare([photos["astronaut"], photos["rocket"]], [PROMPT, PROMPT])
    with pytest.raises(ValueError, match="batch of 2"):
        attention_view(internvl, inputs)


def test_page_is_one_file_that_references_nothing_outside_it(internvl_view):
    page = internvl_view.html()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    data = page[page.index('id="hvlm-data">') :]
    assert "</img>" not in data[: data.index("</script>")]  # the token is escaped inside the JSON


def test_panels_put_tiles_in_one_mosaic_beside_the_thumbnail(internvl_view):
    panels = geometry(internvl_view)["panels"]
    assert [p["name"] for p in panels] == ["tiles (4)", "thumbnail"]
    assert panels[0]["views"] == [0, 1, 2, 3] and panels[1]["views"] == [4]
    width, height = internvl_view.image.size
    assert all(np.allclose(p["extent"], [0, 0, width, height]) for p in panels)


def test_padding_cells_of_llava_pad_mode_widen_the_panel_beyond_the_image(llava_view):
    (panel,) = geometry(llava_view)["panels"]
    width, height = llava_view.image.size
    assert width > height
    x1, y1, x2, y2 = panel["extent"]
    assert (x1, x2) == (0, width) and y1 < 0 and y2 > height
    assert y2 - y1 == pytest.approx(width)  # the padded square


# ----------------------------------------------------------------------------- in the browser
def expected_colour_range(fraction: float, scale: str) -> range:
    """Colour-map entries a cell may show given its value's fraction of the map's maximum: the
    page's entry is off by at most 1.5 (linear) or 0.5 (square root) from the exact value's for
    bytes that code the square root of each weight's share of its row's maximum."""
    index = 255 * (math.sqrt(fraction) if scale == "sqrt" else fraction)
    return range(max(0, round(index) - 2), min(255, round(index) + 2) + 1)


def assert_cells_show(
    png: bytes, panel: dict, tokens: dict, values: dict[int, float], scale: str = "linear"
) -> None:
    """At the centre of each of the panel's cells the screenshot shows the colour map's entry for
    the cell's value relative to the map's maximum over every panel (opacity 1), within the byte
    quantisation of the stored rows."""
    boxes = np.array(tokens["box"])
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    lut = colormap_lut().reshape(256, 3).astype(int)
    x1, y1, x2, y2 = panel["extent"]
    k = pixels.shape[1] / (x2 - x1)
    assert abs(pixels.shape[0] - (y2 - y1) * k) <= 1
    vmax = max(values.values())
    shown = {t: v for t, v in values.items() if tokens["view"][t] in panel["views"]}
    assert shown
    for t, value in shown.items():
        cx, cy = int(((boxes[t, 0] + boxes[t, 2]) / 2 - x1) * k), int(((boxes[t, 1] + boxes[t, 3]) / 2 - y1) * k)
        allowed = expected_colour_range(value / vmax, scale)
        seen = pixels[cy, cx]
        assert any(np.abs(lut[i] - seen).max() <= 1 for i in allowed), f"cell {t}: {seen} not among entries {list(allowed)}"


def panel_shots(driver, section: str) -> list[bytes]:
    return [c.screenshot_as_png for c in driver.find_elements(By.CSS_SELECTOR, f"#{section}-panels canvas.panel")]


def test_selecting_two_tokens_draws_each_ones_attention_over_tiles_and_thumbnail(browser, internvl_page, internvl_view):
    open_page(browser, internvl_page)
    browser.find_element(By.ID, "opacity").send_keys(Keys.END)  # heat-map only: its colours are exact
    Select(browser.find_element(By.ID, "lm-layer")).select_by_visible_text("1")
    Select(browser.find_element(By.ID, "lm-head")).select_by_visible_text("2")
    data = geometry(internvl_view)
    prompt_token, answer_token = internvl_view.answer_start - 1, internvl_view.answer_start + 1
    shots = {}
    for position in (prompt_token, answer_token):
        browser.find_element(By.CSS_SELECTOR, f'#tokens span[data-position="{position}"]').click()
        assert "sel" in browser.find_element(By.CSS_SELECTOR, f'#tokens span[data-position="{position}"]').get_attribute("class")
        q = int(np.flatnonzero(internvl_view.queries == position)[0])
        stored = internvl_view.lm_attention[internvl_view.layers.index(1), 2, q]
        shots[position] = panel_shots(browser, "lm")
        share = re.search(r"([\d.]+)% of its attention", browser.find_element(By.ID, "lm-info").text).group(1)
        assert float(share) == pytest.approx(100 * stored.sum(), abs=0.051)  # exact, not from the bytes
        for panel, png in zip(data["panels"], shots[position]):
            assert_cells_show(png, panel, data["tokens"], dict(enumerate(stored.tolist())))
    before, after = (np.asarray(Image.open(io.BytesIO(s[0]))).astype(int) for s in shots.values())
    assert np.abs(before - after).max() > 20  # the two tokens look at the image differently


def test_square_root_scale_recolours_the_cells(browser, tmp_path, llava_view):
    page = llava_view.save(tmp_path / "llava.html")
    open_page(browser, page)
    browser.find_element(By.ID, "opacity").send_keys(Keys.END)
    Select(browser.find_element(By.ID, "colour-scale")).select_by_value("sqrt")
    Select(browser.find_element(By.ID, "lm-head")).select_by_visible_text("0")
    (panel,) = geometry(llava_view)["panels"]
    q = len(llava_view.queries) - 1  # the page opens on the last prompt token
    stored = llava_view.lm_attention[len(llava_view.layers) // 2, 0, q]
    (png,) = panel_shots(browser, "lm")
    assert_cells_show(png, panel, geometry(llava_view)["tokens"], dict(enumerate(stored.tolist())), "sqrt")


def cell_offset(canvas, panel: dict, box: np.ndarray) -> tuple[int, int]:
    """Offset of a cell's centre from the canvas element's centre (what ActionChains moves by)."""
    x1, y1, x2, y2 = panel["extent"]
    k = canvas.size["width"] / (x2 - x1)
    cx, cy = ((box[0] + box[2]) / 2 - x1) * k, ((box[1] + box[3]) / 2 - y1) * k
    return int(cx - canvas.size["width"] / 2), int(cy - canvas.size["height"] / 2)


def test_clicking_a_cell_shows_the_vision_towers_attention_from_it(browser, internvl_page, internvl_view):
    open_page(browser, internvl_page)
    browser.find_element(By.ID, "opacity").send_keys(Keys.END)
    data = geometry(internvl_view)
    boxes = np.array(data["tokens"]["box"])
    Select(browser.find_element(By.ID, "vision-head")).select_by_visible_text("1")
    tiles = browser.find_elements(By.CSS_SELECTOR, "#vision-panels canvas.panel")[0]
    cell = 7  # tile 1 (image tokens 4..7), row 1, col 1
    ActionChains(browser).move_to_element_with_offset(tiles, *cell_offset(tiles, data["panels"][0], boxes[cell])).click().perform()
    assert "<img v1 r1 c1>" in browser.find_element(By.ID, "vision-info").text
    stored = internvl_view.vision_attention[-1, 1, cell]  # the page opens on the last stored vision layer
    assert np.abs(stored - stored[::-1]).max() > 0.05  # cells in the wrong order would not pass unseen
    (png, _) = panel_shots(browser, "vision")
    assert_cells_show(png, data["panels"][0], data["tokens"], {4 + j: float(stored[j]) for j in range(4)})


def test_hovering_a_lens_cell_names_its_top_predictions(browser, internvl_page, internvl_view):
    open_page(browser, internvl_page)
    data = geometry(internvl_view)
    layout = internvl_view.layout
    token = int(np.flatnonzero((layout.view == 4) & (layout.row == 1) & (layout.col == 0))[0])
    thumbnail = browser.find_elements(By.CSS_SELECTOR, "#lens-panels canvas.panel")[1]
    offset = cell_offset(thumbnail, data["panels"][1], np.array(data["tokens"]["box"][token]))
    ActionChains(browser).move_to_element_with_offset(thumbnail, *offset).perform()
    tip = browser.find_element(By.ID, "tooltip")
    assert tip.is_displayed()
    lines = tip.text.splitlines()
    assert lines[0] == f"<img v4 r1 c0> (position {int(layout.position[token])})"
    assert len(lines) == 1 + internvl_view.lens_ids.shape[-1]
    top = internvl_view.lens_vocab[int(internvl_view.lens_ids[-1, token, 0])].replace("\n", "\u21b5") or "\u2205"  # as the page spells it
    text, percent = lines[1].rsplit(" ", 1)
    assert text.strip() == f"\u201c{top}\u201d"
    assert float(percent.rstrip("%")) == pytest.approx(100 * internvl_view.lens_probs[-1, token, 0], abs=0.3)



def test_a_long_prompts_query_tokens_wrap_within_the_window(browser, tmp_path, llava, photos):
    """Original LLaVA's system prompt alone is ~40 tokens: none of them may lie beyond the window."""
    view = attention_view(llava, photos["rocket"], " ".join(["describe"] * 120), layers=[0], vision_layers=[0], lens_layers=[0])
    open_page(browser, view.save(tmp_path / "long.html"))
    strip, window = browser.execute_script("const s = document.getElementById('tokens'); return [s.scrollWidth, s.clientWidth]")
    assert strip <= window
    last = browser.find_element(By.CSS_SELECTOR, f'#tokens span[data-position="{len(view.labels) - 1}"]')
    assert last.rect["x"] + last.rect["width"] <= browser.execute_script("return window.innerWidth")

def test_page_loads_from_a_file_with_no_network_request(browser, internvl_page):
    open_page(browser, internvl_page)
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert [name for name in fetched if not name.startswith("data:")] == []
    assert browser.find_element(By.ID, "lm-panels").find_elements(By.TAG_NAME, "canvas")


def test_notebook_display_is_the_page_in_a_frame_fitted_to_it(browser, tmp_path, internvl_view):
    notebook = tmp_path / "notebook.html"
    notebook.write_text(f"<!DOCTYPE html><html><body>{internvl_view._repr_html_()}</body></html>")
    browser.get(notebook.as_uri())
    frame = browser.find_element(By.TAG_NAME, "iframe")
    browser.switch_to.frame(frame)
    try:
        WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.ready"))
        assert browser.find_elements(By.CSS_SELECTOR, "#lm-panels canvas.panel")
        Select(browser.find_element(By.ID, "lm-layer")).select_by_index(0)  # a redraw must not grow the frame
        height = browser.execute_script("return Math.ceil(document.body.getBoundingClientRect().bottom) + 16")
    finally:
        browser.switch_to.default_content()
    frame_height = frame.size["height"]
    assert frame_height == height


def test_select_opens_the_page_on_the_chosen_token_layer_and_head(browser, tmp_path, internvl_view):
    answer = internvl_view.answer_start
    page = internvl_view.select(query=answer, layer=2, head=1).save(tmp_path / "chosen.html")
    open_page(browser, page)
    assert Select(browser.find_element(By.ID, "lm-layer")).first_selected_option.text == "2"
    assert Select(browser.find_element(By.ID, "lm-head")).first_selected_option.text == "1"
    assert browser.find_element(By.CSS_SELECTOR, "#tokens .sel").get_attribute("data-position") == str(answer)
    assert f"at position {answer}" in browser.find_element(By.ID, "lm-info").text


@pytest.mark.parametrize("choice", [dict(layer=7), dict(query=0), dict(head=4), dict(head=True), dict(vision_layer=3)])
def test_select_refuses_what_the_view_does_not_hold(internvl_view, choice):
    (name,) = choice
    with pytest.raises(ValueError, match=f"{name} .* is not in the view"):
        internvl_view.select(**choice)


def test_the_readme_example_writes_the_page_of_its_screenshot(tmp_path, monkeypatch):
    """The README's example, run as written (the picture beside it was taken from its page)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("\n## Attention over the image\n") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "docs/viewer_toy_internvl.png" in section and (Path(__file__).parents[1] / "docs/viewer_toy_internvl.png").is_file()
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Attention over the image)", "exec"), namespace)
    view = namespace["view"]
    assert (tmp_path / "view.html").read_text() == view.html()
    assert view.start == {"query": view.answer_start, "layer": 3, "head": 1}
    assert [p["name"] for p in geometry(view)["panels"]] == ["tiles (2)", "thumbnail"]


# ----------------------------------------------------------------------------- command line
def test_view_command_writes_the_page(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "view.html"
    image = tmp_path / "photo.png"
    Image.new("RGB", (90, 60), (200, 30, 30)).save(image)
    status = main(["view", "--model", str(tiny_checkpoint("internvl_6b")), "--image", str(image), "--prompt", PROMPT,
                   "--max-new-tokens", "3", "--out", str(out)])  # fmt: skip
    assert status == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and 'id="hvlm-data"' in page
    assert "written" in capsys.readouterr().out
