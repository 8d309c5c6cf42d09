import math

import pytest
import torch

from clt.export import folded_weights
from clt.loss import clt_loss, fraction_of_variance_unexplained
from clt.model import CLTConfig, CrossLayerTranscoder, JumpReLU, batch_topk_activation, topk_activation


@pytest.fixture(autouse=True)
def float64_default():
    """Exact comparisons in float64, restored afterwards so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_clt(**overrides) -> CrossLayerTranscoder:
    config = CLTConfig(**{"n_layers": 3, "d_model": 5, "n_features": 7, **overrides})
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(config).double()
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.3)
        clt.log_threshold.copy_(torch.log(torch.rand_like(clt.log_threshold) * 0.2 + 0.05))
        for w in clt.W_dec:
            w.normal_(0, 0.5)
        clt.b_dec.normal_(0, 0.1)
    return clt


def test_jumprelu_forward_and_z_gradient_match_finite_differences():
    torch.manual_seed(1)
    z = torch.randn(4, 6)
    theta = torch.full((6,), 0.25)
    z = torch.where((z - theta).abs() < 0.05, z + 0.2, z).requires_grad_(True)  # keep away from the jump
    out = JumpReLU.apply(z, theta, 0.1)
    assert torch.equal(out, z * (z > theta))
    assert torch.autograd.gradcheck(lambda v: JumpReLU.apply(v, theta, 0.1), (z,), eps=1e-6, atol=1e-8)


def test_jumprelu_threshold_gradient_is_the_ste_formula():
    z = torch.tensor([[0.10, 0.30, 0.52, 0.90], [0.44, 0.56, 0.20, 0.51]])
    theta = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    eps = 0.2
    grad_out = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    JumpReLU.apply(z, theta, eps).backward(grad_out)
    in_window = ((z - 0.5).abs() < eps / 2).double()  # |z − θ| < ε/2
    expected = (-(0.5 / eps) * in_window * grad_out).sum(0)
    assert torch.allclose(theta.grad, expected)
    assert theta.grad.tolist() == pytest.approx(
        [-(0.5 / 0.2) * 5, -(0.5 / 0.2) * 6, -(0.5 / 0.2) * 3, -(0.5 / 0.2) * 8]
    )


def test_decode_is_the_sum_over_source_layers():
    clt = make_clt()
    acts = torch.relu(torch.randn(2, 3, 7))
    y = clt.decode(acts, sparse=False)
    for k in range(3):
        expected = clt.b_dec[k] + sum(acts[:, l] @ clt.W_dec[l][:, k - l] for l in range(k + 1))
        assert torch.allclose(y[:, k], expected)


def decode_grads(clt, x, sparse):
    clt.zero_grad()
    y, _, _ = clt(x, sparse=sparse)
    y.pow(2).sum().backward()
    threshold_grad = None if clt.log_threshold.grad is None else clt.log_threshold.grad.clone()
    return y.detach(), [w.grad.clone() for w in clt.W_dec], clt.W_enc.grad.clone(), threshold_grad


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_sparse_and_dense_decoding(activation):
    clt = make_clt(activation=activation, k=2, bandwidth=2.0)
    x = torch.randn(6, 3, 5)
    sparse, dense = decode_grads(clt, x, True), decode_grads(clt, x, False)
    assert torch.allclose(sparse[0], dense[0])
    for a, b in zip(sparse[1], dense[1]):
        assert torch.allclose(a, b)
    assert torch.allclose(sparse[2], dense[2])
    if activation == "jumprelu":
        # No gradient reaches inactive entries through the sparse product, so the straight-through
        # threshold gradient differs: why `auto` never picks the sparse path for JumpReLU.
        assert not torch.allclose(sparse[3], dense[3])


def test_clt_and_plt_shapes():
    clt, plt = make_clt(), make_clt(cross_layer=False)
    assert [tuple(w.shape) for w in clt.W_dec] == [(7, 3, 5), (7, 2, 5), (7, 1, 5)]
    assert [tuple(w.shape) for w in plt.W_dec] == [(7, 1, 5)] * 3
    acts = torch.relu(torch.randn(2, 3, 7))
    y = plt.decode(acts)
    for k in range(3):
        assert torch.allclose(y[:, k], plt.b_dec[k] + acts[:, k] @ plt.W_dec[k][:, 0])


@pytest.mark.parametrize("activation", ["jumprelu", "topk", "relu"])
def test_per_layer_encode_decode_match_the_batched_forward(activation):
    clt = make_clt(skip=True, activation=activation, k=3)
    with torch.no_grad():
        clt.W_skip.normal_(0, 0.1)
    x = torch.randn(4, 3, 5)
    y, acts, _ = clt(x)
    layer_acts = [clt.encode_layer(x[:, l], l) for l in range(3)]
    for l in range(3):
        assert torch.allclose(layer_acts[l], acts[:, l])
        assert torch.allclose(clt.decode_layer(layer_acts, l, x[:, l]), y[:, l])


def test_loss_terms_against_hand_computation():
    clt = make_clt()
    x, y = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    lam, mu, c = 0.3, 0.01, 4.0
    terms = clt_loss(clt, x, y, lam, mu, c)
    pre = torch.einsum("bld,ldf->blf", x, clt.W_enc) + clt.b_enc
    theta = clt.log_threshold.exp()
    acts = pre * (pre > theta)
    y_hat = clt.decode(acts, sparse=False)
    norms = torch.stack([torch.sqrt((w**2).sum(dim=(1, 2))) for w in clt.W_dec])
    mse = sum(((y_hat[b] - y[b]) ** 2).sum() for b in range(4)) / 4
    sparsity = (
        sum(
            math.tanh(c * acts[b, l, i].item() * norms[l, i].item())
            for b in range(4)
            for l in range(3)
            for i in range(7)
        )
        / 4
    )
    preact = (
        sum(
            max(0.0, theta[l, i].item() - pre[b, l, i].item()) * norms[l, i].item()
            for b in range(4)
            for l in range(3)
            for i in range(7)
        )
        / 4
    )
    assert terms.reconstruction.item() == pytest.approx(mse.item())
    assert terms.sparsity.item() == pytest.approx(sparsity)
    assert terms.preactivation.item() == pytest.approx(preact)
    assert terms.total.item() == pytest.approx(mse.item() + lam * sparsity + mu * preact)


def test_preactivation_term_pushes_a_dead_feature_up():
    """Positive control for the dead-feature fix: a feature below its threshold on every token gets the
    encoder-bias gradient −μ‖W_dec‖ from the pre-activation term, i.e. gradient descent raises it toward
    firing, at a rate proportional to μ; the reconstruction cannot move it (it never fires)."""
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=6, n_features=5))
    with torch.no_grad():
        clt.b_enc[1, 3] = -50.0  # feature 3 of layer 1: dead on any input of this scale
    x, y = torch.randn(8, 2, 6), torch.randn(8, 2, 6)
    grads = {}
    for mu in (0.0, 0.1, 0.2):
        clt.zero_grad()
        clt_loss(clt, x, y, 0.0, mu).total.backward()
        grads[mu] = clt.b_enc.grad[1, 3].item()
    norm = clt.decoder_norms()[1, 3].item()
    assert grads[0.0] == 0.0
    assert grads[0.1] == pytest.approx(-0.1 * norm, rel=1e-5)
    assert grads[0.2] == pytest.approx(2 * grads[0.1], rel=1e-5)


def test_fvu_is_zero_for_perfect_and_one_for_mean_prediction():
    y = torch.randn(50, 2, 4)
    assert torch.allclose(fraction_of_variance_unexplained(y, y), torch.zeros(2))
    assert torch.allclose(
        fraction_of_variance_unexplained(y, y.mean(0, keepdim=True).expand_as(y)), torch.ones(2)
    )


def test_topk_and_batchtopk_keep_the_right_counts():
    pre = torch.randn(8, 2, 10)
    assert ((topk_activation(pre, 3) > 0).sum(-1) <= 3).all()
    kept = batch_topk_activation(pre, 3)
    assert ((kept > 0).sum(dim=(0, 2)) <= 3 * 8).all()
    flat = torch.relu(pre[:, 0]).flatten()
    assert torch.allclose(kept[:, 0].flatten().sort().values[-24:], flat.sort().values[-24:])


@pytest.mark.parametrize("cross_layer", [True, False])
def test_normalisation_folding(cross_layer):
    """Exported weights on raw activations = training weights on normalised activations."""
    clt = make_clt(cross_layer=cross_layer, skip=True)
    with torch.no_grad():
        clt.W_skip.normal_(0, 0.1)
        clt.input_scale.copy_(torch.tensor([0.5, 2.0, 3.0]))
        clt.output_scale.copy_(torch.tensor([4.0, 0.25, 1.5]))
    x_raw = torch.randn(5, 3, 5) * 3
    y_norm, _, _ = clt(x_raw * clt.input_scale[None, :, None])
    expected_raw = y_norm / clt.output_scale[None, :, None]
    w = folded_weights(clt)
    pre = torch.einsum("bld,ldf->blf", x_raw, w["W_enc"]) + w["b_enc"]
    acts = pre * (pre > w["threshold"])
    out = w["b_dec"].expand(5, 3, 5).clone()
    for l in range(3):
        for t in range(w["W_dec"][l].shape[1]):
            out[:, l + t] += acts[:, l] @ w["W_dec"][l][:, t]
    out += torch.einsum("bld,lde->ble", x_raw, w["W_skip"])
    assert torch.allclose(out, expected_raw)


def test_bad_inputs_fail_early():
    clt = make_clt()
    with pytest.raises(ValueError, match=r"expected activations of shape \[batch, 3, 5\], got \(2, 3, 4\)"):
        clt(torch.randn(2, 3, 4))
    bad = torch.randn(2, 3, 5)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        clt(bad)
    with pytest.raises(ValueError, match="activation must be one of"):
        CLTConfig(n_layers=1, d_model=2, n_features=3, activation="gelu")


def test_compiled_loss_equals_eager_in_value_and_gradient():
    """`--compile` (clt.train) runs torch.compile(clt_loss): same terms and same gradients for every
    parameter, JumpReLU's straight-through threshold gradient included (some pre-activations sit in its
    window), up to float rounding — in float32, the training dtype."""
    dtype = torch.float32
    clt = make_clt(n_features=48, d_model=16).to(dtype)
    torch.manual_seed(1)
    x, y = torch.randn(64, 3, 16, dtype=dtype), torch.randn(64, 3, 16, dtype=dtype)
    with torch.no_grad():
        # a few pre-activations inside the threshold's window, so the STE gradient is exercised
        in_window = (clt.encode_pre(x) - clt.threshold).abs() < clt.config.bandwidth / 2
    assert in_window.any()

    def terms_and_grads(loss_fn):
        clt.zero_grad(set_to_none=True)
        terms = loss_fn(clt, x, y, 0.3, 0.01, 4.0, False)
        terms.total.backward()
        return terms, {name: p.grad.clone() for name, p in clt.named_parameters()}

    eager, eager_grads = terms_and_grads(clt_loss)
    compiled, compiled_grads = terms_and_grads(torch.compile(clt_loss))
    rtol = 1e-4
    for name in ("total", "reconstruction", "sparsity", "preactivation"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=rtol, atol=0)
    torch.testing.assert_close(compiled.acts, eager.acts, rtol=rtol, atol=1e-6)
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad in eager_grads.items():
        assert grad.abs().sum() > 0, f"{name} got no gradient: the comparison would be empty"
        torch.testing.assert_close(compiled_grads[name], grad, rtol=rtol, atol=1e-5 * grad.abs().max().item())
