"""The prompt settings of a model: image mode, tile limit and chat template, one setting that every
`model.prepare` (so every experiment, the CLI and `reproduce`) honours.

    model = HookedVLM.from_pretrained("llava-hf/llava-1.5-7b-hf")
    model.prompt_settings                       # PromptSettings(): the checkpoint's own
    model.use_settings(paper_settings(model))   # the paper's: pad to square, vicuna_v1's system prompt
    model.use_settings(image_mode="crop")       # change one field, keep the others
    model.prepare(image, prompt, image_mode="pad")   # an explicit argument still wins

A field left None is the checkpoint's own (`model.preprocessing`, read from its processor
config): a fresh model behaves as before. Which fields a family takes:

| field      | LLaVA-1.5                          | InternVL-3.5                                  |
|------------|------------------------------------|-----------------------------------------------|
| image_mode | "pad" (original LLaVA) or "crop" (llava-hf) | (none: a clear error)                |
| max_tiles  | (none: a clear error)              | local tiles at most (a thumbnail is added)    |
| template   | "hf" (no system turn) or "vicuna_v1" | "hf" (no system turn) or "internvl2_5"      |

The paper's settings (PAPER_PROTOCOL §1.1, §1.3), `paper_settings(model)`: LLaVA pads images to a
square and prompts with the model's own system prompt, the one LLaVA-1.5 was trained and evaluated
with (conv_vicuna_v1, for both checkpoint formats: llava-hf's chat template merely drops it);
InternVL caps local tiles at 6 (plus the thumbnail) and prompts with its own `internvl2_5`
conversation, system message included (the -HF chat template has none).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable

PAPER_MAX_TILES = 6  # InternVL: "the authors cap local tiles at 6" (PAPER_PROTOCOL §1.1)
# each family's own template: the system prompt its model was trained with (see the docstring)
OWN_TEMPLATE = {"llava": "vicuna_v1", "internvl": "internvl2_5"}
FIELDS_OF = {"llava": ("image_mode", "template"), "internvl": ("max_tiles", "template")}


@dataclass(frozen=True)
class PromptSettings:
    """How `model.prepare` turns images and prompts into inputs, where the caller does not say.
    None: the checkpoint's own (see the module docstring)."""

    image_mode: str | None = None
    max_tiles: int | None = None
    template: str | None = None

    def given(self) -> dict[str, Any]:
        """The fields that are set (not the checkpoint's own)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def paper_settings(model) -> PromptSettings:
    """The paper's settings for `model`'s family (PAPER_PROTOCOL §1.1, §1.3)."""
    family = model.cfg.family
    if family == "llava":
        return PromptSettings(image_mode="pad", template=OWN_TEMPLATE[family])
    if family == "internvl":
        return PromptSettings(max_tiles=PAPER_MAX_TILES, template=OWN_TEMPLATE[family])
    raise ValueError(f"the paper has no settings for the {family!r} family")


def checked_settings(model, settings: PromptSettings) -> PromptSettings:
    """`settings` if `model`'s family can honour them; else a ValueError naming the field, the
    family and what it accepts."""
    from hooked_vlm.families import family_module

    if not isinstance(settings, PromptSettings):
        raise TypeError(f"prompt settings are a PromptSettings, got a {type(settings).__name__}")
    family = model.cfg.family
    module = family_module(family)
    for field, value in settings.given().items():
        if field not in FIELDS_OF[family]:
            raise ValueError(f"{field} is not a setting of {family} models (they take {', '.join(FIELDS_OF[family])})")
        if field == "max_tiles":
            _check_tiles(value, model.preprocessing.min_tiles)
        else:  # image_mode and template: one of the family's names
            known = typing.get_args(module.ImageMode if field == "image_mode" else module.Template)
            if value not in known:
                raise ValueError(f"unknown {family} {field} {value!r}; expected one of {', '.join(map(repr, known))}")
    return settings


def _check_tiles(value: Any, min_tiles: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_tiles must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"max_tiles must be at least 1 (the local tiles of an image), got {value}")
    if value < min_tiles:
        raise ValueError(f"max_tiles {value} is below the checkpoint's min_tiles {min_tiles}")


def updated(model, settings: PromptSettings | None, fields: dict[str, Any]) -> PromptSettings:
    """What `model.use_settings(settings, **fields)` sets: `settings` (or the model's current
    ones) with `fields` replaced, checked against the model's family."""
    base = model.prompt_settings if settings is None else settings
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(PromptSettings)})
    if unknown:
        raise TypeError(f"no prompt setting {', '.join(unknown)}; the settings are image_mode, max_tiles and template")
    return checked_settings(model, dataclasses.replace(base, **fields))


def prepare_kwargs(model, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` of `model.prepare` with every setting the caller did not pass taken from
    `model.prompt_settings` (explicit arguments win)."""
    return model.prompt_settings.given() | kwargs


def effective_settings(model) -> dict[str, Any]:
    """The settings `model.prepare` uses when not told otherwise, the checkpoint's own filled in:
    e.g. {"image_mode": "pad", "template": "vicuna_v1"} (what results record)."""
    given = model.prompt_settings.given()
    return {field: given.get(field, getattr(model.preprocessing, field, None)) for field in FIELDS_OF[model.cfg.family]}


# ---------------------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    """--paper-settings, --image-mode, --max-tiles and --template on an argparse parser (every
    subcommand that loads a model takes them)."""
    p.add_argument("--paper-settings", action="store_true",
                   help="the paper's prompt settings: LLaVA pads to a square and uses vicuna_v1's system prompt; "
                        "InternVL at most 6 local tiles and its internvl2_5 system message (the options below win)")  # fmt: skip
    p.add_argument("--image-mode", choices=["pad", "crop"], default=None, help="LLaVA: pad to a square or centre-crop (default: the checkpoint's)")
    p.add_argument("--max-tiles", type=int, default=None, help="InternVL: local tiles at most (default: the checkpoint's)")
    p.add_argument("--template", default=None, help="chat template: LLaVA hf or vicuna_v1, InternVL hf or internvl2_5 (default: the checkpoint's)")


def requested(args) -> dict[str, Any] | Callable[[Any], PromptSettings] | None:
    """What the command line asks (see `add_arguments`), for any model: None (the checkpoint's
    own), the fields given, or with --paper-settings a function of the model (named after what it
    gives, as the control set's manifest records it)."""
    fields = {k: getattr(args, k, None) for k in ("image_mode", "max_tiles", "template")}
    fields = {k: v for k, v in fields.items() if v is not None}
    if not getattr(args, "paper_settings", False):
        return fields or None

    def settings(model) -> PromptSettings:
        return updated(model, paper_settings(model), fields)

    settings.__qualname__ = "paper_settings" + "".join(f", {k}={v!r}" for k, v in fields.items())
    return settings


def from_arguments(model, args) -> PromptSettings:
    """The settings the command line asks of `model`, checked: a setting its family does not
    take is a SystemExit naming it."""
    wanted = requested(args)
    try:
        return wanted(model) if callable(wanted) else updated(model, PromptSettings(), wanted or {})
    except (TypeError, ValueError) as error:
        raise SystemExit(f"prompt settings of {model.cfg.family} model {model.name_or_path}: {error}") from None
