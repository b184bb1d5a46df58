"""The paper's experiments, each a function of a model and a dataset returning a tidy DataFrame.

Each describes its work as items (`hooked_vlm.runs`): called with `run=<folder>` it records its
rows item by item, resumes after a crash and shares the items among the processes of a launch."""

from hooked_vlm.experiments.attention_knockout import attention_knockout
from hooked_vlm.experiments.cumulative_head_ablation import cumulative_head_ablation, normalised_auc
from hooked_vlm.experiments.data import Sample, as_samples
from hooked_vlm.experiments.edge_circuit import circuit_faithfulness, edge_circuit
from hooked_vlm.experiments.evaluate import TASKS, box_format, default_frame, evaluate, summarize
from hooked_vlm.experiments.frames import calibrate_frame
from hooked_vlm.experiments.head_mediation import head_mediation, mediation_counts, mediation_map, rank_heads
from hooked_vlm.experiments.object_extension import extension_matrix, object_extension
from hooked_vlm.experiments.position_probe import position_probe
from hooked_vlm.experiments.token_ablation import register_tokens, token_ablation
from hooked_vlm.experiments.token_shuffle import token_shuffle

__all__ = [
    "Sample",
    "as_samples",
    "TASKS",
    "evaluate",
    "summarize",
    "box_format",
    "default_frame",
    "calibrate_frame",
    "head_mediation",
    "mediation_map",
    "mediation_counts",
    "rank_heads",
    "cumulative_head_ablation",
    "normalised_auc",
    "position_probe",
    "token_ablation",
    "register_tokens",
    "token_shuffle",
    "object_extension",
    "extension_matrix",
    "attention_knockout",
    "edge_circuit",
    "circuit_faithfulness",
]
