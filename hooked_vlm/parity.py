"""`check_parity`: is the hooked model numerically the Hugging Face model?

The tool a user runs on a real checkpoint, on their own GPU: it loads both models, runs them on
the same photos and prompts, and reports per activation family the largest absolute difference
and that difference relative to the reference's scale (max |reference|), plus whether greedy
generations agree token for token. The test suite runs the same function on tiny checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from PIL import Image

from hooked_vlm.config import as_dtype
from hooked_vlm.model import HookedVLM

ASSETS = Path(__file__).parent / "assets"
DEFAULT_PROMPTS = ("Describe the image in one sentence.", "Please provide the bounding box coordinates of the cat.")


# Default tolerance on each activation's max-abs difference relative to its scale (max |reference|).
# Eager attention runs the reference's operations in the reference's order, so on CPU every row is
# zero; the margins cover other kernels (GPU), and in half precision the SDPA row (a few ulps).
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass
class ParityReport:
    """The comparison, in data-flow order.

    `activations`: one row per compared tensor, in the order data flows (`name` the hooked
    model's hook name or a label, `family`, `max_abs`, `max_rel` = max_abs / max |reference|,
    `ref_scale`). Rows compare the hooked model with eager attention, as the reference runs,
    except "logits (auto attention)": the default path, which uses
    `F.scaled_dot_product_attention` when no pattern hook is attached. `to_dataframe()` sums them
    up per family. `generation_match` compares greedy continuations (eager attention) of
    `max_new_tokens` tokens; `auto_generation_match` the default path's.

    `ok`: every activation within `tolerance` (relative) and greedy generations (eager)
    identical; otherwise `first_divergence` names the first activation, in data-flow order,
    beyond it. In half precision the auto-attention rows are reported but not judged (`judged`):
    SDPA reorders the sums, and the reference's own eager and SDPA paths differ as much."""

    tolerance: float
    dtype: str = ""
    activations: list[dict] = field(default_factory=list)
    generation_match: bool | None = None
    auto_generation_match: bool | None = None
    hooked_tokens: list[list[int]] = field(default_factory=list)
    reference_tokens: list[list[int]] = field(default_factory=list)
    reference_logits: torch.Tensor | None = field(default=None, repr=False)

    def add(self, family: str, name: str, ours: torch.Tensor, ref: torch.Tensor, judged: bool = True) -> None:
        if ours.shape != ref.shape:
            raise ValueError(f"{name} ({family}): shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
        diff = (ours.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item()
        row = {"name": name, "family": family, "max_abs": diff, "max_rel": diff / max(scale, 1e-30), "ref_scale": scale, "judged": judged}
        self.activations.append(row)

    @property
    def first_divergence(self) -> dict | None:
        return next((row for row in self.activations if row["judged"] and not row["max_rel"] <= self.tolerance), None)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None and self.generation_match is not False

    def to_dataframe(self, by: str = "family") -> pd.DataFrame:
        """One row per activation family (`family`, `n` tensors, `max_abs`, `max_rel`,
        `ref_scale`: maxima over the family; `judged`), or per activation (`by="activation"`)."""
        rows = pd.DataFrame(self.activations, columns=["name", "family", "max_abs", "max_rel", "ref_scale", "judged"])
        if by == "activation":
            return rows
        if by != "family":
            raise ValueError(f"by must be 'family' or 'activation', not {by!r}")
        grouped = rows.groupby("family", sort=False).agg(
            n=("name", "size"), max_abs=("max_abs", "max"), ref_scale=("ref_scale", "max"), judged=("judged", "all")
        )
        grouped["max_rel"] = grouped["max_abs"] / grouped["ref_scale"].clip(lower=1e-30)
        return grouped.reset_index()[["family", "n", "max_abs", "max_rel", "ref_scale", "judged"]]

    def max_rel(self) -> float:
        return max(row["max_rel"] for row in self.activations)

    def __str__(self) -> str:
        table = self.to_dataframe().to_string(index=False, float_format=lambda x: f"{x:.3g}")
        said = {None: "not run", True: "token-identical", False: "DIFFERENT"}
        lines = [
            f"parity ({self.dtype}; tolerance {self.tolerance:g} of each activation's scale):",
            table,
            f"greedy generation: {said[self.generation_match]} (eager attention), {said[self.auto_generation_match]} (auto attention)",
        ]
        unjudged = sorted({row["family"] for row in self.activations if not row["judged"]})
        if unjudged:
            lines.append(f"not judged in {self.dtype}: {', '.join(unjudged)} (SDPA reorders the sums, as the reference's own SDPA does)")
        row = self.first_divergence
        if row is not None:
            lines.append(
                f"FAIL: first diverging activation: {row['name']} ({row['family']}): max_abs {row['max_abs']:.3g}, "
                f"{row['max_rel']:.3g} of its scale > {self.tolerance:g}"
            )
        elif self.generation_match is False:
            lines.append("FAIL: greedy generations differ")
        else:
            lines.append("PASS: every activation within tolerance" + (", generations identical" if self.generation_match else ""))
        return "\n".join(lines)


def check_parity(
    name_or_path: str | Path,
    images: Sequence[Image.Image] | None = None,
    prompts: Sequence[str] | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    max_new_tokens: int = 20,
    tolerance: float | None = None,
    verbose: bool = True,
    hooked: HookedVLM | None = None,
    reference: Any = None,
) -> ParityReport:
    """Compare `HookedVLM.from_pretrained(name_or_path)` with the Hugging Face model (eager
    attention), activation by activation, in data-flow order, and their greedy generations.
    Needs a Hugging Face-format checkpoint (llava-hf or InternVL -HF). `tolerance` bounds each
    activation's max-abs difference relative to its scale (default: `TOLERANCES[dtype]`).
    `hooked`/`reference` reuse already loaded models. Prints the report (`verbose`) and returns
    it: `report.ok`, `report.first_divergence`, `report.to_dataframe()`."""
    from weights_conversion import checkpoint_directory
    from weights_conversion.io import read_json

    dtype = as_dtype(dtype)
    directory = checkpoint_directory(name_or_path)
    config = read_json(directory / "config.json") or {}
    _reference_class(directory, config)  # an unsupported format fails before anything loads
    hooked = hooked or HookedVLM.from_pretrained(directory, dtype=dtype, device=device)
    if reference is None:
        reference = load_reference(directory, config, dtype, device)
    if images is None:
        images = [Image.open(ASSETS / "chelsea.jpg"), Image.open(ASSETS / "astronaut.jpg")]
    prompts = list(prompts or DEFAULT_PROMPTS[: len(images)])
    inputs = hooked.prepare(list(images), prompts)

    report = ParityReport(tolerance=TOLERANCES.get(dtype, 1e-5) if tolerance is None else tolerance, dtype=str(dtype).replace("torch.", ""))
    # Both sides eager: the same operations in the same order. The default "auto" attention of
    # the hooked model (SDPA when no pattern hook is attached) is reported on its own rows.
    previous = hooked.attention_implementation
    hooked.set_attention_implementation("eager")
    try:
        compare_forward(hooked, reference, inputs, report)
        if max_new_tokens:
            compare_generation(hooked, reference, inputs, max_new_tokens, report)
        hooked.set_attention_implementation("auto")
        with torch.no_grad():
            judged = dtype in (torch.float32, torch.float64)
            report.add("logits (auto attention)", "logits (auto attention)", hooked(inputs), report.reference_logits, judged)
        if max_new_tokens:
            report.auto_generation_match = _greedy(hooked, inputs, max_new_tokens) == report.reference_tokens
    finally:
        hooked.set_attention_implementation(previous)
    if verbose:
        print(report)
    return report


def load_reference(directory: Path, config: dict, dtype: torch.dtype, device) -> Any:
    """The Hugging Face model with eager attention and eager experts (one expert at a time, in
    expert order; transformers' default `grouped_mm` sums in another order, pitfall 19): the
    numerics the hooked model reproduces."""
    reference = _reference_class(directory, config).from_pretrained(
        directory, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    )
    return reference.to(device).eval()


def _reference_class(directory: Path, config: dict) -> type:
    """The Hugging Face class whose eager forward the hooked model reproduces."""
    from transformers import InternVLForConditionalGeneration, LlavaForConditionalGeneration

    from weights_conversion import detect_format

    fmt = detect_format(config)
    classes = {"llava-hf": LlavaForConditionalGeneration, "internvl-hf": InternVLForConditionalGeneration}
    if fmt not in classes:
        raise NotImplementedError(
            f"check_parity needs a Hugging Face-format checkpoint to compare against; {directory} is {fmt!r} "
            "(convert it with transformers' conversion script, or compare two HookedVLM loads instead)"
        )
    return classes[fmt]


def _hf_forward_kwargs(inputs) -> dict:
    return dict(
        input_ids=inputs.input_ids,
        pixel_values=inputs.pixel_values.to(inputs.device),
        attention_mask=inputs.attention_mask,
        position_ids=inputs.position_ids,
    )


@torch.no_grad()
def compare_forward(hooked: HookedVLM, reference: Any, inputs, report: ParityReport) -> None:
    """Run both models once and add every activation family to `report`."""
    projector_io: dict[str, torch.Tensor] = {}
    projector = reference.model.multi_modal_projector
    handles = [
        projector.register_forward_pre_hook(lambda m, args: projector_io.__setitem__("in", args[0])),
        projector.register_forward_hook(lambda m, args, out: projector_io.__setitem__("out", out)),
    ]
    mlp_io: dict[tuple[str, int], Any] = {}  # ("out" | "router", layer) -> the layer's MLP output / router outputs
    for i, layer in enumerate(reference.model.language_model.layers):
        handles.append(layer.mlp.register_forward_hook(lambda m, args, out, i=i: mlp_io.__setitem__(("out", i), out)))
        if hasattr(layer.mlp, "experts"):  # a mixture of experts: its router's outputs too
            handles.append(layer.mlp.gate.register_forward_hook(lambda m, args, out, i=i: mlp_io.__setitem__(("router", i), out)))
    try:
        ref = reference(**_hf_forward_kwargs(inputs), output_hidden_states=True, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    pixel_values = inputs.pixel_values.to(device=inputs.device, dtype=reference.dtype)
    ref_vision = reference.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)

    logits, cache = hooked.run_with_cache(inputs, names_filter=_compared_hook)

    n_vision = hooked.cfg.vision.n_layers
    for i in range(n_vision):
        _add_cached(report, cache, "vision hidden states", f"vision.blocks.{i}.hook_resid_pre", ref_vision.hidden_states[i])
        _add_cached(report, cache, "vision attention", f"vision.blocks.{i}.attn.hook_pattern", ref_vision.attentions[i])
    if n_vision:
        _add_cached(report, cache, "vision hidden states", f"vision.blocks.{n_vision - 1}.hook_resid_post", ref_vision.hidden_states[n_vision])
    if hooked.cfg.downsample_ratio is None:
        _add_cached(report, cache, "vision features", "vision.hook_features", projector_io["in"])
    else:
        _add_cached(report, cache, "pixel shuffle", "projector.hook_pixel_shuffle", projector_io["in"])
    _add_cached(report, cache, "projector output", "projector.hook_out", projector_io["out"])
    _add_cached(report, cache, "inputs embeds", "hook_inputs_embeds", ref.hidden_states[0])
    for i in range(hooked.cfg.text.n_layers):
        _add_cached(report, cache, "LM hidden states", f"blocks.{i}.hook_resid_pre", ref.hidden_states[i])
        _add_cached(report, cache, "LM attention", f"blocks.{i}.attn.hook_pattern", ref.attentions[i])
        if ("router", i) in mlp_io:
            _add_router(report, cache, i, *mlp_io[("router", i)])
        _add_cached(report, cache, "LM MLP output", f"blocks.{i}.hook_mlp_out", mlp_io[("out", i)])
    _add_cached(report, cache, "LM final norm", "ln_final.hook_normalized", ref.hidden_states[-1])
    report.add("logits (hooks attached)", "logits (hooks attached)", logits, ref.logits)
    report.add("logits", "logits", hooked(inputs), ref.logits)
    report.reference_logits = ref.logits


def _add_cached(report: ParityReport, cache, family: str, name: str, ref: torch.Tensor) -> None:
    report.add(family, name, cache[name], ref)


def _add_router(report: ParityReport, cache, layer: int, logits: torch.Tensor, top_weights: torch.Tensor, top_index: torch.Tensor):
    """A MoE layer's router: Hugging Face's `[token, expert]` logits and its top-k weights and
    indices, made dense (zero for unselected experts) as `hook_router_weights` holds them."""
    name = f"blocks.{layer}.mlp.hook_router_logits"
    shape = cache[name].shape
    report.add("LM router logits", name, cache[name], logits.view(shape))
    dense = torch.zeros_like(logits).scatter(-1, top_index, top_weights.to(logits.dtype))
    name = f"blocks.{layer}.mlp.hook_router_weights"
    report.add("LM router weights", name, cache[name], dense.view(shape))


_COMPARED = ("hook_resid_pre", "hook_resid_post", "hook_pattern", "hook_features", "hook_pixel_shuffle")
_COMPARED_LM = ("hook_mlp_out", "mlp.hook_router_logits", "mlp.hook_router_weights")


def _compared_hook(name: str) -> bool:
    return name.endswith(_COMPARED) or (name.startswith("blocks.") and name.endswith(_COMPARED_LM)) or name in (
        "projector.hook_out",
        "hook_inputs_embeds",
        "ln_final.hook_normalized",
    )


@torch.no_grad()
def compare_generation(hooked: HookedVLM, reference: Any, inputs, max_new_tokens: int, report: ParityReport) -> None:
    """Greedy continuations of both models, compared token by token (up to each row's EOS)."""
    theirs = reference.generate(
        **_hf_forward_kwargs(inputs) | {"position_ids": None},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=hooked.cfg.pad_token_id,
    )[:, inputs.input_ids.shape[1] :]
    report.hooked_tokens = _greedy(hooked, inputs, max_new_tokens)
    report.reference_tokens = [_until_eos(row, hooked.cfg.eos_token_ids) for row in theirs.tolist()]
    report.generation_match = report.hooked_tokens == report.reference_tokens


def _greedy(hooked: HookedVLM, inputs, max_new_tokens: int) -> list[list[int]]:
    """The hooked model's greedy continuation of each row, up to and including its EOS."""
    tokens = hooked.generate(inputs, max_new_tokens=max_new_tokens, return_tokens=True)
    return [_until_eos(row, hooked.cfg.eos_token_ids) for row in tokens.tolist()]


def _until_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens
