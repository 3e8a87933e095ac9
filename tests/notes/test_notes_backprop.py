"""Worked examples of notes 002 (反向传播, Pooling池化操作的反向梯度传播) and note 000's LeNet-5.

Every closed form is checked against the note's formula written out literally in NumPy and
against ``jax.vjp``/``jax.grad``.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnnjax.backprop import (
    avg_pool_grad,
    conv_bias_grad,
    conv_input_grad,
    conv_kernel_grad,
    dense_backward,
    dense_grads,
    max_pool_grad,
)


def corr2d(x, k):
    """Valid 2-D cross-correlation (notes 001's corr2d), float64."""
    h, w = k.shape
    return np.array(
        [[np.sum(x[i : i + h, j : j + w] * k) for j in range(x.shape[1] - w + 1)] for i in range(x.shape[0] - h + 1)]
    )


def nhwc(plane):
    return jnp.asarray(plane, jnp.float32)[None, :, :, None]


def hwio(kernel):
    return jnp.asarray(kernel, jnp.float32)[:, :, None, None]


# --- pooling ----------------------------------------------------------------------------------


def test_note002_mean_pooling_splits_each_gradient_evenly():
    """Mean pooling: each output's gradient is divided into n equal parts (n = window size), so
    the total is unchanged; copying it n times would multiply the total by n."""
    dy = np.array([[1.0, 2.0], [3.0, 4.0]])
    dx = avg_pool_grad(nhwc(dy), (1, 4, 4, 1), 2)[0, :, :, 0]
    expected = np.kron(dy, np.ones((2, 2))) / 4
    np.testing.assert_allclose(dx, expected)
    assert float(jnp.sum(dx)) == pytest.approx(dy.sum())  # 梯度之和不变, not 4 * dy.sum()
    x = nhwc(np.arange(16.0).reshape(4, 4))
    _, vjp = jax.vjp(lambda x: lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4, x)
    np.testing.assert_allclose(vjp(nhwc(dy))[0][0, :, :, 0], expected)


def test_note002_max_pooling_routes_each_gradient_to_the_max_id():
    """Max pooling: the whole gradient goes to the recorded max position; the rest get 0."""
    x = np.array([[1.0, 3.0, 2.0, 1.0], [2.0, 9.0, 1.0, 1.0], [1.0, 3.0, 2.0, 3.0], [2.0, 6.0, 1.0, 2.0]])
    dy = np.array([[1.0, 2.0], [3.0, 4.0]])
    dx = max_pool_grad(nhwc(x), nhwc(dy), 2)[0, :, :, 0]
    expected = np.zeros((4, 4))
    for (i, j), g in np.ndenumerate(dy):
        block = x[2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
        a, b = np.unravel_index(np.argmax(block), block.shape)  # the max id
        expected[2 * i + a, 2 * j + b] = g
    np.testing.assert_array_equal(dx, expected)
    assert float(jnp.sum(dx)) == dy.sum()
    _, vjp = jax.vjp(lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"), nhwc(x))
    np.testing.assert_array_equal(vjp(nhwc(dy))[0][0, :, :, 0], expected)


# --- convolution ------------------------------------------------------------------------------


def dilate_and_pad(delta, stride, pad):
    """The note's zero insertion: ``stride - 1`` zeros between deltas, then ``pad`` zeros around."""
    h, w = delta.shape
    dilated = np.zeros(((h - 1) * stride + 1, (w - 1) * stride + 1))
    dilated[::stride, ::stride] = delta
    return np.pad(dilated, pad)


@pytest.mark.parametrize("stride", [1, 2])
def test_note002_conv_delta_is_padded_delta_correlated_with_rot180_kernel(stride):
    """``delta_l = pad(delta_{l+1}) (*) rot180(W)`` (the sigma' factor is applied by the caller);
    with a stride the deltas are first spread out by zero insertion."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 5))
    w = rng.normal(size=(3, 3))
    out = (5 - 3) // stride + 1
    delta = rng.normal(size=(out, out))
    # full correlation: pad by k-1, plus what the stride's last incomplete window left over
    pad = ((2, 2 + (5 - 3) % stride), (2, 2 + (5 - 3) % stride))
    expected = corr2d(dilate_and_pad(delta, stride, pad), np.rot90(w, 2))
    got = conv_input_grad(nhwc(delta), hwio(w), (1, 5, 5, 1), strides=stride)[0, :, :, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    _, vjp = jax.vjp(
        lambda x: lax.conv_general_dilated(
            x, hwio(w), (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        nhwc(x),
    )
    np.testing.assert_allclose(vjp(nhwc(delta))[0][0, :, :, 0], expected, rtol=1e-5, atol=1e-5)


def test_note002_conv_weight_gradient_is_input_correlated_with_delta():
    """``dC/dw[a, b] = sum_{x, y} delta[x, y] * a_{l-1}[x + a, y + b]``: the previous layer's
    activations correlated with delta; ``dC/db = sum delta``."""
    rng = np.random.default_rng(1)
    a_prev = rng.normal(size=(6, 6))
    delta = rng.normal(size=(4, 4))
    got = conv_kernel_grad(nhwc(a_prev), nhwc(delta), (3, 3, 1, 1))[:, :, 0, 0]
    np.testing.assert_allclose(got, corr2d(a_prev, delta), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conv_bias_grad(nhwc(delta)), [delta.sum()], rtol=1e-6)


# --- fully connected --------------------------------------------------------------------------


def test_note002_fully_connected_backprop_column_vectors():
    """The note's column-vector MLP (``z = W a + b``, ``W`` is n x m) with C = 1/2 ||a_L - y||^2:
    ``delta_L = (a_L - y) * sigma'(z_L)``, ``delta_l = W_{l+1}^T delta_{l+1} * sigma'(z_l)``,
    ``dW = delta a^T``, ``db = delta``. cnnjax's kernels are the transposes (Flax's (in, out))."""
    rng = np.random.default_rng(2)
    sizes = (4, 3, 2)
    ws = [rng.normal(size=(n, m)) for m, n in itertools.pairwise(sizes)]  # note's n x m
    bs = [rng.normal(size=(n, 1)) for n in sizes[1:]]
    x, y = rng.normal(size=(4, 1)), rng.normal(size=(2, 1))

    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    activations, zs = [x], []
    for w, b in zip(ws, bs, strict=True):
        zs.append(w @ activations[-1] + b)
        activations.append(sigmoid(zs[-1]))
    deltas = [(activations[-1] - y) * sigmoid(zs[-1]) * (1 - sigmoid(zs[-1]))]
    for w, z in zip(ws[:0:-1], zs[-2::-1], strict=True):
        deltas.insert(0, w.T @ deltas[0] * sigmoid(z) * (1 - sigmoid(z)))
    note_grads = [(delta @ a.T, delta) for delta, a in zip(deltas, activations, strict=False)]

    def sigmoid_prime(z):
        return jax.nn.sigmoid(z) * (1 - jax.nn.sigmoid(z))

    rows = [jnp.asarray(a.T, jnp.float32) for a in activations[:-1]]  # one-sample batches
    grads, _ = dense_backward(
        rows,
        [jnp.asarray(w.T, jnp.float32) for w in ws],
        [jnp.asarray(z.T, jnp.float32) for z in zs[:-1]],
        jnp.asarray(deltas[-1].T, jnp.float32),
        sigmoid_prime,
    )
    for (dw, db), (note_dw, note_db) in zip(grads, note_grads, strict=True):
        np.testing.assert_allclose(dw, note_dw.T, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(db, note_db[:, 0], rtol=1e-5, atol=1e-6)
    # the last layer by itself: dW = delta a^T
    dw, db, _ = dense_grads(rows[-1], jnp.asarray(ws[-1].T, jnp.float32), jnp.asarray(deltas[-1].T, jnp.float32))
    np.testing.assert_allclose(dw, note_grads[-1][0].T, rtol=1e-5, atol=1e-6)


# --- LeNet-5 end to end -----------------------------------------------------------------------


def lenet_params(key):
    """Note 000's LeNet-5 for 28x28 inputs: conv 5x5 (pad 2) 1->6, avg pool 2, conv 5x5 6->16,
    avg pool 2, dense 400->120->84->10, sigmoid everywhere."""
    shapes = {
        "conv1": ((5, 5, 1, 6), (6,)),
        "conv2": ((5, 5, 6, 16), (16,)),
        "dense1": ((400, 120), (120,)),
        "dense2": ((120, 84), (84,)),
        "dense3": ((84, 10), (10,)),
    }
    keys = jax.random.split(key, len(shapes))
    return {
        name: (jax.random.normal(k, w) / np.sqrt(np.prod(w[:-1])), 0.1 * jax.random.normal(jax.random.fold_in(k, 1), b))
        for k, (name, (w, b)) in zip(keys, shapes.items(), strict=True)
    }


def conv(x, w, padding):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def avg_pool(x):
    return lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4


def lenet_forward(params, x):
    """Every intermediate the backward pass needs: pre-activations z and activations a."""
    cache = {"x": x}
    cache["z1"] = conv(x, params["conv1"][0], ((2, 2), (2, 2))) + params["conv1"][1]
    cache["p1"] = avg_pool(jax.nn.sigmoid(cache["z1"]))
    cache["z2"] = conv(cache["p1"], params["conv2"][0], "VALID") + params["conv2"][1]
    cache["flat"] = avg_pool(jax.nn.sigmoid(cache["z2"])).reshape(x.shape[0], -1)
    a = cache["flat"]
    cache["dense_inputs"], cache["dense_z"] = [], []
    for name in ("dense1", "dense2", "dense3"):
        cache["dense_inputs"].append(a)
        cache["dense_z"].append(a @ params[name][0] + params[name][1])
        a = jax.nn.sigmoid(cache["dense_z"][-1])
    cache["out"] = a
    return cache


def squared_error(params, x, y):
    """notes 002: C = 1/2 ||a_L - y||^2, summed over the batch."""
    return 0.5 * jnp.sum((lenet_forward(params, x)["out"] - y) ** 2)


def sigmoid_prime(z):
    return jax.nn.sigmoid(z) * (1 - jax.nn.sigmoid(z))


@jax.jit
def lenet_closed_form_grads(params, x, y):
    """Chain the notes' layer rules by hand, from the loss back to conv1."""
    c = lenet_forward(params, x)
    delta = (c["out"] - y) * sigmoid_prime(c["dense_z"][-1])  # delta_L = (a_L - y) * sigma'(z_L)
    weights = [params[name][0] for name in ("dense1", "dense2", "dense3")]
    dense, d_flat = dense_backward(c["dense_inputs"], weights, c["dense_z"][:-1], delta, sigmoid_prime)
    grads = dict(zip(("dense1", "dense2", "dense3"), dense, strict=True))
    d_pool2 = d_flat.reshape(x.shape[0], 5, 5, 16)
    delta2 = avg_pool_grad(d_pool2, c["z2"].shape, 2) * sigmoid_prime(c["z2"])
    grads["conv2"] = (conv_kernel_grad(c["p1"], delta2, params["conv2"][0].shape), conv_bias_grad(delta2))
    d_pool1 = conv_input_grad(delta2, params["conv2"][0], c["p1"].shape)
    delta1 = avg_pool_grad(d_pool1, c["z1"].shape, 2) * sigmoid_prime(c["z1"])
    grads["conv1"] = (conv_kernel_grad(x, delta1, params["conv1"][0].shape, padding=2), conv_bias_grad(delta1))
    return grads


def test_note000_lenet5_hand_chained_closed_forms_equal_jax_grad():
    key = jax.random.key(0)
    params = lenet_params(key)
    x = jax.random.uniform(jax.random.fold_in(key, 1), (3, 28, 28, 1))
    y = jax.nn.one_hot(jnp.array([3, 1, 4]), 10)
    want = jax.jit(jax.grad(squared_error))(params, x, y)
    got = lenet_closed_form_grads(params, x, y)
    assert set(got) == set(want)
    for name, (dw, db) in got.items():
        want_w, want_b = want[name]
        assert dw.shape == want_w.shape and db.shape == want_b.shape
        scale = float(jnp.max(jnp.abs(want_w)))
        np.testing.assert_allclose(dw, want_w, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
        np.testing.assert_allclose(db, want_b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want_b))), err_msg=name)
