"""The paper's experiments, each a function of a model and a dataset returning a tidy DataFrame."""

from hooked_vlm.experiments.data import Sample, as_samples
from hooked_vlm.experiments.evaluate import TASKS, evaluate, summarize

__all__ = ["Sample", "as_samples", "TASKS", "evaluate", "summarize"]
