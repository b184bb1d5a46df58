"""`attention_view`: one (image, prompt) pair, its answer, and what the page draws of them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from jaxtyping import Float, Int
from PIL import Image

from hooked_vlm.inputs import ImageLayout, VLMInput
from hooked_vlm.viewer.collect import Selection, extend_with_answer, fit_to_budget, read_activations, select

MEGABYTE = 2**20


@dataclass
class AttentionView:
    """The viewer's data for one image and prompt (+ answer). Arrays are float32, exact:
    quantisation happens only when the page is written (`html`).

    `labels` has one string per position; `queries` are the selectable query positions;
    `answer_start` is the first answer position (`len(labels)` without an answer).
    `lm_attention[l, h, q, t]`: language-model layer `layers[l]`, head h, from `queries[q]` to
    the image's token t (layout order). `vision_attention[l, h, i, j]`: vision layer
    `vision_layers[l]`, head h (or the mean over heads: `vision_heads == "mean"`), from the
    image's i-th grid cell (layout order, CLS tokens skipped) to the j-th cell of the same view.
    `lens_ids[l, t, k]`, `lens_probs[l, t, k]`: the top-k predictions of the residual stream
    after layer `lens_layers[l]` at image token t; `lens_vocab` spells each id."""

    family: str
    image: Image.Image
    layout: ImageLayout
    labels: list[str]
    answer_start: int
    queries: Int[np.ndarray, "query"]
    layers: list[int]
    lm_attention: Float[np.ndarray, "layer head query image_token"]
    vision_layers: list[int]
    vision_heads: str
    vision_attention: Float[np.ndarray, "vision_layer vision_head cell cell"]
    lens_layers: list[int]
    lens_ids: Int[np.ndarray, "lens_layer image_token k"]
    lens_probs: Float[np.ndarray, "lens_layer image_token k"]
    lens_vocab: dict[int, str]
    title: str = ""
    panel_px: int = 360
    start: dict = field(default_factory=dict)  # what the page opens on (see `select`)

    def select(
        self,
        query: int | None = None,
        layer: int | None = None,
        head: int | str | None = None,
        vision_layer: int | None = None,
        lens_layer: int | None = None,
    ) -> AttentionView:
        """A copy that opens on these choices: `query` a query position, `layer` and `head`
        (or "mean") of the language model, `vision_layer`, `lens_layer`; others stay as they are
        (by default: the last prompt token, the middle layer, the mean over heads, the last vision
        and lens layers)."""
        checks = {
            "query": (query, self.queries.tolist()),
            "layer": (layer, self.layers),
            "head": (head, ["mean", *range(self.lm_attention.shape[1])]),
            "vision_layer": (vision_layer, self.vision_layers),
            "lens_layer": (lens_layer, self.lens_layers),
        }
        start = dict(self.start)
        for name, (value, allowed) in checks.items():
            if value is None:
                continue
            if isinstance(value, bool) or value not in allowed:
                raise ValueError(f"{name} {value!r} is not in the view; it holds {_summary(allowed)}")
            start[name] = value if value == "mean" else int(value)  # numpy integers too, as JSON numbers
        return replace(self, start=start)

    def html(self) -> str:
        """The page: one self-contained HTML document (data, script, styles and image inline)."""
        from hooked_vlm.viewer.page import render_page

        return render_page(self)

    def save(self, path: str | Path) -> Path:
        """Write the page to `path` atomically (a failure leaves the previous file or none)."""
        from hooked_vlm.viewer.page import write_page

        return write_page(Path(path), self.html())

    def _repr_html_(self) -> str:
        """Jupyter: the page in an iframe, so its script and styles stay apart from the notebook's."""
        from hooked_vlm.viewer.page import notebook_frame

        return notebook_frame(self.html())


def attention_view(
    model,
    inputs: VLMInput | Any,
    prompt: str | None = None,
    *,
    max_new_tokens: int = 0,
    layers: Sequence[int] | None = None,
    queries: Sequence[int] | None = None,
    vision_layers: Sequence[int] | None = None,
    vision_heads: str = "mean",
    lens_layers: Sequence[int] | None = None,
    lens_top_k: int = 5,
    max_megabytes: float = 32.0,
    panel_px: int = 360,
    title: str | None = None,
) -> AttentionView:
    """Attention over the image for one (image, prompt) pair: display it in Jupyter or `.save()`
    it as a self-contained HTML file.

    `inputs` is a one-row `VLMInput` from `model.prepare`, or an image (then `prompt` is needed).
    `max_new_tokens > 0` generates an answer greedily, then runs one forward over prompt +
    answer, so the answer's tokens are selectable queries too.

    Kept (defaults in brackets): language-model attention of `layers` [all], every head, from
    `queries` [the text tokens after the image, and the answer] to the image tokens; vision-tower
    attention between image-token cells within each view for `vision_layers` [four, evenly
    spaced up to the last block the projector reads], averaged over heads or per head
    (`vision_heads` "mean" | "all"); the logit lens's `lens_top_k` [5] predictions at every
    image token after each of `lens_layers` [all]. The page stores one byte per attention
    weight, before compression. When the default layers would exceed `max_megabytes`, as many
    language-model layers as fit are kept, evenly spaced (with a warning); an explicit request
    over it is refused before anything runs."""
    if not isinstance(inputs, VLMInput):
        if not isinstance(prompt, str):
            raise TypeError("attention_view(model, image, prompt): a prompt is needed with an image (or pass model.prepare's VLMInput)")
        inputs = model.prepare(inputs, prompt)
    elif prompt is not None:
        raise TypeError("pass either a VLMInput or an image and a prompt, not a VLMInput and a prompt")
    title = title if title is not None else prompt if prompt is not None else (inputs.text[0] if inputs.text else "")
    _check_single(inputs)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens and inputs.answer_mask is not None and bool(inputs.answer_mask.any()):
        raise ValueError(
            "these inputs already end in a teacher-forced answer (prepare(..., answers=)): view it with "
            "max_new_tokens=0, or prepare them without answers= to generate one"
        )
    selection = select(
        model, inputs, max_new_tokens, layers=layers, queries=queries, vision_layers=vision_layers,
        vision_heads=vision_heads, lens_layers=lens_layers, lens_top_k=lens_top_k,
    )  # fmt: skip
    selection = fit_to_budget(model, inputs, selection, max_megabytes * MEGABYTE, layers_chosen=layers is not None)
    answer_start = inputs.input_ids.shape[1]
    if max_new_tokens:
        inputs = extend_with_answer(inputs, model.generate(inputs, max_new_tokens, return_tokens=True))
        selection = _within_answer(selection, inputs.input_ids.shape[1], queries is None)
    elif inputs.answer_mask is not None and inputs.answer_mask[0].any():
        answer_start = int(inputs.answer_mask[0].nonzero()[0])  # teacher-forced: prepare(..., answers=...)
    arrays = read_activations(model, inputs, selection)
    ids = np.unique(arrays["lens_ids"])
    return AttentionView(
        family=model.cfg.family,
        image=inputs.images[0],
        layout=inputs.layout,
        labels=model.to_str_tokens(inputs)[0],
        answer_start=answer_start,
        queries=selection.queries.numpy(),
        layers=selection.layers,
        vision_layers=selection.vision_layers,
        vision_heads=selection.vision_heads,
        lens_layers=selection.lens_layers,
        lens_vocab=dict(zip(ids.tolist(), model.tokenizer.batch_decode(ids[:, None].tolist(), clean_up_tokenization_spaces=False))),
        title=title,
        panel_px=panel_px,
        **arrays,
    )


def _within_answer(selection: Selection, n_pos: int, default_queries: bool) -> Selection:
    """Queries chosen for `max_new_tokens` answer tokens, once the answer is known: it may have
    ended early (an end-of-sequence token), leaving fewer positions."""
    beyond = selection.queries[selection.queries >= n_pos]
    if len(beyond) and not default_queries:
        raise IndexError(f"query positions {beyond.tolist()} out of range: the answer ended early, at {n_pos} positions")
    return replace(selection, queries=selection.queries[selection.queries < n_pos])


def _check_single(inputs: VLMInput) -> None:
    if len(inputs) != 1:
        raise ValueError(f"a view shows one (image, prompt) pair; got a batch of {len(inputs)} (prepare one pair)")
    if inputs.layout.n_images != 1:
        raise ValueError(f"a view shows one image; the prompt holds {inputs.layout.n_images}")
    if not inputs.images:
        raise ValueError("the inputs carry no original image to draw on (build them with model.prepare)")


def _summary(values: list) -> str:
    return repr(values) if len(values) <= 12 else f"{values[:6]} ... {values[-3:]} ({len(values)} values)"
