"""Fake accelerators for the device audit (tests/test_devices.py): models whose weights live on `fakegpu:0`, or
split over `fakegpu:0` / `fakegpu:1` as accelerate's `device_map` splits them, on a CPU-only machine.

Why not a fake `cuda:0`: torch's FakeTensorMode does hold tensors on a fake `cuda:0` in a CPU-only build, but
this build has no CUDA device guard, so Python indexing (`t[..., None]`, every model's rotary embedding) and any
backward pass fail with "not linked with support for cuda devices" (autograd aborts the process). The
PrivateUse1 backend renamed to `fakegpu`, with torch's own Python device guard
(`torch.utils.backend_registration._setup_privateuseone_for_python_backend`), has a guard: under FakeTensorMode a
whole forward and backward run, devices propagate through every op, and an op that meets two devices raises
`FakeTensorDeviceMismatchError`, as CUDA would raise "Expected all tensors to be on the same device".
Limits of this build, worked around here:
  * its Python device guard reports one device, so autograd cannot run a backward over `fakegpu:1`: on the split
    layout `loss.backward()` is skipped (`no_backward`); the forward of every loss still runs across both cards,
    which is where tensors get mixed (autograd moves gradients between devices by itself);
  * work on the CPU from real tensors (token blocks, indices, counts) runs for real; `.item()` / `float()` /
    `.tolist()` of a fake tensor return a placeholder (0.5, 1, True), so code that branches on values runs on
    (values computed by the model are meaningless here: devices are tested);
  * safetensors cannot write fake tensors: `save_file` is wrapped to check that what is written is on the CPU
    and to write zeros of the same shapes;
  * accelerate's `dispatch_model` copies parameters through their class (a FakeTensor cannot be rebuilt that way)
    and empties the device cache: the weights are placed per group with `to_empty` and accelerate's own
    `AlignDevicesHook` is attached to each group, so inputs move to a group's device exactly as in a real
    `device_map` run.
The backend is registered once per process (a rename cannot be undone) and reports itself unavailable, so nothing
else in the test session picks it as an accelerator.
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

NAME = "fakegpu"
GPU0: torch.device | None = None  # the two fake cards, set by `setup()`
GPU1: torch.device | None = None


def setup() -> None:
    """Register the `fakegpu` backend (idempotent)."""
    global GPU0, GPU1
    import torch.utils.backend_registration as br

    if torch._C._get_privateuse1_backend_name() != NAME:
        class _Module(br._DummyBackendModule):
            def is_available(self) -> bool:
                return False

            def device_count(self) -> int:
                return 2

            def get_amp_supported_dtype(self):  # torch.autocast(device_type=...) asks even when disabled
                return [torch.float16, torch.bfloat16]

        class _Hooks(br._DummyPrivateUse1Hook):
            def is_available(self) -> bool:
                return False

        br._setup_privateuseone_for_python_backend(NAME, backend_module=_Module(), hook=_Hooks())
    GPU0, GPU1 = torch.device(NAME, 0), torch.device(NAME, 1)


class AuditMode(FakeTensorMode):
    """FakeTensorMode that never runs a real kernel on the fake device and answers data reads with placeholders."""

    @property
    def avoid_device_init(self) -> bool:  # never constant-fold a copy onto the fake device (no kernels there)
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _real_cpu_work(args, kwargs):  # bookkeeping on the CPU (indices, counts, sums of real numbers): real
            try:
                with torch._subclasses.fake_tensor.unset_fake_temporarily():
                    return func(*args, **kwargs)
            except Exception:  # a real CPU tensor that fake results were added into kept its old values (e.g.
                pass           # a singular Gram matrix): computed fake instead, values do not matter here
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else (0.5 if t.is_floating_point() else 1)
        if func in (torch.ops.aten.allclose.default, torch.ops.aten.equal.default):  # checks of values: pass
            return True
        return super().__torch_dispatch__(func, types, args, kwargs)


def _real_cpu_work(args, kwargs) -> bool:
    """No fake tensor in, only CPU tensors (or none) and no other device asked for: the op runs for real, so what
    the framework computes on the CPU from real data (token blocks, unit indices, counts) keeps its values."""
    from torch.utils._pytree import tree_leaves

    leaves = tree_leaves((args, kwargs))
    if any(isinstance(a, FakeTensor) for a in leaves):
        return False
    if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in leaves):
        return False
    device = kwargs.get("device")
    return device is None or torch.device(device).type == "cpu"


def is_fake(t) -> bool:
    return isinstance(t, FakeTensor)


@contextlib.contextmanager
def audit(monkeypatch=None, backward: bool = True):
    """The mode the stages run in (`backward=False`: `Tensor.backward` does nothing)."""
    with AuditMode(allow_non_fake_inputs=True) as mode, _swappable_fakes(), \
            (contextlib.nullcontext() if backward else no_backward()):
        yield mode


class _WeakrefsOfRealTensors:
    """`weakref` as torch.utils.swap_tensors sees it, blind to the weak references the fake mode keeps on its own
    tensors: `Module.to()` swaps a fake parameter in place, which the check would refuse (the mode's memo
    of converted tensors is all that refers to them, and it is not used after a swap)."""

    def __getattr__(self, name):
        import weakref

        return getattr(weakref, name)

    @staticmethod
    def getweakrefs(obj):
        import weakref

        return [] if isinstance(obj, FakeTensor) else weakref.getweakrefs(obj)


@contextlib.contextmanager
def _swappable_fakes():
    import torch.utils as tu

    real = tu.weakref
    tu.weakref = _WeakrefsOfRealTensors()
    try:
        yield
    finally:
        tu.weakref = real


@contextlib.contextmanager
def no_backward():
    """`Tensor.backward` gives zero gradients and `torch.autograd.grad` zeros, on each input's device, without
    running autograd (split layout: see the module docstring)."""
    backward, grad = torch.Tensor.backward, torch.autograd.grad

    def leaves_get_zero_grads(self, *a, **k):
        """What a backward leaves behind: a `.grad` on each leaf's device (found by walking the graph)."""
        seen, todo = set(), [self.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            var = getattr(node, "variable", None)
            if var is not None and var.grad is None:
                var.grad = torch.zeros_like(var)
            todo.extend(nxt for nxt, _ in node.next_functions)

    torch.Tensor.backward = leaves_get_zero_grads
    torch.autograd.grad = lambda outputs, inputs, *a, **k: tuple(torch.zeros_like(i) for i in inputs)
    try:
        yield
    finally:
        torch.Tensor.backward, torch.autograd.grad = backward, grad


def save_file_on_cpu(real_save_file, strict: bool = True):
    """A `safetensors.torch.save_file` that refuses tensors not on the CPU (`strict`; safetensors itself copies a
    CUDA tensor to the host, as transformers' save_pretrained relies on) and writes zeros for fake ones."""
    def save_file(tensors, filename, metadata=None):
        for k, v in tensors.items():
            assert not strict or v.device.type == "cpu", f"{k} written from {v.device}: move it to the CPU first"
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            out = {k: torch.zeros(v.shape, dtype=v.dtype) if is_fake(v) else v for k, v in tensors.items()}
            return real_save_file(out, filename, metadata)
    return save_file


def storage_id(real_id_tensor_storage):
    """transformers' `id_tensor_storage` (how save_pretrained finds tied weights) for fake tensors too: a fake tensor
    has no data pointer (all read 0, so every weight would look tied to every other); its storage object tells
    which tensors share one."""
    def id_tensor_storage(tensor):
        if is_fake(tensor):
            return tensor.device, tensor.untyped_storage()._cdata
        return real_id_tensor_storage(tensor)
    return id_tensor_storage


def load_file_real(real_load_file):
    """A `safetensors.torch.load_file` that reads real CPU tensors (as it does outside the audit)."""
    def load_file(filename, device="cpu"):
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            return real_load_file(filename, device=device)
    return load_file


def build(model_type: str, layout: str, io_same_device: bool = False, **config) -> torch.nn.Module:
    """A causal LM of `model_type` built on the meta device (no init), then given fake weights (`build_from`)."""
    from transformers import AutoConfig

    return build_from(AutoConfig.for_model(model_type, **config), layout, io_same_device)


def build_from(cfg, layout: str, io_same_device: bool = False) -> torch.nn.Module:
    """The causal LM of config `cfg` built on the meta device (no init), then given fake weights: all on GPU0
    (`one`) or the embedding and the first half of the layers on GPU0, the rest, the final norm and the LM head on
    GPU1 (`split`), each group wrapped in accelerate's AlignDevicesHook. `io_same_device`: the whole model also
    gets the hook accelerate's `dispatch_model` puts on it (what `device_map` loading gives), which brings the
    outputs back to the input's card; without it the logits stay on the head's card, the stricter layout every
    caller that reads logits directly must survive. Call inside `audit()`."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from transformers import AutoModelForCausalLM

    with torch._subclasses.fake_tensor.unset_fake_temporarily(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)  # plain meta tensors: `to_empty` makes them fake
    model.eval()
    if layout == "one":
        return model.to_empty(device=GPU0)

    class _Placed(AlignDevicesHook):
        def init_hook(self, module):  # the weights are placed below (to_empty), not copied by accelerate
            return module

    from llm_streamline.models.layers import find_decoder_stack

    layers = {id(m) for m in find_decoder_stack(model).layers}
    for mod, card in split_groups(model):
        dev = (GPU0, GPU1)[card]
        mod.to_empty(device=dev, recurse=id(mod) in layers)  # other groups: their own tensors only
        add_hook_to_module(mod, _Placed(execution_device=dev))
    if io_same_device:  # as dispatch_model: outputs back on the input's device (appended after the group's hook)
        add_hook_to_module(model, AlignDevicesHook(io_same_device=True), append=True)
    return model


def split_groups(model: torch.nn.Module) -> list[tuple[torch.nn.Module, int]]:
    """(module, card 0 or 1) covering every tensor of `model`: the embedding, buffer-only modules (rotary tables) and
    the first half of the decoder layers on card 0; the other layers and the modules with weights after them (final
    norm, LM head) on card 1, as device_map="auto" fills card 0 with what runs first."""
    from llm_streamline.models.layers import find_decoder_stack

    stack = find_decoder_stack(model)
    half = stack.num_layers // 2
    groups = [(layer, 0 if i < half else 1) for i, layer in enumerate(stack.layers)]
    inside = {id(m) for layer in stack.layers for m in layer.modules()}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        params, buffers = list(mod.parameters(recurse=False)), list(mod.buffers(recurse=False))
        if params or buffers:
            groups.append((mod, 0 if mod is model.get_input_embeddings() or not params else 1))
    return groups


def devices_of(model: torch.nn.Module) -> set[torch.device]:
    return {p.device for p in model.parameters()}
