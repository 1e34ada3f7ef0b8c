"""Invariants of the RealNVP flow: exact inverses, log-determinants equal to autograd's,
every pre-processing term counted, and a tiny flow that learns."""

import csv
import json
import math

import pytest
import torch

from dgm import RealNVP
from dgm.cli import main
from dgm.config import FlowConfig, from_dict
from dgm.data import load_split
from dgm.errors import DgmError
from dgm.maths import LOG_2PI, logit_transform
from dgm.models.flow import build_conv_flow, build_mlp_flow
from dgm.models.transforms import (
    ActNorm,
    AffineCoupling,
    MultiscaleTransform,
    Squeeze,
    Transform,
    checkerboard_mask,
)

DTYPES = [torch.float64, torch.float32]


def perturbed(t: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The module in ``dtype`` with every parameter moved off its (often identity) init."""
    t = t.to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=dtype))
    for m in t.modules():
        if isinstance(m, ActNorm):
            m.initialized.fill_(True)
    return t.eval()


LAYERS = {
    "actnorm": lambda: ActNorm(2),
    "squeeze": lambda: Squeeze(),
    "checkerboard-conv": lambda: AffineCoupling((2, 4, 4), "checkerboard", 0, "conv", 8, 1),
    "checkerboard-conv-odd": lambda: AffineCoupling((2, 4, 4), "checkerboard", 1, "conv", 8, 1),
    "channel-conv": lambda: AffineCoupling((2, 4, 4), "channel", 0, "conv", 8, 1),
    "channel-conv-odd": lambda: AffineCoupling((2, 4, 4), "channel", 1, "conv", 8, 2),
    "checkerboard-mlp": lambda: AffineCoupling((2, 4, 4), "checkerboard", 1, "mlp", 16, 2),
    "channel-mlp": lambda: AffineCoupling((2, 4, 4), "channel", 0, "mlp", 16, 1),
    "conv-flow-1-scale": lambda: build_conv_flow((2, 4, 4), 8, 1, 2, 1, True, 2.0),
    "conv-flow-2-scales": lambda: build_conv_flow((2, 4, 4), 8, 1, 1, 2, True, 2.0),
    "mlp-flow": lambda: build_mlp_flow((2, 4, 4), 16, 1, 2, True, 2.0),
}


def flat_jacobian_logdets(t: Transform, x: torch.Tensor) -> torch.Tensor:
    """log |det J| per example from autograd's Jacobian of the whole batch, (B,)."""
    def f(inp):
        return t(inp)[0].reshape(len(inp), -1)

    jac = torch.autograd.functional.jacobian(f, x)  # (B, D, B, C, H, W)
    b = len(x)
    jac = jac.reshape(b, -1, b, x[0].numel())
    return torch.stack([torch.linalg.slogdet(jac[i, :, i])[1] for i in range(b)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", LAYERS)
def test_layer_inverse_and_logdet(layer, dtype):
    t = perturbed(LAYERS[layer](), dtype)
    x = torch.randn(2, 2, 4, 4, dtype=dtype)
    y, ld = t(x)
    x_back, ld_inv = t.inverse(y)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert ld.shape == (2,) and torch.isfinite(y).all()
    torch.testing.assert_close(x_back.reshape(x.shape), x, atol=tol, rtol=tol)
    torch.testing.assert_close(ld_inv, -ld, atol=tol, rtol=tol)
    torch.testing.assert_close(ld, flat_jacobian_logdets(t, x), atol=100 * tol, rtol=100 * tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_realnvp_inverse_and_logdet(arch, dtype):
    model = perturbed(RealNVP(arch, (1, 4, 4), hidden_dim=8, num_blocks=1, num_couplings=2,
                              num_scales=1), dtype)
    x = RealNVP.prepare(torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)).to(dtype)
    z, ld = model(x)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(model.inverse(z)[0], x, atol=tol, rtol=tol)
    torch.testing.assert_close(model.inverse(z)[1], -ld, atol=100 * tol, rtol=100 * tol)
    torch.testing.assert_close(ld, flat_jacobian_logdets(model, x), atol=100 * tol,
                               rtol=100 * tol)


def test_multiscale_latent_is_flat_and_complete():
    t = build_conv_flow((1, 28, 28), 4, 1, 1, 2, True, 2.0)
    assert isinstance(t, MultiscaleTransform)
    assert t.out_shapes == [(4, 14, 14), (8, 7, 7), (4, 7, 7)]
    z, _ = t.eval()(torch.randn(3, 1, 28, 28))
    assert z.shape == (3, 784)


def test_checkerboard_mask():
    m = checkerboard_mask(3, 4, 0)[0, 0]
    assert m[0, 0] == 1 and m[0, 1] == 0 and m[1, 0] == 0 and m.sum() == 6
    assert torch.equal(checkerboard_mask(3, 4, 1)[0, 0], 1 - m)


def test_actnorm_initialises_from_its_first_training_batch():
    """Zero mean and unit standard deviation per channel on that batch, then fixed; on a
    non-square image the log-det counts every pixel (H * W per channel)."""
    gen = torch.Generator().manual_seed(0)
    x = 3 + 2 * torch.randn(64, 3, 2, 5, generator=gen, dtype=torch.float64)
    layer = ActNorm(3).double()
    assert not layer.initialized
    y, ld = layer.train()(x)
    assert layer.initialized
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(3, dtype=torch.float64),
                               atol=1e-5, rtol=0)  # std / (std + 1e-6)
    torch.testing.assert_close(ld[:2], flat_jacobian_logdets(layer, x[:2]))
    torch.testing.assert_close(layer(x + 1)[0], y + torch.exp(layer.log_scale))  # now fixed
    assert not ActNorm(3).eval()(x.float())[0].ne(x.float()).any()  # eval: no init


def test_coupling_defaults_and_its_mask_is_not_saved():
    """The documented defaults; the mask is rebuilt from the shape, not read from (or
    expected in) a checkpoint."""
    c = AffineCoupling((2, 4, 4))
    ref = AffineCoupling((2, 4, 4), "checkerboard", 0, "conv", 32, 1, 2.0)
    assert [p.shape for p in c.parameters()] == [p.shape for p in ref.parameters()]
    assert torch.equal(c.mask, ref.mask) and torch.equal(c.mask, checkerboard_mask(4, 4, 0))
    assert c.scale_clamp == 2.0
    assert not any("mask" in k for k in c.state_dict())
    assert checkerboard_mask(2, 2)[0, 0, 0, 0] == 1  # default parity 0


class Identity(Transform):
    def forward(self, x):
        return x.flatten(1), x.new_zeros(len(x))

    def inverse(self, y):
        return y.view(len(y), 1, 28, 28), y.new_zeros(len(y))


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_preprocessing_terms_are_counted(alpha):
    model = RealNVP(hidden_dim=4, num_blocks=1, num_couplings=1, alpha=alpha).double()
    model.flow = Identity()
    x_uint8 = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    x = RealNVP.prepare(x_uint8, torch.Generator().manual_seed(0)).double()
    assert ((x * 256).floor() == x_uint8).all()  # (x + u) / 256 with u in [0, 1)
    # By hand: N(logit(s); 0, 1), d logit(s)/dx = (1 - 2 alpha) / (s (1 - s)), and the
    # 1/256 scaling of the 0..256 intensities to [0, 1).
    s = alpha + (1 - 2 * alpha) * x
    y = torch.log(s / (1 - s))
    by_hand = (-0.5 * (y**2 + LOG_2PI)
               + math.log(1 - 2 * alpha) - torch.log(s) - torch.log(1 - s)
               - math.log(256)).flatten(1).sum(1)
    torch.testing.assert_close(model.log_prob(x), by_hand, rtol=1e-12, atol=1e-9)


def test_logit_logdet_matches_autograd():
    x = torch.rand(1, 1, 2, 3, dtype=torch.float64)
    y, ld = logit_transform(x, 0.05)
    jac = torch.autograd.functional.jacobian(lambda v: logit_transform(v, 0.05)[0], x)
    torch.testing.assert_close(ld, torch.linalg.slogdet(jac.reshape(6, 6))[1].view(1))


def tiny_flow(**kw) -> RealNVP:
    return RealNVP(hidden_dim=8, num_blocks=1, num_couplings=1, **kw)


def test_train_and_eval_agree_after_actnorm_init():
    model = tiny_flow()
    x = RealNVP.prepare(torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8))
    first = model.train().log_prob(x)  # initialises every ActNorm from this batch
    assert all(m.initialized for m in model.modules() if isinstance(m, ActNorm))
    torch.testing.assert_close(model.train().log_prob(x), first)
    torch.testing.assert_close(model.eval().log_prob(x), first)
    # The init state travels with the weights: a loaded model does not re-initialise.
    other = tiny_flow()
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other.train().log_prob(x[:4]), first[:4])


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_every_parameter_gets_a_gradient(arch):
    model = perturbed(RealNVP(arch, hidden_dim=8, num_blocks=1, num_couplings=1), torch.float32)
    x = RealNVP.prepare(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8))
    model.train().bits_per_dim(x).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_the_flow_compiles_to_one_graph_without_breaks():
    """--compile must compile the flow, not fall back to eager code: a graph break at each
    ActNorm (reading its buffer) made dynamo recompile per layer until it gave up."""
    flow = RealNVP(hidden_dim=4, num_blocks=1, num_couplings=1)
    x = RealNVP.prepare(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8))
    flow.initialize(x)
    flow.train()
    explained = torch._dynamo.explain(flow.flow)(torch.logit(x.clamp(0.01, 0.99)))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_sample_and_generate():
    model = tiny_flow(temperature=0.5).eval()
    imgs = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (5, 1, 28, 28) and imgs.min() >= 0 and imgs.max() <= 1
    again = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(imgs, again)
    assert model.generate(torch.zeros(2, *model.latent_shape)).shape == (2, 1, 28, 28)


def _couplings(level) -> list:
    return [t for t in level.transforms if isinstance(t, AffineCoupling)]


def test_conv_flow_alternates_masks_and_ends_with_one_more_checkerboard():
    """Per scale: num_couplings checkerboard couplings, a squeeze, num_couplings channel
    couplings, parities 0, 1, 0, ... (a wrong parity leaves half the pixels untouched);
    the last level has num_couplings + 1 checkerboards, as in RealNVP."""
    t = build_conv_flow((1, 8, 8), 4, 1, 3, 1, False, 2.0)
    first, last = t.levels
    assert [(c.mask_type, c.parity) for c in _couplings(first)] == \
        [("checkerboard", 0), ("checkerboard", 1), ("checkerboard", 0),
         ("channel", 0), ("channel", 1), ("channel", 0)]
    assert isinstance(first.transforms[3], Squeeze)
    assert [(c.mask_type, c.parity) for c in _couplings(last)] == \
        [("checkerboard", p) for p in (0, 1, 0, 1)]
    mlp = build_mlp_flow((1, 4, 4), 8, 1, 2, True, 2.0)
    assert [c.parity for c in _couplings(mlp.levels[0])] == [0, 1, 0, 1]
    assert sum(isinstance(m, ActNorm) for m in mlp.modules()) == 4


def test_conv_flow_refuses_a_squeeze_of_an_odd_side():
    with pytest.raises(ValueError, match="cannot squeeze 4x3"):
        build_conv_flow((1, 8, 6), 4, 1, 1, 2, True, 2.0)  # 8x6 -> 4x3 -> odd width


def test_the_documented_defaults():
    """The widths that --help states (32 channels for conv, the report's 1024 units for
    mlp), one default set whether built directly or from FlowConfig, 28x28 grey images."""
    direct, from_cfg = RealNVP(), RealNVP.from_config(FlowConfig())
    assert from_cfg.image_shape == (1, 28, 28)
    assert [p.shape for p in direct.parameters()] == [p.shape for p in from_cfg.parameters()]
    for m in (direct, from_cfg):
        assert (m.alpha, m.temperature) == (1e-6, 1.0)
        couplings = [c for c in m.modules() if isinstance(c, AffineCoupling)]
        assert len(couplings) == 2 * (3 + 3) + 4 and {c.scale_clamp for c in couplings} == {2.0}
    def width(model):  # of the first coupling's first layer
        net = next(m for m in model.modules() if isinstance(m, AffineCoupling)).net
        return next(p.shape[0] for p in net.parameters() if p.dim() > 1)
    widths = {arch: width(RealNVP(arch)) for arch in ("conv", "mlp")}
    assert widths == {"conv": 32, "mlp": 1024}


@pytest.mark.parametrize("shape, scales, fits", [((1, 6, 4), 2, 1), ((1, 4, 6), 2, 1),
                                                 ((1, 8, 5), 2, 0), ((1, 6, 3), 1, 0),
                                                 ((1, 12, 8), 2, None), ((1, 5, 7), 0, None)])
def test_from_config_names_the_scales_that_fit(shape, scales, fits):
    """--num-scales n needs sides divisible by 2^n; the error names the most scales that
    fit, and the mlp arch has no squeezes to fit."""
    assert RealNVP.from_config(FlowConfig(arch="mlp", num_scales=scales, hidden_dim=4),
                               shape).image_shape == shape
    cfg = FlowConfig(num_scales=scales, hidden_dim=4)
    if fits is None:
        assert RealNVP.from_config(cfg, shape).image_shape == shape
        return
    with pytest.raises(DgmError, match=f"divisible by {2**scales},.* are {shape[1]}x{shape[2]}; "
                                       f"use --num-scales {fits} or --arch mlp"):
        RealNVP.from_config(cfg, shape)


def test_bits_per_dim_and_sampling_follow_their_formulas():
    """bits/dim = -log p / (D ln 2); a sample is generate(temperature * z) for the
    generator's z; generate clamps to [0, 1] where the logit's inverse overshoots."""
    model = tiny_flow(temperature=0.5).eval()
    x = RealNVP.prepare(torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8))
    torch.testing.assert_close(model.bits_per_dim(x),
                               -model.log_prob(x) / (784 * math.log(2)))
    z = torch.randn(4, 784, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.sample(4, generator=torch.Generator().manual_seed(1)),
                               model.generate(0.5 * z))
    far = torch.full((2, 784), 80.0) * torch.tensor([[1.0], [-1.0]])
    raw = model.inverse(far)[0]
    assert raw.max() > 1 and raw.min() < 0  # the overshoot the clamp is for
    x = model.generate(far)
    assert x.min() == 0 and x.max() == 1


def test_variational_log_prob_is_the_bound_it_documents():
    """log p(x + u/256) - log q(u | x) with u from q at the 8-bit image under x, computed by
    hand; an image at exactly 1.0 (pixel 255) stays in the flow's domain."""
    model = tiny_flow(dequantization="variational").eval()
    pixels = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    pixels[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    x = RealNVP.prepare(pixels)
    torch.manual_seed(3)
    got = model.log_prob(x)
    torch.manual_seed(3)
    base = pixels.float() / 256
    u, log_q = model.dequantizer(base)
    z, logabsdet = model(base + u / 256)
    want = (-0.5 * (z ** 2 + LOG_2PI).sum(1) + logabsdet - 784 * math.log(256) - log_q)
    torch.testing.assert_close(got, want)
    assert torch.isfinite(model.log_prob(torch.ones(2, 1, 28, 28))).all()


def test_learning_rate_warms_up_linearly_from_the_first_step():
    """lr_k = lr * min(1, k / warmup) at step k = 1, 2, ...; the count is in the optimiser's
    state, so a resumed run carries on from it."""
    model = tiny_flow()
    opts = model.configure_optimizers(FlowConfig(lr=1e-3, warmup_steps=4))
    x = RealNVP.prepare(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8))
    model.initialize(x)
    lrs = []
    for _ in range(6):
        model.training_step(x, opts)
        lrs.append(opts["adam"].param_groups[0]["lr"])
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert opts["adam"].state_dict()["param_groups"][0]["num_steps"] == 6


def test_gradient_clipping_bounds_the_step():
    """--grad-clip c rescales the gradient to norm c where it is larger: one SGD step at
    lr 1 moves the weights by c along minus the bits/dim gradient (planted bug: clipping
    skipped)."""
    import copy

    model = tiny_flow().double()  # so that the tiny step is not lost to rounding
    x = RealNVP.prepare(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(0))).double()
    model.initialize(x)
    model.configure_optimizers(FlowConfig(grad_clip=1e-3, warmup_steps=0))
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    opt.param_groups[0]["num_steps"] = 0
    torch.manual_seed(1)
    out = model.training_step(x, {"adam": opt})
    torch.manual_seed(1)
    bpd = twin.bits_per_dim(x).mean()
    bpd.backward()
    torch.testing.assert_close(out["train_bpd"], bpd.detach())  # before the step
    grad = torch.cat([q.grad.flatten() for q in twin.parameters()])
    step = torch.cat([(p - q).detach().flatten()
                      for p, q in zip(model.parameters(), twin.parameters(), strict=True)])
    assert grad.norm() > 1e-2  # so the clip bites
    # clip_grad_norm_ divides by the norm plus 1e-6
    torch.testing.assert_close(step, -1e-3 * grad / (grad.norm() + 1e-6), rtol=1e-6,
                               atol=1e-12)


def test_tiny_flow_learns_on_real_images(real_data_dir):
    torch.manual_seed(0)
    x, _ = load_split("mnist", "test[:576]", str(real_data_dir))
    gen = torch.Generator().manual_seed(0)
    val = RealNVP.prepare(x[512:], gen)
    model = tiny_flow()
    opts = model.configure_optimizers(_Cfg())
    model.train().log_prob(val)  # ActNorm init, as the first training batch would
    before = model.eval().validation_step(val)["val_bpd"].item()
    for _ in range(4):
        for i in range(0, 512, 64):
            model.train().training_step(RealNVP.prepare(x[i:i + 64], gen), opts)
    after = model.eval().validation_step(val)["val_bpd"].item()
    assert after < before - 1.0, (before, after)


class _Cfg:
    lr, grad_clip, warmup_steps = 3e-3, 100.0, 5


def test_cli_train_evaluate_sample_resume(fake_data_dir, tmp_path, capsys):
    """Planted bugs it catches: the optimiser's state not restored on resume (the resumed
    weights differ from an uninterrupted run's), and evaluate_flow's bits/dim over the wrong
    number of dimensions (the former ``0 < bpd < 8`` let a factor 2 through)."""
    run = tmp_path / "run"
    common = ["--data-dir", str(fake_data_dir), "--offline", "--quiet"]
    args = ["train", "flow", "--out", str(run), "--train-split", "train[:192]",
            "--val-split", "test[:64]", "--test-split", "test[64:]", "--epochs", "1",
            "--batch-size", "64", "--hidden-dim", "8", "--num-blocks", "1",
            "--num-couplings", "1", "--sample-epochs", "0,1", "--num-samples", "4", *common]
    assert main(args) == 0
    assert main(["train", "flow", "--resume", str(run), "--epochs", "2", *common]) == 0
    whole = tmp_path / "whole"
    assert main([*args[:3], str(whole), *args[4:11], "2", *args[12:]]) == 0
    a, b = (torch.load(r / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
            for r in (run, whole))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["train_bpd"])) and math.isfinite(float(r["val_bpd"]))
               for r in rows)
    assert (run / "curves.png").is_file()
    for epoch in (0, 1, 2):
        assert (run / "samples" / f"epoch_{epoch:03d}.png").is_file()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", *common]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["n_images"] == 64
    # By hand: the best checkpoint's weights on the test images dequantised with the
    # evaluation's seed, u ~ U[0, 1) per pixel.
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    model = RealNVP.from_config(from_dict("flow", ckpt["config"]), (1, 28, 28))
    model.load_state_dict(ckpt["state_dict"])
    x, _ = load_split("mnist", "test[64:]", str(fake_data_dir), offline=True)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        log_px = model.eval().log_prob((x.float() + u) / 256).double().mean().item()
    assert results["log_px"]["log_px_nats"] == pytest.approx(log_px, rel=1e-6)
    assert results["log_px"]["bits_per_dim"] == pytest.approx(-log_px / (784 * math.log(2)),
                                                              rel=1e-6)
    assert list(json.loads((run / "evaluation.json").read_text()).values()) == [results]
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "-n", "4", "--out", str(out), *common]) == 0
    assert out.is_file()
    out = tmp_path / "i.png"
    assert main(["interpolate", str(run), "--rows", "2", "--steps", "3", "--method", "slerp",
                 "--out", str(out), *common]) == 0
    assert out.is_file()


def test_dequantisation_bounds_against_the_exact_discrete_likelihood():
    """A two-pixel flow whose discrete P(x) = integral of p_256 over the pixel's unit cell
    is computed by quadrature: the one-draw and importance-weighted bounds stay below
    it on average and the latter rises to it as the number of draws K grows."""
    from dgm.evaluate import EVAL_SEED, evaluate_flow

    torch.manual_seed(0)
    model = perturbed(RealNVP("mlp", (1, 1, 2), hidden_dim=8, num_couplings=2),
                      torch.float64)
    x = torch.tensor([[[[3, 250]]], [[[128, 7]]]], dtype=torch.uint8)  # (2, 1, 1, 2)
    g = 200  # midpoints per pixel: the density is smooth within a cell
    u = (torch.arange(g, dtype=torch.float64) + 0.5) / g
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).view(-1, 1, 1, 2)
    exact = torch.stack([torch.logsumexp(model.log_prob((xi.double() + grid) / 256), 0)
                         - math.log(len(grid)) for xi in x])
    # The bound at each K, averaged over many independent evaluations.
    means = {}
    for k in (1, 4, 64):
        runs = []
        for rep in range(100 if k < 64 else 20):
            with torch.random.fork_rng():
                draws = torch.stack([model.log_prob(model.prepare(
                    x, torch.Generator().manual_seed(1000 * rep + i)).double())
                    for i in range(k)])
            runs.append(torch.logsumexp(draws, 0) - math.log(k))
        means[k] = torch.stack(runs).mean(0)
    for k in (1, 4, 64):  # 1e-3: the quadrature's and the averages' own error
        assert (means[k] <= exact + 1e-3).all(), (k, means[k], exact)
    # The first image sits near both ends of the intensity range, where the logit makes the
    # density vary across the cell, so the bounds there are visibly apart.
    assert means[1][0] < means[4][0] - 0.05 < means[64][0] - 0.1
    assert exact[0] - means[64][0] < exact[0] - means[1][0] - 0.2
    # dgm evaluate's numbers are the same estimators.
    res = evaluate_flow(model, x, dequant_samples=8)
    assert res["log_px"]["log_px_nats"] < res["log_px_iw"]["log_px_nats"]
    assert res["log_px_iw"]["log_px_nats"] <= exact.mean().item() + 0.01
    # ... replayed: the first draw alone, then log-mean-exp over the 8 draws of EVAL_SEED's
    # stream, with standard errors over images in nats and bits/dim (planted bugs: a plain
    # mean of the draws, which also sits between one draw and the exact value; the bits/dim
    # error's sign flipped).
    gen = torch.Generator().manual_seed(EVAL_SEED)
    draws = torch.stack([model.log_prob(model.prepare(x, gen)) for _ in range(8)]).double()
    for key, per_image in (("log_px", draws[0]),
                           ("log_px_iw", torch.logsumexp(draws, 0) - math.log(8))):
        got = res[key]
        assert got["log_px_nats"] == pytest.approx(per_image.mean().item(), rel=1e-9)
        sem = per_image.std().item() / math.sqrt(2)
        assert got["sem_nats"] == pytest.approx(sem, rel=1e-9)
        assert got["bits_per_dim_sem"] == pytest.approx(sem / (2 * math.log(2)), rel=1e-9)


def test_conditional_coupling_inverse_and_logdet():
    torch.manual_seed(0)
    t = perturbed(AffineCoupling((1, 2, 2), "checkerboard", 1, "conv", 8, 1,
                                 context_channels=3), torch.float64)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    context = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    y, ld = t(x, context)
    back, ld_inv = t.inverse(y, context)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(ld_inv, -ld)
    torch.testing.assert_close(ld, flat_jacobian_logdets(lambda v: t(v, context), x))
    assert not torch.allclose(t(x, context + 1)[0], y)  # the context matters


def _unit_square(g: int = 300) -> torch.Tensor:
    u = (torch.arange(g, dtype=torch.float64) + 0.5) / g
    return torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).view(-1, 1, 1, 2)


def test_variational_dequantizer_is_a_density_on_the_unit_cube():
    from dgm.models.dequantization import VariationalDequantizer

    torch.manual_seed(0)
    q = perturbed(VariationalDequantizer((1, 1, 2), hidden_dim=8), torch.float64)
    grid = _unit_square()
    for pixels in ([3, 250], [128, 7]):
        x = torch.tensor(pixels, dtype=torch.float64).view(1, 1, 1, 2).expand(len(grid), -1,
                                                                               -1, -1) / 256
        log_q = q.log_prob(grid, x)
        assert abs(torch.logsumexp(log_q, 0).item() - math.log(len(grid))) < 0.01  # integral 1
        u, log_q_draw = q(x[:500])
        torch.testing.assert_close(q.log_prob(u, x[:500]), log_q_draw)
        assert ((u > 0) & (u < 1)).all()


def test_variational_bound_stays_below_the_exact_discrete_likelihood():
    torch.manual_seed(0)
    model = perturbed(RealNVP("mlp", (1, 1, 2), hidden_dim=8, num_couplings=2,
                              dequantization="variational"), torch.float64)
    x = torch.tensor([[[[3, 250]]], [[[128, 7]]]], dtype=torch.uint8)
    grid = _unit_square(200)
    flow_only = RealNVP("mlp", (1, 1, 2), hidden_dim=8, num_couplings=2).double()
    flow_only.flow.load_state_dict(model.flow.state_dict())
    flow_only.eval()
    exact = torch.stack([torch.logsumexp(flow_only.log_prob((xi.double() + grid) / 256), 0)
                         - math.log(len(grid)) for xi in x])
    with torch.no_grad():
        draws = torch.stack([model.log_prob(RealNVP.prepare(x).double()) for _ in range(4000)])
    # Averages over many draws of the one-draw bound and of the K = 16 bound stay below
    # log P(x) and rise with K; all 4000 draws together estimate P(x) itself (the weights
    # p / q are unbiased for it), which checks that log q is q's true density.
    one_draw = draws.mean(0)
    iw16 = (torch.logsumexp(draws.view(250, 16, 2), 1) - math.log(16)).mean(0)
    assert (one_draw < iw16).all() and (iw16 <= exact + 1e-3).all(), (one_draw, iw16, exact)
    all_draws = torch.logsumexp(draws, 0) - math.log(len(draws))
    assert (exact - all_draws).abs().max() < 0.1, (all_draws, exact)


def test_variational_flow_gives_every_parameter_a_gradient():
    model = perturbed(RealNVP("conv", (1, 4, 4), hidden_dim=8, num_couplings=1, num_scales=1,
                              dequantization="variational"), torch.float32).train()
    x = RealNVP.prepare(torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8))
    model.bits_per_dim(x).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing
    assert any(n.startswith("dequantizer.") for n, _ in model.named_parameters())
