"""Mamba (selective state-space) layers: the selective scan, a Mamba block, its bidirectional twin.

`Mamba` mirrors `mamba_ssm.modules.mamba_simple.Mamba` of mamba_ssm 2.2.x (state-spaces/mamba):
same constructor arguments, same parameter names and shapes, and the math of its "slow path"
(causal depthwise conv, x_proj -> dt/B/C, `selective_scan_fn` with z gating, out_proj), so a
checkpoint moves between the two. It is written here rather than imported because mamba_ssm
needs CUDA kernels to build; when mamba_ssm is installed and the tensors are on a GPU, the scan
itself is handed to its fused kernel (`backend="cuda"`).
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

SCAN_BACKENDS = ("auto", "reference", "sequential", "chunked", "cuda")
# 16 measured fastest on CPU (forward + backward, d_inner 128, d_state 16); the (T, T) decay
# matrix makes larger chunks memory-bound.
DEFAULT_CHUNK_SIZE = 16


@functools.cache
def _mamba_ssm_scan():
    """mamba_ssm's fused `selective_scan_fn`, or None where mamba_ssm cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a CUDA extension that fails to load
        return None
    return selective_scan_fn


def resolve_scan_backend(backend: str, *, device: torch.device) -> str:
    """The concrete backend that `backend` means on `device`.

    auto: mamba_ssm's CUDA kernel where importable on a GPU, else "chunked" on a GPU (parallel
    over the sequence) and "sequential" on a CPU (a tight loop with a hand-written backward).
    """
    if backend not in SCAN_BACKENDS:
        raise ValueError(
            f"unknown selective-scan backend {backend!r}; expected one of {SCAN_BACKENDS}"
        )
    if backend == "auto":
        if device.type == "cuda":
            return "cuda" if _mamba_ssm_scan() is not None else "chunked"
        return "sequential"
    if backend == "cuda" and (device.type != "cuda" or _mamba_ssm_scan() is None):
        raise ValueError(
            f"selective-scan backend 'cuda' needs mamba_ssm installed and CUDA tensors "
            f"(got device {device}, mamba_ssm importable: {_mamba_ssm_scan() is not None})"
        )
    return backend


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32 (the scan always accumulates in fp32+)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """y (b, d, L) of h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t.h_t, stepwise."""
    batch, d_inner, length = u.shape
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros((batch, d_inner, A.shape[1]))
    ys = []
    for t in range(length):
        h = delta_a[:, :, t] * h + delta_b_u[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    return torch.stack(ys, dim=2)


class _SequentialScan(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + b_t, y_t = sum_n h_t C_t over (L, batch, d_inner, d_state) inputs.

    Written by hand because autograd through a Python loop records a graph node per step and
    the closed-form chunked scan holds chunk^2 decay matrices: on a CPU both are one to two
    orders of magnitude slower than this loop, whose backward is the reverse recurrence
    g_t = a_{t+1} g_{t+1} + C_t dy_t, da_t = g_t h_{t-1}, db_t = g_t.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, c: Tensor) -> Tensor:  # (L, B, D, N) x2, (L, B, N)
        states = torch.empty_like(b)
        h = torch.zeros_like(b[0])
        for t in range(a.shape[0]):
            h = torch.addcmul(b[t], a[t], h)
            states[t] = h
        ctx.save_for_backward(a, c, states)
        return torch.einsum("lbdn,lbn->lbd", states, c)

    @staticmethod
    def backward(ctx, dy: Tensor):  # dy: (L, B, D)
        a, c, states = ctx.saved_tensors
        direct = dy.unsqueeze(-1) * c.unsqueeze(2)  # dLoss/dh_t through y_t, (L, B, D, N)
        grad_b = torch.empty_like(direct)
        g = direct[-1]
        grad_b[-1] = g
        for t in range(a.shape[0] - 2, -1, -1):
            g = torch.addcmul(direct[t], a[t + 1], g)
            grad_b[t] = g
        grad_a = torch.zeros_like(grad_b)
        grad_a[1:] = grad_b[1:] * states[:-1]
        grad_c = torch.einsum("lbdn,lbd->lbn", states, dy)
        return grad_a, grad_b, grad_c


def _scan_sequential(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """Same y as `_scan_reference`, via `_SequentialScan` on sequence-major tensors."""
    delta_lbd = delta.permute(2, 0, 1)  # (L, b, d)
    a = torch.exp(delta_lbd.unsqueeze(-1) * A)  # (L, b, d, n)
    b = (delta_lbd * u.permute(2, 0, 1)).unsqueeze(-1) * B.permute(2, 0, 1).unsqueeze(2)
    y = _SequentialScan.apply(a.contiguous(), b.contiguous(), C.permute(2, 0, 1).contiguous())
    return y.permute(1, 2, 0)


def _scan_chunked(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *, chunk_size: int
) -> Tensor:
    """Same y as `_scan_reference`, solved in closed form inside chunks of `chunk_size` steps.

    Inside a chunk, with S_t = sum_{k<=t} delta_k A (a cumulative sum in log space),
    h_t = exp(S_t) h_start + sum_{s<=t} exp(S_t - S_s) delta_s B_s u_s. The (t, s) decay matrix is
    masked to s <= t *before* the exp so nothing overflows; the state is carried between chunks.
    Taking S relative to the chunk start keeps the cumulative sums small, so S_t - S_s loses little
    precision. Memory per chunk is O(batch * d_inner * d_state * chunk^2); autograd gives the
    backward. Tensors are laid out (b, d, n, L) so the intra-chunk sum is one batched matmul.
    """
    batch, d_inner, length = u.shape
    delta_a = delta.unsqueeze(2) * A[None, :, :, None]  # log decay per step, (b, d, n, L)
    delta_b_u = (delta * u).unsqueeze(2) * B.unsqueeze(1)  # (b, d, n, L)
    h = u.new_zeros((batch, d_inner, A.shape[1]))
    ys = []
    for start in range(0, length, chunk_size):
        stop = min(start + chunk_size, length)
        cum = delta_a[..., start:stop].cumsum(dim=-1)  # S_t, (b, d, n, T)
        steps = stop - start
        causal = torch.ones(steps, steps, dtype=torch.bool, device=u.device).tril()
        log_decay = cum.unsqueeze(-1) - cum.unsqueeze(-2)  # S_t - S_s, (b, d, n, T, T)
        decay = log_decay.masked_fill(~causal, float("-inf")).exp()
        h_all = (decay @ delta_b_u[..., start:stop].unsqueeze(-1)).squeeze(-1)
        h_all = h_all + cum.exp() * h.unsqueeze(-1)  # (b, d, n, T)
        ys.append(torch.einsum("bdnt,bnt->bdt", h_all, C[..., start:stop]))
        h = h_all[..., -1]
    return torch.cat(ys, dim=2)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """The selective-scan output (batch, d_inner, L), as mamba_ssm's selective_scan_fn.

    u, delta: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L);
    D: (d_inner,) skip; z: (batch, d_inner, L) gate (y * silu(z)); delta_bias: (d_inner,).
    backend: "reference" (stepwise loop under autograd, as mamba_ssm's selective_scan_ref),
    "sequential" (the same loop with a hand-written backward: the CPU fast path), "chunked"
    (closed form per chunk, parallel over L: the GPU path without mamba_ssm), "cuda" (mamba_ssm's
    fused kernel), "auto" (see `resolve_scan_backend`).
    """
    backend = resolve_scan_backend(backend, device=u.device)
    if backend == "cuda":
        scan_fn = _mamba_ssm_scan()
        return scan_fn(
            u.contiguous(),
            delta.contiguous(),
            A.contiguous(),
            B.contiguous(),
            C.contiguous(),
            None if D is None else D.contiguous(),
            None if z is None else z.contiguous(),
            delta_bias,
            delta_softplus,
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype_in = u.dtype
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if backend == "reference":
        y = _scan_reference(u, delta, A, B, C)
    elif backend == "sequential":
        y = _scan_sequential(u, delta, A, B, C)
    else:
        y = _scan_chunked(u, delta, A, B, C, chunk_size=chunk_size)
    if D is not None:
        y = y + u * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(dtype_in)


class Mamba(nn.Module):
    """One Mamba block, (B, L, d_model) -> (B, L, d_model); parameters as mamba_ssm.Mamba's."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
        *,
        scan_backend: str = "auto",
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if scan_backend not in SCAN_BACKENDS:
            raise ValueError(
                f"unknown selective-scan backend {scan_backend!r}; expected one of {SCAN_BACKENDS}"
            )
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        # Kept for signature compatibility; the fused mamba_inner_fn path is not used here.
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(
            in_channels=self.d_inner,
            out_channels=self.d_inner,
            bias=conv_bias,
            kernel_size=d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            **factory_kwargs,
        )
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(
            self.d_inner, self.dt_rank + self.d_state * 2, bias=False, **factory_kwargs
        )
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        # dt projection initialised to preserve variance (as mamba_ssm).
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init must be 'constant' or 'random', got {dt_init!r}")
        # dt bias such that softplus(bias) is log-uniform in [dt_min, dt_max].
        dt = torch.exp(
            torch.rand(self.d_inner, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation of A, kept in fp32 as in mamba_ssm.
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        self.A_log = nn.Parameter(torch.log(a).repeat(self.d_inner, 1).contiguous())
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """Block output (B, L, d_model) for hidden_states (B, L, d_model); causal along L."""
        seqlen = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = self.act(self.conv1d(x)[..., :seqlen])  # causal depthwise conv
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2*d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias added inside the scan
        A = -torch.exp(self.A_log.float())
        y = selective_scan(
            x,
            dt,
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return self.out_proj(y.transpose(1, 2))


def reverse_valid(x: Tensor, padding_mask: Tensor | None) -> Tensor:
    """x (B, L, ...) with each row's non-PAD prefix reversed in place; trailing PADs stay put."""
    if padding_mask is None:
        return x.flip(1)
    length = x.shape[1]
    n_valid = (~padding_mask).sum(dim=1, keepdim=True)  # (B, 1)
    pos = torch.arange(length, device=x.device).unsqueeze(0)  # (1, L)
    index = torch.where(pos < n_valid, n_valid - 1 - pos, pos)  # an involution
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


class BiMamba(nn.Module):
    """Bidirectional Mamba (Caduceus / Vision Mamba): a forward and a backward Mamba, summed."""

    def __init__(self, d_model: int, **mamba_kwargs) -> None:
        super().__init__()
        self.fwd = Mamba(d_model, **mamba_kwargs)
        self.bwd = Mamba(d_model, **mamba_kwargs)

    def forward(self, hidden_states: Tensor, *, padding_mask: Tensor | None = None) -> Tensor:
        """Output (B, L, d_model); with padding_mask (B, L, True = PAD, PADs trailing) the backward
        direction reverses only the real tokens, so PADs never reach them."""
        if padding_mask is not None:
            trailing = padding_mask.int().diff(dim=1).ge(0).all()
            if not bool(trailing):
                raise ValueError(
                    "BiMamba padding_mask must mark trailing PADs only (B, L, True = PAD)"
                )
        backward = reverse_valid(self.bwd(reverse_valid(hidden_states, padding_mask)), padding_mask)
        return self.fwd(hidden_states) + backward
