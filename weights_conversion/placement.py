"""Where each parameter of a hooked model goes: one device, a device map given by hand, or a map
that accelerate computes from the parameter sizes, as transformers' `device_map=` does.

A device map names modules of the hooked model (prefixes such as "vision", "vision.blocks.3",
"projector", "embed", "blocks.12", "ln_final", "unembed"; "" is the whole model) and gives each a
device. The strategies "auto" (= "balanced"), "balanced", "balanced_low_0" and "sequential" are
accelerate's: `get_balanced_memory` spreads the model evenly over the GPUs (keeping GPU 0 light for
"balanced_low_0"), `infer_auto_device_map` then fills the devices in module order within
`max_memory`, never splitting a transformer block (vision or language) or the projector, and keeping
tied embeddings together. The forward moves each activation to the device of the block it enters.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from weights_conversion.io import _listing

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# Modules whose weights must share a device: a residual block reads its input twice, and the
# projector is one small MLP. Class names, as accelerate takes them.
NO_SPLIT_MODULES = ["TransformerBlock", "Projector"]

DeviceMap = dict[str, Any]


def infer_device_map(model: nn.Module, strategy: str = "auto", max_memory: dict | None = None) -> DeviceMap:
    """accelerate's device map for `model` (on the meta device; its parameters' dtypes are the ones
    that will be loaded): module name -> GPU index, "cpu" (or "mps"). `max_memory` as in
    transformers, e.g. `{0: "20GiB", 1: "40GiB", "cpu": "100GiB"}`; default: what is free now."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    if strategy not in STRATEGIES:
        raise ValueError(f"device_map strategy must be one of {STRATEGIES} or a dict, not {strategy!r}")
    dtype = next(model.parameters()).dtype
    with _untied(model) as ties:
        if strategy == "sequential":
            memory = get_max_memory(dict(max_memory) if max_memory else None)
        else:
            memory = get_balanced_memory(
                model, max_memory=dict(max_memory) if max_memory else None, no_split_module_classes=NO_SPLIT_MODULES,
                dtype=dtype, low_zero=strategy == "balanced_low_0",
            )  # fmt: skip
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=NO_SPLIT_MODULES, dtype=dtype)
    for first, *others in ties:  # a tied weight is one tensor: it lives with the first module that holds it
        device = _device_of(first, device_map)
        device_map |= {name: device for name in others if _device_of(name, device_map) != device}
    offloaded = [name for name, device in device_map.items() if device in ("disk", "meta")]
    if offloaded:
        raise ValueError(
            f"the model does not fit in the memory available ({memory}): {_listing(offloaded, 10)} would be offloaded to "
            "disk, which HookedVLM does not do; give max_memory more room on a GPU or on the CPU"
        )
    return device_map


@contextlib.contextmanager
def _untied(model: nn.Module):
    """Tied parameters (the embedding and a tied LM head) given separate meta copies while
    accelerate computes the map. accelerate matches module names by substring, so a tie between
    "embed" and "unembed" breaks its bookkeeping (IndexError); untied, each is simply counted
    (which over-counts the shared tensor once: a conservative map). Yields the tie groups."""
    from accelerate.utils import find_tied_parameters

    ties = find_tied_parameters(model)
    originals = []
    for group in ties:
        for name in group[1:]:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            originals.append((module, attr, getattr(module, attr)))
            setattr(module, attr, nn.Parameter(torch.empty_like(getattr(module, attr), device="meta"), requires_grad=False))
    try:
        yield ties
    finally:
        for module, attr, parameter in originals:
            setattr(module, attr, parameter)


def _device_of(name: str, device_map: DeviceMap) -> Any:
    owner = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
    return device_map[owner]


def torch_device(device: Any) -> torch.device:
    """A device-map value (an accelerator index, "cpu", "cuda:1", a torch.device) as a torch.device.
    An integer is an index of the machine's accelerator (CUDA, or XPU/NPU/MPS where present), as
    for accelerate."""
    if isinstance(device, int) and not isinstance(device, bool):
        backend = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return torch.device(backend.type if backend is not None else "cuda", device)
    return torch.device(device)


class Placement:
    """Where each parameter goes: `device` for all, or `device_map`: a dict of module-name prefixes
    -> devices (accelerate's format; "" places everything), one of `STRATEGIES` (computed by
    accelerate within `max_memory`), or one device given as `device_map` ("cuda:1", 0)."""

    def __init__(self, device: Any = "cpu", device_map: DeviceMap | str | int | torch.device | None = None, max_memory: dict | None = None):
        if device_map is not None and not isinstance(device_map, dict) and device_map not in STRATEGIES:
            try:
                device_map = {"": torch_device(device_map)}  # transformers' device_map="cuda:1" / 0
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"device_map must be a dict, one of {STRATEGIES} or a device, not {device_map!r}") from error
        if max_memory is not None and not isinstance(device_map, str):
            raise ValueError(f"max_memory is only used with device_map set to one of {STRATEGIES}")
        self.default = torch.device(device)
        self.device_map = device_map
        self.max_memory = max_memory
        self._map: dict[str, torch.device] | None = None
        self.hf_device_map: DeviceMap = {"": str(self.default)}

    def resolve(self, model: nn.Module) -> None:
        """Fix the map for `model`, built on the meta device with the dtype it will be loaded in.
        A dict must name modules the model has; a strategy is computed by accelerate."""
        if self.device_map is None:
            return
        names = [name for name, _ in model.named_parameters()]
        if isinstance(self.device_map, str):
            self.hf_device_map = infer_device_map(model, self.device_map, self.max_memory)
        else:
            self._check_keys(model)
            self.hf_device_map = dict(self.device_map)
        self._map = {name: torch_device(device) for name, device in self.hf_device_map.items()}
        for name in names:
            self(name)  # every parameter placed, before anything is read

    def _check_keys(self, model: nn.Module) -> None:
        """A device_map key that names no module or parameter of the model is a typo, not a no-op."""
        known = {name for name, _ in model.named_modules()} | {name for name, _ in model.named_parameters()}
        unused = [k for k in self.device_map if k not in known]
        if unused:
            tops = sorted({name.split(".")[0] for name, _ in model.named_parameters()})
            raise ValueError(f"device_map keys {unused} name no module of the model (top-level modules: {tops}; blocks are 'blocks.N')")

    def __call__(self, name: str) -> torch.device:
        if self._map is None:
            return self.default
        if not any(k == "" or name == k or name.startswith(k + ".") for k in self._map):
            raise ValueError(f"device_map does not place {name!r}; give a device for one of its parent modules")
        return _device_of(name, self._map)

