"""The same models in PyTorch eager, for a side-by-side timing (optional:
`pip install jaxbatch[torch]`; torch is imported only when called). Each twin
holds the JAX params' numbers: conv kernels (kh, kw, Cin, Cout) -> (Cout, Cin,
kh, kw), dense kernels (in, out) -> (out, in), and the first dense layer after
a flatten gets its rows reordered from JAX's (h, w, c) flattening to PyTorch's
(c, h, w). `clipped` clips per-example gradients as torch.func users (and Opacus) do.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import jax
import numpy as np

from jaxbatch.bench.measure import matmul_peak
from jaxbatch.bench.methods import CLIP_NORM
from jaxbatch.errors import JaxbatchError

TORCH_METHODS = ("batched", "per_example", "clipped")


def require_torch():
    try:
        import torch
    except ImportError:
        raise JaxbatchError("PyTorch is not installed; install it (pip install 'jaxbatch[torch]') or drop --torch")
    return torch


def torch_device(platform: str):
    """Run the twins where JAX runs: CUDA when JAX is on a GPU, else the CPU."""
    torch = require_torch()
    return torch.device("cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu")


def tf32_like_jax() -> bool:
    """Whether JAX computes float32 matmuls and convolutions in TF32 at the precision now in force:
    on an NVIDIA GPU unless it is "highest" (or "float32"); see jaxbatch.precision."""
    return jax.default_backend() == "gpu" and jax.config.jax_default_matmul_precision not in ("highest", "float32")


@contextlib.contextmanager
def tf32(on: bool):
    """PyTorch's float32 matmuls and cuDNN convolutions in TF32 (on) or float32 (off) inside the block.
    Its defaults differ from JAX's (float32 matmuls, TF32 convolutions), which would favour one side.
    The legacy switches: mixing them with PyTorch's newer `fp32_precision` settings raises."""
    backends = require_torch().backends
    before = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32
    backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = before


def _build(name: str, c: int, size: int):
    """The twin's layers, those with weights named as in the JAX model."""
    nn = require_torch().nn
    relu, pool, flatten = nn.ReLU, lambda: nn.MaxPool2d(2), nn.Flatten
    layers = {
        "mlp": lambda: [  # text E: flatten -> 256 -> ReLU -> 10
            flatten(), ("hidden", nn.Linear(size * size * c, 256)), relu(), ("out", nn.Linear(256, 10))],
        "cnn": lambda: [  # text A
            ("conv1", nn.Conv2d(c, 16, 5, padding=2)), relu(), pool(),
            ("conv2", nn.Conv2d(16, 32, 5, padding=2)), relu(), pool(),
            flatten(), ("out", nn.Linear(32 * (size // 4) ** 2, 10))],
        "lenet5": lambda: [  # text B; 28x28 inputs zero-padded to 32x32
            *([nn.ZeroPad2d(2)] if size == 28 else []),
            ("conv1", nn.Conv2d(c, 6, 5)), relu(), pool(), ("conv2", nn.Conv2d(6, 16, 5)), relu(), pool(),
            flatten(), ("fc1", nn.Linear(16 * 5 * 5, 120)), relu(), ("fc2", nn.Linear(120, 84)), relu(),
            ("out", nn.Linear(84, 10))],
        "fc_nobias": lambda: [  # text C
            flatten(), ("hidden", nn.Linear(size * size * c, 300, bias=False)), relu(),
            ("out", nn.Linear(300, 10, bias=False))],
    }
    layers["mlp_scratch"] = layers["mlp"]
    if name not in layers:
        raise JaxbatchError(f"no PyTorch twin for model {name!r}; twins exist for: {', '.join(layers)}")
    return nn.Sequential(OrderedDict(layer if isinstance(layer, tuple) else (str(i), layer)
                                     for i, layer in enumerate(layers[name]())))


def _flattened(name: str, image_shape):
    """The first dense layer after a flatten, and the (h, w, c) feature map it flattens."""
    h, w, c = image_shape
    return {"cnn": ("out", (h // 4, w // 4, 32)), "lenet5": ("fc1", (5, 5, 16))}.get(name, ("hidden", image_shape))


def _to_torch(name, layer, kernel, image_shape):
    if kernel.ndim == 4:  # (kh, kw, Cin, Cout) -> (Cout, Cin, kh, kw)
        return kernel.transpose(3, 2, 0, 1)
    flat_layer, (h, w, c) = _flattened(name, image_shape)
    if layer == flat_layer:  # rows in JAX's (h, w, c) order -> PyTorch's (c, h, w)
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
    return kernel.T


def _to_jax(name, layer, weight, image_shape):
    """The inverse of _to_torch."""
    if weight.ndim == 4:
        return weight.transpose(2, 3, 1, 0)
    flat_layer, (h, w, c) = _flattened(name, image_shape)
    kernel = weight.T
    if layer == flat_layer:
        kernel = kernel.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
    return kernel


def flax_layers(name: str, params) -> dict:
    """{layer: {"kernel": array, "bias": array}} from Flax params (or mlp_scratch's dict)."""
    if name == "mlp_scratch":
        return {"hidden": {"kernel": params["W1"], "bias": params["b1"]},
                "out": {"kernel": params["W2"], "bias": params["b2"]}}
    return params["params"]


def torch_twin(name: str, params, image_shape, device):
    """The PyTorch twin of model `name` holding the numbers of JAX `params`."""
    torch = require_torch()
    model = _build(name, image_shape[2], image_shape[0])
    with torch.no_grad():
        for layer, arrays in flax_layers(name, params).items():
            module = getattr(model, layer)
            weight = _to_torch(name, layer, np.asarray(arrays["kernel"], np.float32), image_shape)
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
            if "bias" in arrays:
                module.bias.copy_(torch.from_numpy(np.array(arrays["bias"], np.float32)))
    return model.to(device)


def grads_to_jax_layout(name: str, model, grads, image_shape) -> dict:
    """PyTorch gradients back in the layout of the JAX params' layers, for checks."""
    out: dict = {}
    for (pname, _), g in zip(model.named_parameters(), grads):
        layer, kind = pname.split(".")
        g = g.detach().cpu().numpy()
        out.setdefault(layer, {})[{"weight": "kernel"}.get(kind, kind)] = (
            _to_jax(name, layer, g, image_shape) if kind == "weight" else g)
    return out


def to_torch_batch(xs, ys, device):
    """JAX NHWC float images and int labels -> PyTorch NCHW float32 and int64."""
    torch = require_torch()
    x = torch.from_numpy(np.array(np.asarray(xs, np.float32).transpose(0, 3, 1, 2), order="C")).to(device)
    return x, torch.from_numpy(np.array(ys, np.int64)).to(device)


def make_torch_step(method: str, model):
    """(x, y) -> tuple of mean-gradient tensors, in model.parameters() order."""
    torch = require_torch()
    F = torch.nn.functional
    params = dict(model.named_parameters())
    if method == "batched":
        return lambda x, y: torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
    if method not in TORCH_METHODS:
        raise JaxbatchError(f"unknown PyTorch method {method!r}; choose from: {', '.join(TORCH_METHODS)}")
    from torch.func import functional_call, grad, vmap

    def one_loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))
    detached = {k: v.detach() for k, v in params.items()}

    def step(x, y):
        grads = per_example(detached, x, y)
        if method == "per_example":
            return tuple(g.mean(0) for g in grads.values())
        norms = sum(g.flatten(1).pow(2).sum(1) for g in grads.values()).sqrt()
        factor = (CLIP_NORM / norms.clamp_min(1e-30)).clamp(max=1.0)
        return tuple(torch.einsum("b,b...->...", factor, g) / len(factor) for g in grads.values())

    return step


def torch_sync(device):
    torch = require_torch()
    return (lambda out: torch.cuda.synchronize()) if device.type == "cuda" else (lambda out: out)


def torch_matmul_peak(n: int, device, **timing) -> dict:
    """The matmul peak in PyTorch (measure.matmul_peak), for comparison with JAX's."""
    torch = require_torch()
    gen = torch.Generator().manual_seed(0)
    pairs = [tuple(torch.randn(n, n, generator=gen).to(device) for _ in range(2)) for _ in range(3)]
    return matmul_peak(torch.matmul, pairs, torch_sync(device), **timing)


# ---- DP-SGD twins: Opacus, against jaxbatch's private step -------------------

# Opacus 1.6's two ways to clip: "hooks" forms every per-example gradient;
# "ghost" (ghost clipping, Li et al. 2022; Bu et al. 2023) takes the norms
# without them and backpropagates a second time with the clip factors.
OPACUS_MODES = ("hooks", "ghost")


def require_opacus():
    try:
        import opacus
    except ImportError:
        raise JaxbatchError("Opacus is not installed; install it (pip install 'jaxbatch[opacus]') or drop --opacus")
    return opacus


def opacus_twin(model, mode: str, lr: float, clip: float, noise: float, batch_size: int):
    """(model, optimizer, criterion): the twin made private by Opacus in
    `mode`, SGD at `lr`, clip C and noise multiplier sigma, dividing the
    noisy clipped sum by the expected batch size B as jaxbatch's Poisson
    batches do. The batches are handed to `train_step`, not drawn by Opacus
    (poisson_sampling=False: its loader only tells Opacus B), so both
    frameworks step through the same examples."""
    torch = require_torch()
    if mode not in OPACUS_MODES:
        raise JaxbatchError(f"unknown Opacus mode {mode!r}; choose from: {', '.join(OPACUS_MODES)}")
    opacus = require_opacus()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(batch_size)),
                                         batch_size=batch_size)
    kw = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), data_loader=loader,
              noise_multiplier=noise, max_grad_norm=clip, poisson_sampling=False)
    engine = opacus.PrivacyEngine()
    criterion = torch.nn.CrossEntropyLoss()
    if mode == "ghost":
        model, optimizer, criterion, _ = engine.make_private(**kw, criterion=criterion, grad_sample_mode="ghost")
    else:
        model, optimizer, _ = engine.make_private(**kw, grad_sample_mode="hooks")
    return model, optimizer, criterion


def plain_twin(model, lr: float):
    """(model, optimizer, criterion): the twin's plain SGD step, for the same comparison."""
    torch = require_torch()
    return model, torch.optim.SGD(model.parameters(), lr=lr), torch.nn.CrossEntropyLoss()


def train_step(model, optimizer, criterion, x, y) -> None:
    """One optimiser step of a twin (plain or Opacus: the same four calls)."""
    optimizer.zero_grad(set_to_none=True)
    criterion(model(x), y).backward()
    optimizer.step()
