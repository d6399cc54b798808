"""Text A's small CNN for MNIST.

Conv 16 5x5 pad 2 -> ReLU -> MaxPool 2 -> Conv 32 5x5 pad 2 -> ReLU -> MaxPool 2
-> flatten -> Dense 10. 28,938 parameters for 28x28x1 input. PyTorch's default
initialisation (see init.py). Takes one example (H, W, C) or a batch.
"""

import flax.linen as nn

from jaxbatch.models.conv import max_pool
from jaxbatch.models.init import flatten_example, torch_bias_init, torch_kernel_init


class CNN(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        in_ch = x.shape[-1]
        x = nn.Conv(16, (5, 5), padding=2, kernel_init=torch_kernel_init,
                    bias_init=torch_bias_init(25 * in_ch), name="conv1")(x)
        x = max_pool(nn.relu(x))
        x = nn.Conv(32, (5, 5), padding=2, kernel_init=torch_kernel_init,
                    bias_init=torch_bias_init(25 * 16), name="conv2")(x)
        x = max_pool(nn.relu(x))
        x = flatten_example(x)
        return nn.Dense(self.num_classes, kernel_init=torch_kernel_init,
                        bias_init=torch_bias_init(x.shape[-1]), name="out")(x)
