"""The paper's figures, drawn with matplotlib's object API.

Every function builds and returns a `matplotlib.figure.Figure` (created with `Figure()`, not
`pyplot`, so nothing is registered in global state: it works headless, in scripts that make
thousands of figures, and in notebooks, which display a returned Figure). `save_figure` writes
one to disk atomically.

- `head_heatmap`: layer x head maps such as mean mediation fractions (§1.9); heads not
  measured (NaN) are hatched grey, not drawn as 0.
- `layer_curves`: accuracy per layer or layer group, one line per condition, sd or 95% CI
  bands, baselines, section boundaries (position decoding §1.7, knockout §1.8, cumulative head
  ablation §1.10).
- `token_overlay` (+ `attention_to_image`): image tokens drawn at the pixel boxes they cover in
  the *original* image, from the `ImageLayout`, so LLaVA's pad/crop and InternVL's tiles and
  squashed thumbnail land where the model's pixels came from.
- `matrix_plot`: small annotated condition matrices (object extension, §1.5).
- `circuit_graph`, `node_score_maps`, `span_flow`, `faithfulness_figure`: edge-level circuits
  (`hooked_vlm.circuits`) across both towers.
- `evaluate_figure`, `token_ablation_figure`, ..., `position_probe_figure`: one figure per
  experiment, straight from the table it returns (what `hooked-vlm` saves as `figure.png`).
"""

from hooked_vlm.plotting.circuits import circuit_graph, faithfulness_figure, node_score_maps, span_flow
from hooked_vlm.plotting.charts import head_heatmap, layer_curves, matrix_plot, save_figure, top_heads
from hooked_vlm.plotting.experiments import (
    attention_knockout_figure,
    cumulative_head_ablation_figure,
    evaluate_figure,
    head_mediation_figure,
    object_extension_figure,
    position_probe_figure,
    token_ablation_figure,
    token_shuffle_figure,
)
from hooked_vlm.plotting.overlays import attention_to_image, token_overlay

__all__ = [
    "save_figure", "head_heatmap", "top_heads", "layer_curves", "matrix_plot", "token_overlay", "attention_to_image",
    "evaluate_figure", "token_ablation_figure", "token_shuffle_figure", "object_extension_figure",
    "attention_knockout_figure", "head_mediation_figure", "cumulative_head_ablation_figure", "position_probe_figure",
    "circuit_graph", "node_score_maps", "span_flow", "faithfulness_figure",
]  # fmt: skip
