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


@dataclass
class ParityReport:
    """One row per activation family: `family`, `n` (tensors compared), `max_abs`, `max_rel`
    (max_abs / max |reference| over those tensors), `ref_scale`. Rows compare the hooked model
    with eager attention, as the reference runs, except "logits (auto attention)": the default
    path, which uses `F.scaled_dot_product_attention` when no pattern hook is attached.
    `generation_match` compares greedy continuations of `max_new_tokens` tokens."""

    rows: list[dict] = field(default_factory=list)
    generation_match: bool | None = None
    hooked_tokens: list[list[int]] = field(default_factory=list)
    reference_tokens: list[list[int]] = field(default_factory=list)
    dtype: str = ""
    reference_logits: torch.Tensor | None = field(default=None, repr=False)

    def add(self, family: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
        if ours.shape != ref.shape:
            raise ValueError(f"{family}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
        diff = (ours.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item()
        for row in self.rows:
            if row["family"] == family:
                row["n"] += 1
                row["max_abs"] = max(row["max_abs"], diff)
                row["ref_scale"] = max(row["ref_scale"], scale)
                row["max_rel"] = row["max_abs"] / max(row["ref_scale"], 1e-30)
                return
        self.rows.append({"family": family, "n": 1, "max_abs": diff, "ref_scale": scale, "max_rel": diff / max(scale, 1e-30)})

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["family", "n", "max_abs", "max_rel", "ref_scale"])

    def max_rel(self) -> float:
        return max(row["max_rel"] for row in self.rows)

    def __str__(self) -> str:
        table = self.to_dataframe().to_string(index=False, float_format=lambda x: f"{x:.3g}")
        gen = {None: "not run", True: "token-identical", False: "DIFFERENT"}[self.generation_match]
        return f"parity ({self.dtype}):\n{table}\ngreedy generation: {gen}"


def check_parity(
    name_or_path: str | Path,
    images: Sequence[Image.Image] | None = None,
    prompts: Sequence[str] | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    max_new_tokens: int = 20,
    verbose: bool = True,
    hooked: HookedVLM | None = None,
    reference: Any = None,
) -> ParityReport:
    """Compare `HookedVLM.from_pretrained(name_or_path)` with the Hugging Face model (eager
    attention), activation family by activation family. Needs a Hugging Face-format checkpoint
    (llava-hf or InternVL -HF). `hooked`/`reference` reuse already loaded models."""
    from weights_conversion import checkpoint_directory
    from weights_conversion.io import read_json

    dtype = as_dtype(dtype)
    directory = checkpoint_directory(name_or_path)
    config = read_json(directory / "config.json") or {}
    hooked = hooked or HookedVLM.from_pretrained(directory, dtype=dtype, device=device)
    if reference is None:
        reference = load_reference(directory, config, dtype, device)
    if images is None:
        images = [Image.open(ASSETS / "chelsea.jpg"), Image.open(ASSETS / "astronaut.jpg")]
    prompts = list(prompts or DEFAULT_PROMPTS[: len(images)])
    inputs = hooked.prepare(list(images), prompts)

    report = ParityReport(dtype=str(dtype).replace("torch.", ""))
    # Both sides eager: the same operations in the same order. The default "auto" attention of
    # the hooked model (SDPA when no pattern hook is attached) is reported as its own row.
    hooked.set_attention_implementation("eager")
    try:
        compare_forward(hooked, reference, inputs, report)
        if max_new_tokens:
            compare_generation(hooked, reference, inputs, max_new_tokens, report)
    finally:
        hooked.set_attention_implementation("auto")
    with torch.no_grad():
        report.add("logits (auto attention)", hooked(inputs), report.reference_logits)
    if verbose:
        print(report)
    return report


def load_reference(directory: Path, config: dict, dtype: torch.dtype, device) -> Any:
    """The Hugging Face model with eager attention (the numerics the hooked model reproduces)."""
    from transformers import InternVLForConditionalGeneration, LlavaForConditionalGeneration

    from weights_conversion import detect_format

    fmt = detect_format(config)
    classes = {"llava-hf": LlavaForConditionalGeneration, "internvl-hf": InternVLForConditionalGeneration}
    if fmt not in classes:
        raise NotImplementedError(
            f"check_parity needs a Hugging Face-format checkpoint to compare against; {directory} is {fmt!r} "
            "(convert it with transformers' conversion script, or compare two HookedVLM loads instead)"
        )
    return classes[fmt].from_pretrained(directory, dtype=dtype, attn_implementation="eager").to(device).eval()


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
        report.add("vision hidden states", cache[f"vision.blocks.{i}.hook_resid_pre"], ref_vision.hidden_states[i])
        report.add("vision attention", cache[f"vision.blocks.{i}.attn.hook_pattern"], ref_vision.attentions[i])
    if n_vision:
        report.add("vision hidden states", cache[f"vision.blocks.{n_vision - 1}.hook_resid_post"], ref_vision.hidden_states[n_vision])
    if hooked.cfg.downsample_ratio is None:
        report.add("vision features", cache["vision.hook_features"], projector_io["in"])
    else:
        report.add("pixel shuffle", cache["projector.hook_pixel_shuffle"], projector_io["in"])
    report.add("projector output", cache["projector.hook_out"], projector_io["out"])
    report.add("inputs embeds", cache["hook_inputs_embeds"], ref.hidden_states[0])
    for i in range(hooked.cfg.text.n_layers):
        report.add("LM hidden states", cache[f"blocks.{i}.hook_resid_pre"], ref.hidden_states[i])
        report.add("LM attention", cache[f"blocks.{i}.attn.hook_pattern"], ref.attentions[i])
    report.add("LM final norm", cache["ln_final.hook_normalized"], ref.hidden_states[-1])
    report.add("logits (hooks attached)", logits, ref.logits)
    report.add("logits", hooked(inputs), ref.logits)
    report.reference_logits = ref.logits


def _compared_hook(name: str) -> bool:
    return name.endswith(("hook_resid_pre", "hook_resid_post", "hook_pattern", "hook_features", "hook_pixel_shuffle")) or name in (
        "projector.hook_out",
        "hook_inputs_embeds",
        "ln_final.hook_normalized",
    )


@torch.no_grad()
def compare_generation(hooked: HookedVLM, reference: Any, inputs, max_new_tokens: int, report: ParityReport) -> None:
    """Greedy continuations of both models, compared token by token (up to each row's EOS)."""
    ours = hooked.generate(inputs, max_new_tokens=max_new_tokens, return_tokens=True)
    theirs = reference.generate(
        **_hf_forward_kwargs(inputs) | {"position_ids": None},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=hooked.cfg.pad_token_id,
    )[:, inputs.input_ids.shape[1] :]
    report.hooked_tokens = [_until_eos(row, hooked.cfg.eos_token_ids) for row in ours.tolist()]
    report.reference_tokens = [_until_eos(row, hooked.cfg.eos_token_ids) for row in theirs.tolist()]
    report.generation_match = report.hooked_tokens == report.reference_tokens


def _until_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens
