"""The same models in PyTorch eager, for a side-by-side timing.

Each twin is the plain PyTorch network of the text it comes from (NCHW
input, `x.flatten(1)`), with its weights copied from the JAX params so both
compute the same function: conv kernels (kh, kw, Cin, Cout) -> (Cout, Cin,
kh, kw), dense kernels (in, out) -> (out, in), and the first dense layer
after a flatten has its rows reordered from JAX's (h, w, c) flattening to
PyTorch's (c, h, w).

Two methods, as in jaxbatch.bench.methods:
    batched      cross-entropy of the batch, torch.autograd.grad (eager backward)
    per_example  torch.func.vmap(torch.func.grad(one-example loss)), then the mean
    clipped      the same per-example gradients, their norms, each scaled by
                 min(1, CLIP_NORM / ||g_i||), then the mean: DP-SGD's clipping as
                 torch.func users (and Opacus) compute it

PyTorch is optional (`pip install jaxbatch[torch]`); this module imports it
only when called.
"""

from __future__ import annotations

import numpy as np

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
    if platform == "gpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _build(name: str, in_channels: int, image_size: int):
    torch = require_torch()
    nn, F = torch.nn, torch.nn.functional

    class MLP(nn.Module):  # text E: flatten -> 256 -> ReLU -> 10
        def __init__(self):
            super().__init__()
            self.hidden = nn.Linear(image_size * image_size * in_channels, 256)
            self.out = nn.Linear(256, 10)

        def forward(self, x):
            return self.out(F.relu(self.hidden(x.flatten(1))))

    class CNN(nn.Module):  # text A
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, 16, 5, padding=2)
            self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
            self.out = nn.Linear(32 * (image_size // 4) ** 2, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            return self.out(x.flatten(1))

    class LeNet5(nn.Module):  # text B; 28x28 inputs zero-padded to 32x32
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, 6, 5)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(16 * 5 * 5, 120)
            self.fc2 = nn.Linear(120, 84)
            self.out = nn.Linear(84, 10)

        def forward(self, x):
            if x.shape[-1] == 28:
                x = F.pad(x, (2, 2, 2, 2))
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            x = F.relu(self.fc1(x.flatten(1)))
            return self.out(F.relu(self.fc2(x)))

    class FCNoBias(nn.Module):  # text C
        def __init__(self):
            super().__init__()
            self.hidden = nn.Linear(image_size * image_size * in_channels, 300, bias=False)
            self.out = nn.Linear(300, 10, bias=False)

        def forward(self, x):
            return self.out(F.relu(self.hidden(x.flatten(1))))

    classes = {"mlp": MLP, "mlp_scratch": MLP, "cnn": CNN, "lenet5": LeNet5, "fc_nobias": FCNoBias}
    if name not in classes:
        raise JaxbatchError(f"no PyTorch twin for model {name!r}; twins exist for: {', '.join(classes)}")
    return classes[name]()


# The first dense layer after a flatten: its rows follow the flattened (h, w, c) order.
_FLATTEN_INPUT_LAYER = {"mlp": "hidden", "mlp_scratch": "hidden", "fc_nobias": "hidden", "cnn": "out", "lenet5": "fc1"}


def _flax_layers(name: str, params) -> dict:
    """{layer: {"kernel": array, "bias": array}} from Flax params (or mlp_scratch's dict)."""
    if name == "mlp_scratch":
        return {"hidden": {"kernel": params["W1"], "bias": params["b1"]},
                "out": {"kernel": params["W2"], "bias": params["b2"]}}
    return params["params"]


def torch_twin(name: str, params, image_shape, device):
    """The PyTorch twin of model `name` holding the numbers of JAX `params`."""
    torch = require_torch()
    h, w, c = image_shape
    model = _build(name, c, h)
    layers = _flax_layers(name, params)
    for layer_name, arrays in layers.items():
        module = getattr(model, layer_name)
        kernel = np.asarray(arrays["kernel"], np.float32)
        if kernel.ndim == 4:  # (kh, kw, Cin, Cout) -> (Cout, Cin, kh, kw)
            weight = kernel.transpose(3, 2, 0, 1)
        else:  # (in, out) -> (out, in)
            weight = kernel.T
            if layer_name == _FLATTEN_INPUT_LAYER[name]:
                # rows of the JAX kernel are in (h, w, c) order; PyTorch flattens (c, h, w)
                hh, ww, cc = _flattened_shape(name, image_shape)
                weight = weight.reshape(-1, hh, ww, cc).transpose(0, 3, 1, 2).reshape(weight.shape[0], -1)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
            if "bias" in arrays:
                module.bias.copy_(torch.from_numpy(np.array(arrays["bias"], np.float32)))
    return model.to(device)


def _flattened_shape(name: str, image_shape):
    """(h, w, c) of the feature map that model `name` flattens."""
    h, w, c = image_shape
    if name == "cnn":
        return h // 4, w // 4, 32
    if name == "lenet5":
        return 5, 5, 16
    return h, w, c


def to_torch_batch(xs, ys, device):
    """JAX NHWC float images and int labels -> PyTorch NCHW float32 and int64."""
    torch = require_torch()
    x = torch.from_numpy(np.array(np.asarray(xs, np.float32).transpose(0, 3, 1, 2), order="C")).to(device)
    y = torch.from_numpy(np.array(ys, np.int64)).to(device)
    return x, y


def make_torch_step(method: str, model):
    """(x, y) -> tuple of mean-gradient tensors, in model.parameters() order."""
    torch = require_torch()
    F = torch.nn.functional
    params = dict(model.named_parameters())

    if method == "batched":
        def step(x, y):
            loss = F.cross_entropy(model(x), y)
            return torch.autograd.grad(loss, list(params.values()))
        return step

    if method in ("per_example", "clipped"):
        from torch.func import functional_call, grad, vmap

        from jaxbatch.bench.methods import CLIP_NORM

        def one_loss(p, x, y):
            out = functional_call(model, p, (x.unsqueeze(0),))
            return F.cross_entropy(out, y.unsqueeze(0))

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

    raise JaxbatchError(f"unknown PyTorch method {method!r}; choose from: {', '.join(TORCH_METHODS)}")


def torch_sync(device):
    torch = require_torch()
    if device.type == "cuda":
        return lambda out: torch.cuda.synchronize()
    return lambda out: out


def torch_matmul_peak(n: int, device, **timing) -> dict:
    """FLOP/s of an n x n x n float32 product in PyTorch, for comparison with JAX's."""
    from jaxbatch.machine import time_calls

    torch = require_torch()
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(n, n, generator=gen).to(device), torch.randn(n, n, generator=gen).to(device))
             for _ in range(3)]
    t = time_calls(torch.matmul, pairs, torch_sync(device), **timing)
    return {"size": n, "median_s": t.median_s, "min_s": t.min_s,
            "flops_per_s": 2 * n**3 / t.min_s, "flops_per_s_median": 2 * n**3 / t.median_s}


def grads_to_jax_layout(name: str, model, grads, image_shape) -> dict:
    """PyTorch gradients back in the layout of the JAX params' layers, for checks."""
    out: dict = {}
    for (pname, _), g in zip(model.named_parameters(), grads):
        layer, kind = pname.split(".")
        g = g.detach().cpu().numpy()
        if kind == "weight":
            if g.ndim == 4:
                g = g.transpose(2, 3, 1, 0)
            else:
                if layer == _FLATTEN_INPUT_LAYER[name]:
                    hh, ww, cc = _flattened_shape(name, image_shape)
                    g = g.reshape(-1, cc, hh, ww).transpose(0, 2, 3, 1).reshape(g.shape[0], -1)
                g = g.T
            out.setdefault(layer, {})["kernel"] = g
        else:
            out.setdefault(layer, {})["bias"] = g
    return out
