"""Attention drawn over the original image: a self-contained HTML page, and a widget in notebooks.

    from hooked_vlm.viewer import attention_view
    view = attention_view(model, image, "Where is the cat?", max_new_tokens=16)
    view                      # in Jupyter: the viewer
    view.save("view.html")    # one file, no network access needed to open it

Three maps, each drawn cell by cell at the pixel boxes the image tokens cover in the original
image (through resize, pad-to-square or centre crop, and tiling: InternVL's tiles as one mosaic
beside the thumbnail): the language model's attention from a chosen query token (prompt or
answer) at a chosen layer and head; the vision tower's attention from a chosen image cell; and
the logit lens's top prediction at every image token after a chosen layer. The command line
does the same: `hooked-vlm view --model ... --image ... --prompt ... --out view.html`.
"""

from hooked_vlm.viewer.view import AttentionView, attention_view

__all__ = ["AttentionView", "attention_view"]
