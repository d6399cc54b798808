"""Text C's fully connected net without biases, for CIFAR-10.

flatten -> Dense 300 (no bias) -> ReLU -> Dense 10 (no bias); 924,600
parameters for 32x32x3 input. PyTorch's default initialisation, because text
C's outcomes (divergence at inputs x255, recovery with weights /255) depend
on it. Flattens each example by its own shape, not by `reshape(250, -1)`.
"""

import flax.linen as nn

from jaxbatch.models.init import flatten_example, torch_kernel_init


class FCNoBias(nn.Module):
    hidden: int = 300
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = flatten_example(x)
        x = nn.relu(nn.Dense(self.hidden, use_bias=False, kernel_init=torch_kernel_init, name="hidden")(x))
        return nn.Dense(self.num_classes, use_bias=False, kernel_init=torch_kernel_init, name="out")(x)
