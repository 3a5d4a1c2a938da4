"""Selective scan backends agree (values and gradients); Mamba mirrors mamba_ssm's parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mgi.models.mamba import (
    BiMamba,
    Mamba,
    _CausalDepthwiseConv,
    resolve_scan_backend,
    reverse_valid,
    selective_scan,
)

SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_inputs(length: int, *, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random scan inputs (batch 2, d_inner 3, d_state 4) that all require grad."""
    g = torch.Generator().manual_seed(seed)
    b, d, n = 2, 3, 4

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    tensors = {
        "u": rand(b, d, length),
        "delta": torch.rand(b, d, length, generator=g, dtype=dtype) * 0.5,
        "A": -torch.exp(rand(d, n)),
        "B": rand(b, n, length),
        "C": rand(b, n, length),
        "D": rand(d),
        "z": rand(b, d, length),
        "delta_bias": rand(d) * 0.5,
    }
    return {k: v.requires_grad_() for k, v in tensors.items()}


def run_scan(inputs, *, backend, use_d, use_z, use_bias, softplus, chunk_size=8):
    """Scan output and the gradients of a fixed random projection of it w.r.t. every input."""
    y = selective_scan(
        inputs["u"],
        inputs["delta"],
        inputs["A"],
        inputs["B"],
        inputs["C"],
        inputs["D"] if use_d else None,
        z=inputs["z"] if use_z else None,
        delta_bias=inputs["delta_bias"] if use_bias else None,
        delta_softplus=softplus,
        backend=backend,
        chunk_size=chunk_size,
    )
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    used = [
        k
        for k in SCAN_ARGS
        if not (
            (k == "D" and not use_d)
            or (k == "z" and not use_z)
            or (k == "delta_bias" and not use_bias)
        )
    ]
    grads = torch.autograd.grad((y * weight).sum(), [inputs[k] for k in used])
    return y, dict(zip(used, grads, strict=True))


OPTIONS = [
    dict(use_d=False, use_z=False, use_bias=False, softplus=False),
    dict(use_d=True, use_z=True, use_bias=True, softplus=True),
    dict(use_d=True, use_z=False, use_bias=True, softplus=False),
    dict(use_d=False, use_z=True, use_bias=False, softplus=True),
]


FAST_BACKENDS = ["sequential", "chunked"]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("length", [1, 5, 16, 37])
@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: "-".join(k for k, v in o.items() if v) or "bare"
)
def test_fast_scans_match_reference_values_and_gradients_float64(backend, length, options):
    inputs = scan_inputs(length, dtype=torch.float64)
    y_ref, g_ref = run_scan(inputs, backend="reference", **options)
    y_chk, g_chk = run_scan(inputs, backend=backend, **options)
    assert y_chk.dtype == torch.float64
    torch.testing.assert_close(y_chk, y_ref, rtol=1e-6, atol=1e-9)
    assert g_chk.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_chk[name], g_ref[name], rtol=1e-6, atol=1e-9, msg=name)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = "y"):
    """max |actual - expected| <= rel * max |expected|: relative error on the tensor's own scale
    (element-wise relative error means nothing where a gradient entry is close to zero)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    scale = float(expected.detach().abs().max())
    error = float((actual.detach() - expected.detach()).abs().max())
    assert error <= rel * scale, f"{name}: max error {error:.3g} > {rel} x scale {scale:.3g}"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fast_scans_match_reference_float32(backend):
    inputs = scan_inputs(70, dtype=torch.float32, seed=3)
    opts = OPTIONS[1]
    y_ref, g_ref = run_scan(inputs, backend="reference", **opts)
    y_chk, g_chk = run_scan(inputs, backend=backend, chunk_size=16, **opts)
    assert y_chk.dtype == torch.float32
    assert_within(y_chk, y_ref, 1e-4)
    for name in g_ref:
        assert_within(g_chk[name], g_ref[name], 1e-4, name)


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: "-".join(k for k, v in o.items() if v) or "bare"
)
def test_fast_scans_match_reference_on_a_long_sequence_float32(options):
    # 2,053 = 16 * 128 + 5 steps: many chunks of either backend's default size, the last ragged.
    inputs = scan_inputs(2_053, dtype=torch.float32, seed=5)
    with torch.no_grad():  # delta + bias >= 0 without softplus: no state growing over 2,000 steps
        inputs["delta_bias"].abs_()
    y_ref, g_ref = run_scan(inputs, backend="reference", chunk_size=None, **options)
    for backend in FAST_BACKENDS:
        y_chk, g_chk = run_scan(inputs, backend=backend, chunk_size=None, **options)
        assert_within(y_chk, y_ref, 1e-4, f"{backend} y")
        assert g_chk.keys() == g_ref.keys()
        for name in g_ref:
            assert_within(g_chk[name], g_ref[name], 1e-4, f"{backend} d{name}")


def saved_tensors(fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn()'s result and every tensor its autograd graph saved for the backward pass."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_sequential_scan_saves_inputs_and_chunk_states_not_every_state():
    b, d, n, length, chunk = 1, 32, 16, 4_096, 128
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(b, d, length, generator=g) for _ in range(3))
    B, C = (torch.randn(b, n, length, generator=g) for _ in range(2))
    A, D, bias = -torch.rand(d, n, generator=g), torch.randn(d, generator=g), torch.randn(d)
    args = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]

    y, saved = saved_tensors(
        lambda: selective_scan(*args, delta_softplus=True, backend="sequential", chunk_size=chunk)
    )
    total = sum(t.numel() for t in saved)
    # u, delta, z; B, C; one state per chunk; A, D, delta_bias
    expected = (
        3 * b * d * length + 2 * b * n * length + (length // chunk) * b * d * n + d * n + 2 * d
    )
    assert 0 < total <= expected
    assert total < 0.3 * b * length * d * n  # all states would be length * d * n
    y.sum().backward()
    assert all(t.grad is not None for t in args)


@pytest.mark.parametrize("layout", ["contiguous", "transposed-views"])
def test_sequential_scan_saves_its_inputs_as_given_without_layout_copies(layout):
    # A Mamba block hands the scan (b, c, L) views of (b, L, c) tensors; the benchmark contiguous
    # (b, c, L) ones. Either way the graph keeps the inputs themselves, plus the chunk states.
    length = 300
    inputs = scan_inputs(length, dtype=torch.float32, seed=2)
    if layout == "transposed-views":
        inputs = {
            k: v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
            if v.dim() == 3
            else v
            for k, v in inputs.items()
        }
    y, grads = run_scan(inputs, backend="sequential", **OPTIONS[1])
    y_ref, g_ref = run_scan(inputs, backend="reference", **OPTIONS[1])
    assert_within(y, y_ref, 1e-4)
    for name in g_ref:
        assert_within(grads[name], g_ref[name], 1e-4, name)
    _, saved = saved_tensors(
        lambda: selective_scan(*inputs.values(), delta_softplus=True, backend="sequential")
    )
    input_storages = {v.untyped_storage().data_ptr() for v in inputs.values()}
    copies = [t for t in saved if t.untyped_storage().data_ptr() not in input_storages]
    assert [tuple(t.shape) for t in copies] == [(3, 2, 4, 3)]  # (chunks, b, d_state, d_inner)


def test_chunk_size_does_not_change_the_result():
    inputs = scan_inputs(37, dtype=torch.float64)
    outs = [run_scan(inputs, backend="chunked", chunk_size=c, **OPTIONS[1])[0] for c in (1, 8, 64)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-10, atol=1e-12)


def test_scan_of_two_steps_equals_the_recurrence_by_hand():
    u = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)  # b=1, d=1, L=2
    delta = torch.tensor([[[0.5, 0.25]]], dtype=torch.float64)
    A = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)  # n=2
    B = torch.tensor([[[1.0, 3.0], [2.0, -1.0]]], dtype=torch.float64)  # (b, n, L)
    C = torch.tensor([[[1.0, 1.0], [0.5, 2.0]]], dtype=torch.float64)
    h1 = [0.5 * 1.0 * 1.0, 0.5 * 2.0 * 1.0]  # delta_0 * B_0 * u_0
    y0 = 1.0 * h1[0] + 0.5 * h1[1]
    h2 = [math.exp(-0.25) * h1[0] + 0.25 * 3.0 * 2.0, math.exp(-0.5) * h1[1] + 0.25 * -1.0 * 2.0]
    y1 = 1.0 * h2[0] + 2.0 * h2[1]
    for backend in ("reference", "sequential", "chunked"):
        y = selective_scan(u, delta, A, B, C, backend=backend)
        torch.testing.assert_close(y, torch.tensor([[[y0, y1]]], dtype=torch.float64))


def test_unknown_backend_is_rejected_by_name():
    inputs = scan_inputs(4, dtype=torch.float32)
    with pytest.raises(ValueError, match="'fancy'"):
        selective_scan(*(inputs[k] for k in ("u", "delta", "A", "B", "C")), backend="fancy")
    with pytest.raises(ValueError, match="'fancy'"):
        Mamba(8, scan_backend="fancy")


def test_auto_backend_is_sequential_on_cpu_and_cuda_backend_needs_a_gpu():
    assert resolve_scan_backend("auto", device=torch.device("cpu")) == "sequential"
    with pytest.raises(ValueError, match="cuda"):
        resolve_scan_backend("cuda", device=torch.device("cpu"))


# mamba_ssm.Mamba(d_model=16, d_state=8, d_conv=4, expand=2): d_inner 32, dt_rank ceil(16/16) = 1
EXPECTED_MAMBA_PARAMETERS = {
    "A_log": (32, 8),
    "D": (32,),
    "in_proj.weight": (64, 16),
    "conv1d.weight": (32, 1, 4),
    "conv1d.bias": (32,),
    "x_proj.weight": (17, 32),
    "dt_proj.weight": (32, 1),
    "dt_proj.bias": (32,),
    "out_proj.weight": (16, 32),
}


def test_mamba_has_mamba_ssm_parameter_names_and_shapes():
    model = Mamba(16, d_state=8, d_conv=4, expand=2)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes == EXPECTED_MAMBA_PARAMETERS
    assert {n for n, _ in model.named_parameters()} == set(EXPECTED_MAMBA_PARAMETERS)


def test_mamba_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    model = Mamba(16, d_state=8, dt_min=0.01, dt_max=0.05)
    torch.testing.assert_close(model.A_log, torch.log(torch.arange(1.0, 9.0)).repeat(32, 1))
    torch.testing.assert_close(model.D.detach(), torch.ones(32))
    dt = F.softplus(model.dt_proj.bias.detach())
    assert dt.min() >= 0.01 - 1e-6 and dt.max() <= 0.05 + 1e-6
    bound = model.dt_rank**-0.5
    assert model.dt_proj.weight.abs().max() <= bound
    constant = Mamba(16, dt_init="constant", dt_scale=2.0)
    torch.testing.assert_close(constant.dt_proj.weight.detach(), torch.full((32, 1), 2.0))
    with_bias = Mamba(16, bias=True, conv_bias=False)
    assert with_bias.in_proj.bias is not None and with_bias.conv1d.bias is None


def test_mamba_state_dict_round_trips():
    torch.manual_seed(0)
    source = Mamba(16, d_state=8)
    torch.manual_seed(1)
    target = Mamba(16, d_state=8)
    x = torch.randn(2, 10, 16)
    assert not torch.allclose(source(x), target(x))
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x), source(x))


def test_mamba_is_causal():
    torch.manual_seed(0)
    model = Mamba(16, d_state=8)
    x = torch.randn(2, 20, 16)
    x_changed = x.clone()
    x_changed[:, 9] += 1.0
    y, y_changed = model(x), model(x_changed)
    torch.testing.assert_close(y_changed[:, :9], y[:, :9], rtol=0, atol=0)
    assert (y_changed[:, 9:] - y[:, 9:]).abs().amax(dim=(0, 2)).min() > 0


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_mamba_reference_and_fast_backends_agree(backend):
    torch.manual_seed(0)
    model = Mamba(16, d_state=8, scan_backend="reference")
    x = torch.randn(2, 21, 16, requires_grad=True)
    y_ref = model(x)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    model.scan_backend = backend
    y_chk = model(x)
    (g_chk,) = torch.autograd.grad(y_chk.square().sum(), x)
    torch.testing.assert_close(y_chk, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_chk, g_ref, rtol=1e-4, atol=1e-4)


def test_bimamba_is_not_causal():
    torch.manual_seed(0)
    model = BiMamba(16, d_state=8)
    assert isinstance(model.fwd, Mamba) and isinstance(model.bwd, Mamba)
    x = torch.randn(1, 12, 16)
    x_changed = x.clone()
    x_changed[:, 8] += 1.0
    assert not torch.allclose(model(x_changed)[:, :8], model(x)[:, :8])


def test_reverse_valid_reverses_only_the_real_tokens():
    x = torch.arange(10).view(2, 5, 1)
    mask = torch.tensor([[False, False, False, True, True], [False] * 5])
    out = reverse_valid(x, mask).squeeze(-1)
    assert out.tolist() == [[2, 1, 0, 3, 4], [9, 8, 7, 6, 5]]
    torch.testing.assert_close(reverse_valid(reverse_valid(x, mask), mask), x)


@pytest.mark.parametrize("length", [1, 3, 4, 19])
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv_on_sequence_major_input_equals_conv1d(length, bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3, bias=bias).double()
    xz = torch.randn(2, length, 12, dtype=torch.float64, requires_grad=True)
    x = xz[..., :6]  # a strided view, as Mamba's half of in_proj's output
    expected = conv(x.transpose(1, 2))[..., :length].transpose(1, 2)
    actual = _CausalDepthwiseConv.apply(x, conv.weight, conv.bias)
    torch.testing.assert_close(actual, expected)
    params = [xz, conv.weight] + ([conv.bias] if bias else [])
    weight = torch.randn(actual.shape, dtype=torch.float64)
    for got, want in zip(
        torch.autograd.grad((actual * weight).sum(), params),
        torch.autograd.grad((expected * weight).sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(got, want)


def test_reverse_valid_gradient_is_the_same_reversal():
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, False, False, True, True], [False] * 5])
    assert torch.autograd.gradcheck(lambda t: reverse_valid(t, mask), (x,))
    assert torch.autograd.gradcheck(lambda t: reverse_valid(t, None), (x,))


def test_bimamba_with_padding_mask_ignores_trailing_pads():
    torch.manual_seed(0)
    model = BiMamba(16, d_state=8)
    x = torch.randn(1, 6, 16)
    padded = torch.cat([x, torch.randn(1, 4, 16)], dim=1)
    mask = torch.tensor([[False] * 6 + [True] * 4])
    torch.testing.assert_close(
        model(padded, padding_mask=mask)[:, :6], model(x), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="trailing"):
        model(padded, padding_mask=mask.flip(1))


def test_recompute_gives_the_same_output_and_gradients_and_keeps_less():
    torch.manual_seed(0)
    model = BiMamba(16, d_state=8)
    x = torch.randn(2, 40, 16, requires_grad=True)
    mask = torch.tensor([[False] * 40, [False] * 31 + [True] * 9])

    def run():
        y = model(x, padding_mask=mask)
        grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
        return y, grads

    y_plain, grads_plain = run()
    _, saved_plain = saved_tensors(lambda: model(x, padding_mask=mask))
    for direction in (model.fwd, model.bwd):
        direction.recompute = True
    y_re, grads_re = run()
    _, saved_re = saved_tensors(lambda: model(x, padding_mask=mask))

    torch.testing.assert_close(y_re, y_plain, rtol=0, atol=0)
    for g_re, g_plain in zip(grads_re, grads_plain, strict=True):
        torch.testing.assert_close(g_re, g_plain, rtol=1e-6, atol=1e-7)

    def per_token(saved):  # numbers kept per token, each storage once
        kept = {t.untyped_storage().data_ptr(): t.numel() for t in saved if t.dim() >= 2}
        return sum(kept.values()) / x.shape[:2].numel()

    # recompute keeps the block input (each direction saves the same storage) and the mask
    assert per_token(saved_re) <= x.shape[-1] + 1
    assert per_token(saved_plain) > 5 * per_token(saved_re)
