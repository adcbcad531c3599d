"""A teacher whose score is known in closed form, behind UNet2DConditionModel's interface, for learning tests
that need a data distribution to converge to (a random-weight UNet has none)."""
import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.loaders.peft import _SET_ADAPTER_SCALE_FN_MAPPING
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

import dmdr  # its SD noise schedule, the one both scripts use


def gaussian_eps(x_t, abar, mean, var):
    """The exact epsilon (= -sqrt(1 - abar) x score) of x_t = sqrt(abar) x0 + sqrt(1 - abar) eps for
    x0 ~ N(mean_c, var) per latent channel c:
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mean) / (abar var + 1 - abar)."""
    abar, mean = abar.view(-1, 1, 1, 1), torch.as_tensor(mean, dtype=x_t.dtype).view(1, -1, 1, 1)
    return (1 - abar).sqrt() * (x_t - abar.sqrt() * mean) / (abar * var + 1 - abar)


# set_adapters looks its scale expansion up by class name: recent diffusers (0.42) default to the identity, 0.32
# (requirements.txt's lowest) raises KeyError for a class it does not list
_SET_ADAPTER_SCALE_FN_MAPPING.setdefault("GaussianScoreUNet", lambda model, weights: weights)


class GaussianScoreUNet(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """A teacher whose score is known in closed form, behind UNet2DConditionModel's interface (the toy's idea at
    SD's latent shape): data x0 ~ N(data_mean_c, data_var) per channel, text ignored, so CFG is a no-op. The mean
    and the log-variance are the outputs of two Linear layers named like attention projections, so the scripts'
    peft LoRAs (on to_q, to_v, and to_k, to_out.0 where present) attach to them and span the family. Every
    epsilon is affine in x_t, hence so is every DDIM map from x_T to x0: a K=1 student x0 = c1 x_T + c2 mean
    can match the teacher's many-step map exactly, and a K=1 DMD generator can reach the data distribution
    (its log-variance must rise from log 0.25 to ~2: the teacher's own one-step output at t=999 is the posterior
    mean, std 0.017, collapsed)."""

    @register_to_config
    def __init__(self, in_channels=4, sample_size=16, data_mean=(1.0, -1.0, 0.5, 0.0), data_var=0.25,
                 block_out_channels=(1,)):  # one block: no downsampling (redif.py sizes latents by it)
        super().__init__()
        self.mean, self.log_var = torch.nn.Module(), torch.nn.Module()
        self.mean.to_v = torch.nn.Linear(1, in_channels, bias=False)
        self.log_var.to_q = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.mean.to_v.weight.copy_(torch.tensor(data_mean).view(-1, 1))
            self.log_var.to_q.weight.fill_(math.log(data_var))
        self.register_buffer("alphas_cumprod", dmdr.sd_scheduler().alphas_cumprod.float(), persistent=False)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        one = sample.new_ones(1, 1)
        eps = gaussian_eps(sample, self.alphas_cumprod[timestep], self.mean.to_v(one).view(-1),
                           self.log_var.to_q(one).exp().view(1, 1, 1, 1))
        return UNet2DConditionOutput(sample=eps)
