"""A DP-friendly CNN for 28x28 images: Tramer & Boneh 2021's end-to-end CNN
("Differentially Private Learning Needs Better Features (or Much More Data)",
after Papernot et al. 2021's tempered sigmoids).

Conv 16 8x8 stride 2 pad 3 -> tanh -> MaxPool 2 stride 1 -> Conv 32 4x4
stride 2 -> tanh -> MaxPool 2 stride 1 -> flatten -> Dense 32 -> tanh ->
Dense 10. 26,010 parameters for 28x28x1 input.

Why tanh for DP-SGD: clipped, noisy updates keep pushing ReLU units into
their dead zone and scale activations up; a bounded activation keeps the
per-example gradient norms, which clipping cuts to C, from exploding, so
less of the signal is lost to clipping (Papernot et al.). The text's cnn
(ReLU) stays the `dp-mnist-cnn` recipe, for comparison.
"""

import flax.linen as nn

from jaxbatch.errors import JaxbatchError
from jaxbatch.models.init import flatten_example, torch_bias_init, torch_kernel_init


def check_image_shape(image_shape):
    """Its two stride-2 convolutions leave nothing of images below 16x16."""
    h, w = image_shape[:2]
    if h < 16 or w < 16:
        raise JaxbatchError(f"cnn_tanh takes images of 16x16 or more (it was made for 28x28), not {h}x{w}; "
                            "pick another model (mlp, cnn, fc_nobias) for this dataset")


def pool(x):
    """2x2 max pool, stride 1 (overlapping windows), of one example (H, W, C)
    or a batch: flax's pool takes the first axis as the batch."""
    if x.ndim == 3:
        return nn.max_pool(x[None], (2, 2), strides=(1, 1))[0]
    return nn.max_pool(x, (2, 2), strides=(1, 1))


class CNNTanh(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        in_ch = x.shape[-1]
        x = nn.Conv(16, (8, 8), strides=2, padding=3, kernel_init=torch_kernel_init,
                    bias_init=torch_bias_init(64 * in_ch), name="conv1")(x)
        x = pool(nn.tanh(x))
        x = nn.Conv(32, (4, 4), strides=2, padding="VALID", kernel_init=torch_kernel_init,
                    bias_init=torch_bias_init(16 * 16), name="conv2")(x)
        x = pool(nn.tanh(x))
        x = flatten_example(x)
        x = nn.tanh(nn.Dense(32, kernel_init=torch_kernel_init, bias_init=torch_bias_init(x.shape[-1]),
                             name="hidden")(x))
        return nn.Dense(self.num_classes, kernel_init=torch_kernel_init, bias_init=torch_bias_init(32),
                        name="out")(x)
