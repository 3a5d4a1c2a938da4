"""Mamba (selective state-space) layers: the selective scan, a Mamba block, its bidirectional twin.

`Mamba` mirrors `mamba_ssm.modules.mamba_simple.Mamba` of mamba_ssm 2.2.x (state-spaces/mamba):
same constructor arguments, same parameter names and shapes, and the math of its "slow path"
(causal depthwise conv, x_proj -> dt/B/C, `selective_scan_fn` with z gating, out_proj), so a
checkpoint moves between the two. It is written here rather than imported because mamba_ssm
needs CUDA kernels to build; when mamba_ssm is installed and the tensors are on a GPU, the scan
itself is handed to its fused kernel (`backend="cuda"`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

SCAN_BACKENDS = ("auto", "reference", "sequential", "chunked", "cuda")
# Steps per chunk of the closed-form "chunked" scan: 16 measured fastest on CPU (forward +
# backward, d_inner 128, d_state 16); the (T, T) decay matrix makes larger chunks memory-bound.
DEFAULT_CHUNK_SIZE = 16
# Steps per chunk of the "sequential" scan: the state is kept only at chunk boundaries, so the
# saved states cost (L / T) * d_inner * d_state. 128 measured fastest on CPU (forward + backward,
# d_inner 256, d_state 16; 32 to 512 tried): a chunk's (T, d_state, d_inner) buffers, 2 MB each,
# still sit in the L2 and L3 caches while the per-chunk overhead is spread over 128 steps.
SEQUENTIAL_CHUNK_SIZE = 128


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
    """y (b, d, L) of h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t.h_t, stepwise.

    The loop of mamba_ssm's `selective_scan_ref` under autograd. The per-step slices come from
    `unbind` (one graph node for all steps) rather than indexing, whose backward would write a
    full-length zero gradient at every step and make the backward quadratic in L.
    """
    batch, d_inner, _ = u.shape
    delta_a = torch.exp(torch.einsum("bdl,dn->lbdn", delta, A)).unbind(0)
    delta_b_u = torch.einsum("bdl,bnl,bdl->lbdn", delta, B, u).unbind(0)
    h = u.new_zeros((batch, d_inner, A.shape[1]))
    ys = []
    for a_t, b_t, c_t in zip(delta_a, delta_b_u, C.unbind(2), strict=True):
        h = a_t * h + b_t
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    return torch.stack(ys, dim=2)


def _sequence_major(x: Tensor) -> Tensor:
    """(b, c, L) -> (b, L, c) with unit stride along c: a view where the storage allows it (as for
    tensors that a Mamba block makes by transposing (b, L, c) ones), else a copy."""
    xt = x.transpose(1, 2)
    if xt.stride(-1) == 1:
        return xt
    out = x.new_empty(xt.shape)
    for row, source in zip(out, x, strict=True):
        row.copy_(source.t())  # 2-D transposing copies take PyTorch's blocked path
    return out


@contextlib.contextmanager
def _one_intra_op_thread():
    """Run PyTorch ops on one intra-op thread inside the block; the caller's setting comes back.

    The sequential scan issues thousands of small ops (a chunk is a few MB): splitting each over
    threads saves little, and when another process holds a core every split op waits for a
    scheduler slice; measured on 2 busy cores, 2 threads made the scan 20x slower than 1.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _ChunkBuffers:
    """Work buffers of one chunk of the sequential scan, (b, T, d_state, d_inner), allocated once
    per call, with their per-step views (made once: a view costs as much as a small step)."""

    def __init__(self, like: Tensor, batch: int, chunk_size: int, d_state: int, d_inner: int):
        shape = (batch, chunk_size, d_state, d_inner)
        self.decay = like.new_empty(shape)  # exp(delta_t A)
        self.states = like.new_zeros((batch, chunk_size + 1, d_state, d_inner))  # h_{t-1}, h_t...
        self.decay_steps = self.decay.unbind(1)
        self.state_steps = self.states.unbind(1)

    def run(
        self,
        u: Tensor,
        delta: Tensor,
        A2t: Tensor,
        B: Tensor,
        delta_bias: Tensor | None,
        delta_softplus: bool,
        chunk: slice,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run one chunk of the recurrence; return its pre-softplus delta, delta and delta * u.

        u, delta (b, L, d) and B (b, L, n) are sequence-major; A2t is A^T / ln 2 (n, d). Fills
        decay[:, :T] with exp(delta_t A) and states[:, 1 : T + 1] with h_t; states[:, 0] must
        hold the state before the chunk.
        """
        steps = chunk.stop - chunk.start
        delta_pre = delta[:, chunk]
        if delta_bias is not None:
            delta_pre = delta_pre + delta_bias
        dt = F.softplus(delta_pre) if delta_softplus else delta_pre  # (b, T, d)
        decay = self.decay[:, :steps]
        torch.mul(dt.unsqueeze(2), A2t, out=decay).exp2_()  # exp2: ~2x faster than exp on CPU
        dt_u = dt * u[:, chunk]
        torch.mul(dt_u.unsqueeze(2), B[:, chunk].unsqueeze(-1), out=self.states[:, 1 : steps + 1])
        h = self.state_steps
        for t, a_t in enumerate(self.decay_steps[:steps]):
            h[t + 1].addcmul_(a_t, h[t])  # in place: b_t becomes h_t = a_t h_{t-1} + b_t
        return delta_pre, dt, dt_u


class _SequentialScan(torch.autograd.Function):
    """mamba_ssm's selective_scan_fn on a CPU: a loop over the sequence, chunk by chunk.

    Written by hand because no library offers a CPU selective scan (mamba_ssm's kernels are CUDA
    only) and autograd through the stepwise loop records several graph nodes per step (the
    "reference" backend: 10-20x slower, and it keeps every state). Forward and backward walk
    the sequence in chunks of T steps laid out (b, T, d_state, d_inner), so that one step is one
    contiguous in-place addcmul and per-chunk work is vectorised. Nothing of size
    L * d_inner * d_state outlives a chunk: forward saves its inputs and the state at each chunk
    start; backward recomputes a chunk's states from its start, in reverse chunk order, and runs
    the reverse recurrence g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1} (g_t = dLoss/dh_t), with
    dLoss/d(delta_t A) = g_t * exp(delta_t A) * h_{t-1}, dLoss/d(delta_t B_t u_t) = g_t.
    Saved memory: O(L * (d_inner + d_state) + (L / T) * d_inner * d_state).
    As selective_scan_fn, it folds in delta_bias, softplus, the D skip and the silu(z) gate, so
    none of their L * d_inner intermediates is saved either (they are recomputed per chunk).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):
        with _one_intra_op_thread():
            return _SequentialScan._forward(
                ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size
            )

    @staticmethod
    def backward(ctx, grad_out):
        with _one_intra_op_thread():
            return _SequentialScan._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):
        batch, d_inner, length = u.shape
        d_state = A.shape[1]
        u_s, delta_s, B_s, C_s = (_sequence_major(t) for t in (u, delta, B, C))
        z_s = None if z is None else _sequence_major(z)
        A2t = A.t().contiguous() / math.log(2.0)  # contiguous: broadcast along d_inner
        buffers = _ChunkBuffers(u_s, batch, chunk_size, d_state, d_inner)
        states = buffers.states
        n_chunks = -(-length // chunk_size)
        chunk_starts = u.new_empty(n_chunks, batch, d_state, d_inner)
        out = u.new_empty(batch, length, d_inner)
        for k in range(n_chunks):
            chunk = slice(k * chunk_size, min((k + 1) * chunk_size, length))
            steps = chunk.stop - chunk.start
            chunk_starts[k] = states[:, 0]
            buffers.run(u_s, delta_s, A2t, B_s, delta_bias, delta_softplus, chunk)
            y = torch.matmul(C_s[:, chunk].unsqueeze(2), states[:, 1 : steps + 1]).squeeze(2)
            if D is not None:
                y.addcmul_(u_s[:, chunk], D)
            if z_s is not None:
                y.mul_(F.silu(z_s[:, chunk]))
            out[:, chunk] = y
            states[:, 0] = states[:, steps]
        ctx.delta_softplus = delta_softplus
        ctx.chunk_size = chunk_size
        # The inputs as given, not their sequence-major copies: the caller's graph holds them anyway
        # (u is the conv activation x_proj also saves); backward makes the copies again.
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_starts)
        return out.transpose(1, 2)

    @staticmethod
    def _backward(ctx, grad_out):
        u, delta, A, B, C, D, z, delta_bias, chunk_starts = ctx.saved_tensors
        u_s, delta_s, B_s, C_s = (_sequence_major(t) for t in (u, delta, B, C))
        z_s = None if z is None else _sequence_major(z)
        chunk_size = ctx.chunk_size
        batch, length, d_inner = u_s.shape
        d_state = A.shape[1]
        grad_s = _sequence_major(grad_out)
        At = A.t().contiguous()
        A2t = At / math.log(2.0)
        buffers = _ChunkBuffers(u_s, batch, chunk_size, d_state, d_inner)
        g_buf = u_s.new_empty(batch, chunk_size, d_state, d_inner)  # g_t = dLoss/dh_t
        g_steps, a_steps = g_buf.unbind(1), buffers.decay_steps
        carry = u_s.new_zeros(batch, d_state, d_inner)  # exp(delta_{t+1} A) g_{t+1}, next chunk
        du, ddelta = torch.empty_like(u_s), torch.empty_like(u_s)
        dB, dC = torch.empty_like(B_s), torch.empty_like(C_s)
        dz = None if z_s is None else torch.empty_like(z_s)
        dAt = torch.zeros_like(At)
        dD = None if D is None else torch.zeros_like(D)
        dbias = None if delta_bias is None else torch.zeros_like(delta_bias)
        for k in range(chunk_starts.shape[0] - 1, -1, -1):
            chunk = slice(k * chunk_size, min((k + 1) * chunk_size, length))
            steps = chunk.stop - chunk.start
            a, h, g = buffers.decay[:, :steps], buffers.states[:, : steps + 1], g_buf[:, :steps]
            h[:, 0] = chunk_starts[k]
            delta_pre, dt, dt_u = buffers.run(
                u_s, delta_s, A2t, B_s, delta_bias, ctx.delta_softplus, chunk
            )
            u_c, C_c, dy = u_s[:, chunk], C_s[:, chunk], grad_s[:, chunk]
            if z_s is not None:
                z_c = z_s[:, chunk]
                y = torch.matmul(C_c.unsqueeze(2), h[:, 1:]).squeeze(2)
                if D is not None:
                    y.addcmul_(u_c, D)
                gate = torch.sigmoid(z_c)
                dz[:, chunk] = dy * y * gate * (1 + z_c * (1 - gate))
                dy = dy * z_c * gate
            du_c = None
            if D is not None:
                dD += (dy * u_c).sum((0, 1))
                du_c = dy * D
            torch.mul(dy.unsqueeze(2), C_c.unsqueeze(-1), out=g)  # C_t dy_t
            g[:, steps - 1] += carry
            for t in range(steps - 2, -1, -1):
                g_steps[t].addcmul_(a_steps[t + 1], g_steps[t + 1])
            torch.mul(a_steps[0], g_steps[0], out=carry)
            dC[:, chunk] = torch.einsum("btnd,btd->btn", h[:, 1:], dy)
            dB[:, chunk] = torch.einsum("btnd,btd->btn", g, dt_u)
            g_b = torch.matmul(B_s[:, chunk].unsqueeze(2), g).squeeze(2)  # sum_n g_t B_t
            du[:, chunk] = dt * g_b if du_c is None else du_c.addcmul_(dt, g_b)
            q = a.mul_(h[:, :-1]).mul_(g)  # dLoss/d(delta_t A), (b, T, n, d)
            # h is spent: reuse it rather than allocate (fresh chunk-sized tensors page-fault)
            d_dt = torch.mul(q, At, out=h[:, 1:]).sum(2).addcmul_(g_b, u_c)
            dAt += q.mul_(dt.unsqueeze(2)).sum((0, 1))
            if ctx.delta_softplus:
                d_dt.mul_(torch.sigmoid(delta_pre))
            ddelta[:, chunk] = d_dt
            if dbias is not None:
                dbias += d_dt.sum((0, 1))
        return (
            du.transpose(1, 2),
            ddelta.transpose(1, 2),
            dAt.t(),
            dB.transpose(1, 2),
            dC.transpose(1, 2),
            dD,
            None if dz is None else dz.transpose(1, 2),
            dbias,
            None,
            None,
        )


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
    chunk_size: int | None = None,
) -> Tensor:
    """The selective-scan output (batch, d_inner, L), as mamba_ssm's selective_scan_fn.

    u, delta: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L);
    D: (d_inner,) skip; z: (batch, d_inner, L) gate (y * silu(z)); delta_bias: (d_inner,).
    backend: "reference" (stepwise loop under autograd, as mamba_ssm's selective_scan_ref),
    "sequential" (the same loop chunk by chunk with a hand-written, recomputing backward: the
    CPU fast path, memory O(L * (d_inner + d_state))), "chunked" (closed form per chunk,
    parallel over L: the GPU path without mamba_ssm), "cuda" (mamba_ssm's fused kernel), "auto"
    (see `resolve_scan_backend`). chunk_size: steps per chunk of "sequential" and "chunked"
    (default `SEQUENTIAL_CHUNK_SIZE`, `DEFAULT_CHUNK_SIZE`). Inputs that are transposed views of
    (batch, L, channels) tensors, as a Mamba block makes them, are read without copies.
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
    if chunk_size is None:
        chunk_size = SEQUENTIAL_CHUNK_SIZE if backend == "sequential" else DEFAULT_CHUNK_SIZE
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype_in = u.dtype
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    D, z, delta_bias = (None if t is None else t.to(dtype) for t in (D, z, delta_bias))
    if backend == "sequential":
        # buffers no longer than the sequence: a chunk shorter than its buffers works on strided
        # views of them, and the demo's 64 tokens in 128-step buffers made a layer 2x slower
        chunk_size = min(chunk_size, u.shape[-1])
        y = _SequentialScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size)
        return y.to(dtype_in)
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if backend == "reference":
        y = _scan_reference(u, delta, A, B, C)
    else:
        y = _scan_chunked(u, delta, A, B, C, chunk_size=chunk_size)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y.to(dtype_in)


class _CausalDepthwiseConv(torch.autograd.Function):
    """nn.Conv1d(d, d, K, groups=d, padding=K - 1)(x.transpose(1, 2))[..., :L].transpose(1, 2)
    on a sequence-major x (b, L, d): out_t = bias + sum_k w_k * x_{t - K + 1 + k}.

    Written by hand because PyTorch's conv1d wants channels-first input: handing it the
    sequence-major activations of the block costs a transposing copy each way plus a mixed-layout
    activation backward, more than the K shifted multiply-adds that are the whole conv. Saves x
    as given (a view of in_proj's output) and the weight.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        length, width = x.shape[1], weight.shape[-1]
        taps = weight[:, 0, :].t().contiguous()  # (K, d); tap K - 1 meets the current step
        out = x * taps[width - 1]
        for shift in range(1, min(width, length)):
            out[:, shift:].addcmul_(x[:, :-shift], taps[width - 1 - shift])
        if bias is not None:
            out += bias
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        length, width = x.shape[1], weight.shape[-1]
        taps = weight[:, 0, :].t().contiguous()
        grad_x = grad_out * taps[width - 1]
        grad_taps = torch.zeros_like(taps)
        grad_taps[width - 1] = (grad_out * x).sum((0, 1))
        for shift in range(1, min(width, length)):
            grad_x[:, :-shift].addcmul_(grad_out[:, shift:], taps[width - 1 - shift])
            grad_taps[width - 1 - shift] = (grad_out[:, shift:] * x[:, :-shift]).sum((0, 1))
        grad_bias = grad_out.sum((0, 1)) if ctx.has_bias else None
        return grad_x, grad_taps.t().unsqueeze(1), grad_bias


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
        recompute: bool = False,
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
        self.recompute = recompute

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
        """Block output (B, L, d_model) for hidden_states (B, L, d_model); causal along L.

        With `recompute`, training keeps only hidden_states for the backward pass and runs the
        block again there (torch.utils.checkpoint): mamba_ssm's fused path likewise recomputes
        its conv and delta instead of storing them. Same numbers; in the gene encoder benchmark
        less than half the peak memory for up to a third more time.
        """
        return _maybe_recompute(self.recompute, self._forward, hidden_states)

    def _forward(self, hidden_states: Tensor) -> Tensor:
        return self.mix(self.in_proj(hidden_states))

    def mix(self, xz: Tensor) -> Tensor:
        """Block output (B, L, d_model) from in_proj's output xz (B, L, 2 * d_inner).

        mamba_ssm's slow path, kept sequence-major: every activation is (B, L, channels), and the
        scan gets (B, channels, L) views of them, so nothing is transposed or copied on the way.
        """
        x, z = xz.chunk(2, dim=-1)
        x = self.act(_CausalDepthwiseConv.apply(x, self.conv1d.weight, self.conv1d.bias))
        x_dbl = self.x_proj(x)  # (B, L, dt_rank + 2*d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # bias added inside the scan
        A = -torch.exp(self.A_log.float())
        y = selective_scan(
            x.transpose(1, 2),
            dt.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            self.D.float(),
            z=z.transpose(1, 2),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return self.out_proj(y.transpose(1, 2))


def _maybe_recompute(recompute: bool, function, *args):
    """function(*args), under activation checkpointing when asked and autograd is recording."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def reverse_valid(x: Tensor, padding_mask: Tensor | None) -> Tensor:
    """x (B, L, ...) with each row's non-PAD prefix reversed in place; trailing PADs stay put."""
    if padding_mask is None:
        return x.flip(1)
    length = x.shape[1]
    n_valid = (~padding_mask).sum(dim=1, keepdim=True)  # (B, 1)
    pos = torch.arange(length, device=x.device).unsqueeze(0)  # (1, L)
    index = torch.where(pos < n_valid, n_valid - 1 - pos, pos)  # an involution
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return _Permute.apply(x, index)


class _Permute(torch.autograd.Function):
    """x.gather(1, index) for an index that is its own inverse along dim 1 (a reversal).

    Its gradient is the same gather, so only the index is saved; torch.gather's own backward
    keeps x alive (for BiMamba, a second copy of every in_proj output).
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        return x.gather(1, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.gather(1, index), None


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
        backward = _maybe_recompute(
            self.bwd.recompute, self._backward_direction, hidden_states, padding_mask
        )
        return self.fwd(hidden_states) + backward

    def _backward_direction(self, hidden_states: Tensor, padding_mask: Tensor | None) -> Tensor:
        # in_proj acts per token, so reversing its output equals projecting the reversed input,
        # and the graph keeps hidden_states once (both in_projs save it) instead of a reversed copy.
        xz_reversed = reverse_valid(self.bwd.in_proj(hidden_states), padding_mask)
        return reverse_valid(self.bwd.mix(xz_reversed), padding_mask)
