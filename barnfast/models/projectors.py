"""Vision-language projectors: ``(I, P, C)`` patch features → ``(I, N, H)`` visual tokens.

| ``model.projector`` | module | N | exports to ``LlavaForConditionalGeneration`` |
| --- | --- | --- | --- |
| ``mlp2x_gelu`` (LLaVA-1.5) | :class:`~barnfast.kernels.ProjectorMLP` (fused kernel) | P | yes |
| ``linear`` (LLaVA-1) | :class:`LinearProjector` | P | yes: ``linear_1`` = W, act ``linear``, ``linear_2`` = identity |
| ``perceiver`` (Idefics2) | :class:`PerceiverResampler` | ``perceiver_latents`` (64) | no: barnfast's own format |

Every projector has ``linear_1`` as its first layer (the trainer reads its dtype and whether it
trains). The perceiver is Idefics2's connector (§3.1 of "What matters when building
vision-language models"): a modality projection (``linear_1``, GELU, ``linear_2``: C → H → H),
then ``depth`` (3) resampler layers in which N learned latents cross-attend to the projected
patches concatenated with the latents themselves, each followed by an MLP, pre-RMSNorm,
residuals, and a final RMSNorm. It cuts 576 CLIP tokens per image to 64, so the LLM's sequence
(and the token budget's images) shrink ~9x.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from barnfast.kernels import ProjectorMLP

PROJECTORS = ("mlp2x_gelu", "linear", "perceiver")


class LinearProjector(nn.Module):
    """One linear layer C → H (LLaVA-1); ``(..., C)`` → ``(..., H)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)

    def llava_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The weights as a ``LlavaMultiModalProjector`` with ``projector_hidden_act="linear"``:
        ``linear_2`` is the identity (weight I, bias 0), so ``linear_2(act(linear_1(x))) == linear_1(x)``
        exactly (each output is one product by 1.0 plus zeros)."""
        w = self.linear_1.weight
        H = w.shape[0]
        out = {f"{prefix}linear_1.{k}": v for k, v in self.linear_1.state_dict().items()}
        out[f"{prefix}linear_2.weight"] = torch.eye(H, dtype=w.dtype, device=w.device)
        out[f"{prefix}linear_2.bias"] = torch.zeros(H, dtype=w.dtype, device=w.device)
        return out


class _ResamplerLayer(nn.Module):
    """Latents (I, N, H) attend to [context; latents] (I, P+N, H), then an MLP; pre-norm, residual."""

    def __init__(self, hidden: int, heads: int, head_dim: int, mlp_ratio: int = 4, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_latents = nn.RMSNorm(hidden, eps=eps)
        self.norm_context = nn.RMSNorm(hidden, eps=eps)
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, inner, bias=False)
        self.v_proj = nn.Linear(hidden, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        self.norm_mlp = nn.RMSNorm(hidden, eps=eps)
        self.fc1 = nn.Linear(hidden, mlp_ratio * hidden, bias=False)
        self.fc2 = nn.Linear(mlp_ratio * hidden, hidden, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        I, N, _ = latents.shape
        lat = self.norm_latents(latents)
        kv = torch.cat([self.norm_context(context), lat], dim=1)  # (I, P+N, H), Idefics2's choice

        def split(x):  # (I, L, heads·d) → (I, heads, L, d)
            return x.view(I, -1, self.heads, self.head_dim).transpose(1, 2)

        attn = F.scaled_dot_product_attention(split(self.q_proj(lat)), split(self.k_proj(kv)), split(self.v_proj(kv)))
        latents = latents + self.o_proj(attn.transpose(1, 2).reshape(I, N, -1))
        return latents + self.fc2(F.gelu(self.fc1(self.norm_mlp(latents))))


class PerceiverResampler(nn.Module):
    """Idefics2's perceiver connector: ``(I, P, C)`` → ``(I, num_latents, H)`` (see the module docstring)."""

    def __init__(self, in_features: int, hidden: int, num_latents: int = 64, depth: int = 3,
                 heads: int | None = None, head_dim: int | None = None):
        super().__init__()
        # Idefics2: 16 heads of 96 on a 4096-wide LLM; narrow (tiny) LLMs get heads of width hidden // heads.
        heads = heads or (16 if hidden >= 16 * 96 else max(1, min(16, hidden // 32)))
        head_dim = head_dim or (96 if hidden >= 16 * 96 else hidden // heads)
        self.num_latents, self.depth = num_latents, depth
        self.linear_1 = nn.Linear(in_features, hidden)  # modality projection, LLaVA's names
        self.linear_2 = nn.Linear(hidden, hidden)
        self.latents = nn.Parameter(torch.randn(num_latents, hidden))
        self.layers = nn.ModuleList(_ResamplerLayer(hidden, heads, head_dim) for _ in range(depth))
        self.norm = nn.RMSNorm(hidden, eps=1e-6)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(I, P, C)`` → ``(I, num_latents, H)``."""
        if features.dim() != 3:
            raise ValueError(f"perceiver input must be (I, P, C), got {tuple(features.shape)}")
        context = self.linear_2(F.gelu(self.linear_1(features)))
        latents = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, context)
        return self.norm(latents)


def build_projector(kind: str, in_features: int, hidden: int, *, approximate: str = "none",
                    perceiver_latents: int = 64, perceiver_depth: int = 3, backend: str = "auto") -> nn.Module:
    """A fresh projector (initialised from the current RNG) mapping width ``in_features`` to ``hidden``.

    ``backend`` is the kernel backend of the fused MLP (``barnfast.kernels.projector_mlp``)."""
    if kind == "mlp2x_gelu":
        return ProjectorMLP(in_features, hidden, hidden, bias=True, approximate=approximate, backend=backend)
    if kind == "linear":
        return LinearProjector(in_features, hidden)
    if kind == "perceiver":
        return PerceiverResampler(in_features, hidden, num_latents=perceiver_latents, depth=perceiver_depth)
    raise ValueError(f"unknown projector {kind!r}; known: {', '.join(PROJECTORS)}")


def projector_kind(projector: nn.Module) -> str:
    """The ``model.projector`` name of a projector module."""
    if isinstance(projector, PerceiverResampler):
        return "perceiver"
    if isinstance(projector, LinearProjector):
        return "linear"
    return "mlp2x_gelu"


def output_tokens(projector: nn.Module, num_input_tokens: int) -> int:
    """Visual tokens per image after the projector: the latent count for the perceiver, else the input's."""
    return projector.num_latents if isinstance(projector, PerceiverResampler) else num_input_tokens
