"""Text B's LeNet-5 style network, for 32x32 inputs.

Conv 6 5x5 valid -> ReLU -> MaxPool 2 -> Conv 16 5x5 valid -> ReLU -> MaxPool 2
-> flatten (16*5*5 = 400) -> Dense 120 -> ReLU -> Dense 84 -> ReLU -> Dense 10.
10 parameter arrays, 61,706 parameters for one input channel. 28x28 inputs
(MNIST) are zero-padded to 32x32, as LeNet-5 was fed originally; any other
size is refused by `check_image_shape` before anything is traced.
"""

import jax.numpy as jnp
import flax.linen as nn

from jaxbatch.errors import JaxbatchError
from jaxbatch.models.conv import max_pool
from jaxbatch.models.init import flatten_example, torch_bias_init, torch_kernel_init

INPUT_SIZE = 32


def check_image_shape(image_shape):
    h, w = image_shape[:2]
    if (h, w) not in ((32, 32), (28, 28)):
        raise JaxbatchError(
            f"lenet5 takes 32x32 images (28x28 are zero-padded to 32x32), not {h}x{w}; "
            "pick another model (mlp, cnn, fc_nobias) for this dataset"
        )


def pad_to_32(x):
    """Zero-pad 28x28 examples to 32x32 (2 pixels each side); leaves 32x32 alone."""
    h = x.shape[-3]
    if h == INPUT_SIZE:
        return x
    p = (INPUT_SIZE - h) // 2
    pad = [(0, 0)] * (x.ndim - 3) + [(p, p), (p, p), (0, 0)]
    return jnp.pad(x, pad)


class LeNet5(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        check_image_shape(x.shape[-3:])
        x = pad_to_32(x)
        in_ch = x.shape[-1]
        dense = lambda n, fan_in, name: nn.Dense(  # noqa: E731
            n, kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in), name=name)
        x = nn.Conv(6, (5, 5), padding="VALID", kernel_init=torch_kernel_init,
                    bias_init=torch_bias_init(25 * in_ch), name="conv1")(x)
        x = max_pool(nn.relu(x))
        x = nn.Conv(16, (5, 5), padding="VALID", kernel_init=torch_kernel_init,
                    bias_init=torch_bias_init(25 * 6), name="conv2")(x)
        x = max_pool(nn.relu(x))
        x = flatten_example(x)
        x = nn.relu(dense(120, x.shape[-1], "fc1")(x))
        x = nn.relu(dense(84, 120, "fc2")(x))
        return dense(self.num_classes, 84, "out")(x)
