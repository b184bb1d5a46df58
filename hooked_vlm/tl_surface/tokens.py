"""TransformerLens's token helpers, taught about image tokens.

Text goes through the checkpoint's tokenizer exactly as TransformerLens's helpers do (no chat
template: `model.prepare` is what renders a prompt). A `VLMInput` is read through its image-token
map: `to_str_tokens(inputs)` gives, per batch row, one label per position, an image token reading
as its place in the image (`<img v0 r3 c5>`: view 0, row 3, column 5 of that view's token grid),
left padding as `<pad>`.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from hooked_vlm.inputs import ImageLayout, VLMInput

PAD_LABEL = "<pad>"
IMAGE_PLACEHOLDER = "<image>"  # what original LLaVA's image id (-200, no token) stands for in its prompt


def image_token_label(image: int | None, view: int, row: int, col: int) -> str:
    """`<img v0 r3 c5>`; `<img v0 cls>` for a CLS image token; `i{image}` leads when the row or
    batch holds several images."""
    where = "cls" if row < 0 else f"r{row} c{col}"
    return f"<img {'' if image is None else f'i{image} '}v{view} {where}>"


def vision_position_labels(layout: ImageLayout, n_grid: int) -> list[list[str]]:
    """Per view of `pixel_values` (the vision tower's batch), one label per tower position:
    `<cls v0>` at 0, then `<patch v0 r3 c5>` for patch (r, c), row-major."""
    several = layout.n_images > 1
    labels = []
    for image, image_views in enumerate(layout.views):
        lead = f"i{image} " if several else ""
        for view in range(len(image_views)):
            patches = [f"<patch {lead}v{view} r{r} c{c}>" for r in range(n_grid) for c in range(n_grid)]
            labels.append([f"<cls {lead}v{view}>"] + patches)
    return labels


class TokenHelpers:
    """`to_tokens`, `to_string`, `to_str_tokens`, `to_single_token`, `to_single_str_token` and
    `get_token_position`, with TransformerLens's names, arguments and results, over `self.tokenizer`."""

    def to_tokens(
        self,
        input: str | list[str] | VLMInput,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Token ids `[batch, pos]` of a string or list of strings (padded on `padding_side`,
        default the tokenizer's), or a `VLMInput`'s own `input_ids`.

        `prepend_bos=None` keeps the tokenizer's own choice (LLaVA's Llama tokenizer starts with
        `<s>`, InternVL's Qwen tokenizer adds nothing); True or False forces it either way.
        `truncate` is accepted for TransformerLens compatibility: the language model has no
        fixed context window to cut at."""
        if isinstance(input, VLMInput):
            tokens = input.input_ids
        else:
            tokens = self._tokenize(input, prepend_bos, padding_side)
        return tokens.to(self.device) if move_to_device else tokens

    def _tokenize(self, input: str | list[str], prepend_bos: bool | None, padding_side: str | None) -> Tensor:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        texts = [input] if isinstance(input, str) else list(input)
        if not all(isinstance(text, str) for text in texts):
            raise TypeError(f"to_tokens takes a string, a list of strings or a VLMInput, got {type(input).__name__}")
        rows = [self.tokenizer(text)["input_ids"] for text in texts]
        if prepend_bos is not None:
            rows = [_with_bos(row, self.tokenizer.bos_token_id, prepend_bos) for row in rows]
        side = padding_side or self.tokenizer.padding_side
        return self.tokenizer.pad({"input_ids": rows}, padding_side=side, return_tensors="pt")["input_ids"]

    def to_string(self, tokens: Sequence[int] | Tensor | np.ndarray) -> str | list[str]:
        """Decode ids: a 1-D sequence to one string, a 2-D batch to a list of strings. Original
        LLaVA's image placeholder (id -200, no token) reads as `<image>`, the text it stands for."""
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 2:
            return [self._decode(row.tolist()) for row in tokens]
        if tokens.dim() <= 1:
            return self._decode(tokens.reshape(-1).tolist())
        raise ValueError(f"to_string takes 1-D or 2-D token ids, got shape {tuple(tokens.shape)}")

    def _decode(self, ids: list[int]) -> str:
        """The text of `ids`, runs of real tokens decoded together, a placeholder between them."""
        pieces, run = [], []
        for i in ids + [None]:
            if i is not None and i >= 0:
                run.append(i)
                continue
            if run:
                pieces.append(self.tokenizer.decode(run, clean_up_tokenization_spaces=False))
                run = []
            if i is not None:
                pieces.append(self._placeholder(i))
        return "".join(pieces)

    def _placeholder(self, token: int) -> str:
        """A negative id is no token: original LLaVA's image placeholder reads `<image>` (as
        `prepare`'s prompt wrote it); any other is an error, not a tokenizer overflow."""
        if token != self.cfg.image_token_id:
            raise ValueError(f"token id {token} is negative: no token has it (the image placeholder is {self.cfg.image_token_id})")
        return IMAGE_PLACEHOLDER

    def to_str_tokens(
        self,
        input: str | list | Tensor | np.ndarray | VLMInput,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> list[str] | list[list[str]]:
        """Each token as a string, TransformerLens's way (every id decoded on its own).

        A string gives a list, a list of strings a list of lists, ids `[pos]` or `[1, pos]` a
        list (original LLaVA's image placeholder id, -200, reads `<image>`). A `VLMInput` gives one list per batch row (also for a batch of one), one label per
        position: text tokens decoded, image tokens `<img v0 r3 c5>`, left padding `<pad>` —
        ready for circuitsvis (`cv.attention.attention_patterns(model.to_str_tokens(inputs)[0], ...)`)."""
        if isinstance(input, VLMInput):
            return self._vlm_str_tokens(input)
        if isinstance(input, list):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)[0]
        elif isinstance(input, (Tensor, np.ndarray)):
            tokens = torch.as_tensor(input).squeeze()
            if tokens.dim() > 1:
                raise ValueError(f"to_str_tokens takes ids of shape [pos] or [1, pos], got {tuple(input.shape)}")
            tokens = tokens.reshape(-1)
        else:
            raise TypeError(f"to_str_tokens takes a string, a list, token ids or a VLMInput, got {type(input).__name__}")
        return self._decode_each(tokens.tolist())

    def _decode_each(self, ids: list[int]) -> list[str]:
        decoded = iter(self.tokenizer.batch_decode([[i] for i in ids if i >= 0], clean_up_tokenization_spaces=False))
        return [next(decoded) if i >= 0 else self._placeholder(i) for i in ids]

    def _vlm_str_tokens(self, inputs: VLMInput) -> list[list[str]]:
        layout = inputs.layout
        ids, mask = inputs.input_ids.cpu(), inputs.attention_mask.cpu()
        image_rows = torch.as_tensor(layout.image_batch_row, dtype=torch.long)
        labels = []
        for row in range(len(inputs)):
            # decode only real, non-image tokens: an image placeholder may lie outside the
            # vocabulary (original LLaVA checkpoints)
            text = (mask[row] == 1).clone()
            text[layout.position[layout.batch == row]] = False
            row_labels = [PAD_LABEL] * ids.shape[1]
            for position, label in zip(text.nonzero().flatten().tolist(), self._decode_each(ids[row][text].tolist())):
                row_labels[position] = label
            several = int((image_rows == row).sum()) > 1
            for i in (layout.batch == row).nonzero().flatten().tolist():
                image = int(layout.image[i])
                local = image - int((image_rows[:image] == row).sum()) if several else None  # image index within the row
                label = image_token_label(local, int(layout.view[i]), int(layout.row[i]), int(layout.col[i]))
                row_labels[int(layout.position[i])] = label
            labels.append(row_labels)
        return labels

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no special tokens added)."""
        if not isinstance(string, str):
            raise TypeError(f"to_single_token takes a string, got {type(string).__name__} (to_single_str_token reads an id)")
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one: {self.tokenizer.convert_ids_to_tokens(ids)}")
        return ids[0]

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id."""
        return self._decode_each([int(int_token)])[0]

    def get_token_position(
        self,
        single_token: str | int | Tensor,
        input: str | Tensor | VLMInput,
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> int:
        """Position of a token (a string of one token, or an id) in a string, ids `[pos]` /
        `[1, pos]`, or a one-row `VLMInput` (positions count its padding and image tokens, so
        they index its activations directly). Raises if the token does not occur."""
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)
        else:
            tokens = input.input_ids if isinstance(input, VLMInput) else torch.as_tensor(input)
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"get_token_position searches one sequence; got a batch of {tokens.shape[0]} (index one row)")
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        single_token = int(single_token)
        found = (tokens.cpu() == single_token).nonzero().flatten()
        if isinstance(input, VLMInput):
            found = found[input.attention_mask[0].cpu()[found] == 1]  # not a padding token that shares the id
        if len(found) == 0:
            raise ValueError(f"token {single_token} ({self.to_single_str_token(single_token)!r}) does not occur in the input")
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")
        return int(found[0] if mode == "first" else found[-1])


def _with_bos(row: list[int], bos: int | None, prepend: bool) -> list[int]:
    has = bool(row) and bos is not None and row[0] == bos
    if prepend and bos is None:
        raise ValueError("prepend_bos=True, but this tokenizer has no BOS token (pass prepend_bos=None)")
    if prepend and not has:
        return [bos] + row
    if not prepend and has:
        return row[1:]
    return row

