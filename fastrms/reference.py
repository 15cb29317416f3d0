"""NumPy versions of every update: the in-place reference backend and the naive textbook ones.

The reference functions (``rmsprop``, ``adagrad``, ``adam``, ``sgd``, ``lion``) take the same
``(arrays, hyper, flags)`` as the rules in :mod:`fastrms.kernels.rules`, read them by the names
their :class:`fastrms.specs.Layout` gives, and update the arrays in place with ``out=``
ufuncs, a chunk at a time, so their scratch space is bounded
(:data:`CHUNK` elements) whatever the size. They are written independently of the rules, with
the same operation order, so the compiled kernels must match them bit for bit. They are the
``numpy`` backend and the oracle every fast path is tested against.

The ``naive_*`` functions are what a tutorial writes: whole-array expressions with temporaries.
They are what the benchmarks call "naive NumPy".
"""

from __future__ import annotations

import numpy as np

from .specs import LAYOUTS

#: Elements per pass of the reference backend; its scratch space is a few chunks.
CHUNK = 1 << 14


def _passes(n: int, dtype: np.dtype, scratch: int):
    """Yield ``(slice, scratch arrays)`` covering ``range(n)`` a chunk at a time."""
    buf = np.empty((scratch, min(n, CHUNK)), dtype)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        yield slice(start, stop), [row[: stop - start] for row in buf]


def _gradient(g, grad, p, sign, weight_decay, tmp):
    """g = sign*grad (+ weight_decay*p)."""
    np.multiply(grad, sign, out=g)
    if weight_decay != 0:
        np.multiply(p, weight_decay, out=tmp)
        np.add(g, tmp, out=g)


def _denominator(d, v, eps, eps_in_sqrt):
    """d = sqrt(v) + eps, or sqrt(v + eps)."""
    if eps_in_sqrt:
        np.add(v, eps, out=d)
        np.sqrt(d, out=d)
    else:
        np.sqrt(v, out=d)
        np.add(d, eps, out=d)


def rmsprop(arrays, hyper, flags):
    a, h, f = LAYOUTS["rmsprop"].named(arrays, hyper, flags)
    param = a.param
    for s, (g, d, t) in _passes(param.size, param.dtype, 3):
        p, v = param[s], a.square_avg[s]
        _gradient(g, a.grad[s], p, h.sign, h.weight_decay, t)
        np.multiply(g, h.one_minus_alpha, out=t)
        np.multiply(t, g, out=t)
        np.multiply(v, h.alpha, out=v)
        np.add(v, t, out=v)
        if f.centered:
            m = a.grad_avg[s]
            np.multiply(g, h.one_minus_alpha, out=t)
            np.multiply(m, h.alpha, out=m)
            np.add(m, t, out=m)
            np.multiply(m, m, out=t)
            np.subtract(v, t, out=t)
            _denominator(d, t, h.eps, f.eps_in_sqrt)
        else:
            _denominator(d, v, h.eps, f.eps_in_sqrt)
        if f.use_momentum:
            b = a.momentum_buffer[s]
            np.divide(g, d, out=d)
            np.multiply(b, h.momentum, out=b)
            np.add(b, d, out=b)
            np.multiply(b, h.lr, out=t)
        else:
            np.multiply(g, h.lr, out=t)
            np.divide(t, d, out=t)
        np.subtract(p, t, out=p)


def adagrad(arrays, hyper, flags):
    a, h, f = LAYOUTS["adagrad"].named(arrays, hyper, flags)
    param = a.param
    for s, (g, d, t) in _passes(param.size, param.dtype, 3):
        p, acc = param[s], a.state_sum[s]
        _gradient(g, a.grad[s], p, h.sign, h.weight_decay, t)
        np.multiply(g, g, out=t)
        np.add(acc, t, out=acc)
        _denominator(d, acc, h.eps, f.eps_in_sqrt)
        np.multiply(g, h.clr, out=t)
        np.divide(t, d, out=t)
        np.subtract(p, t, out=p)


def adam(arrays, hyper, flags):
    a, h, f = LAYOUTS["adam"].named(arrays, hyper, flags)
    param = a.param
    for s, (g, d, t) in _passes(param.size, param.dtype, 3):
        p, m, v = param[s], a.exp_avg[s], a.exp_avg_sq[s]
        np.multiply(p, h.decay, out=p)
        _gradient(g, a.grad[s], p, h.sign, h.weight_decay, t)
        np.multiply(g, h.one_minus_beta1, out=t)
        np.multiply(m, h.beta1, out=m)
        np.add(m, t, out=m)
        np.multiply(g, h.one_minus_beta2, out=t)
        np.multiply(t, g, out=t)
        np.multiply(v, h.beta2, out=v)
        np.add(v, t, out=v)
        if f.amsgrad:
            vmax = a.max_exp_avg_sq[s]
            np.maximum(vmax, v, out=vmax)
            v = vmax
        np.sqrt(v, out=d)
        np.multiply(d, h.inv_bias_correction2_sqrt, out=d)
        np.add(d, h.eps, out=d)
        np.multiply(m, h.step_size, out=t)
        np.divide(t, d, out=t)
        np.subtract(p, t, out=p)


def sgd(arrays, hyper, flags):
    a, h, f = LAYOUTS["sgd"].named(arrays, hyper, flags)
    param = a.param
    for s, (g, t) in _passes(param.size, param.dtype, 2):
        p = param[s]
        _gradient(g, a.grad[s], p, h.sign, h.weight_decay, t)
        if f.use_momentum:
            b = a.momentum_buffer[s]
            np.multiply(g, h.grad_scale, out=t)
            np.multiply(b, h.momentum, out=b)
            np.add(b, t, out=b)
            if f.nesterov:
                np.multiply(b, h.nesterov_momentum, out=t)
                np.add(g, t, out=g)
            else:
                np.copyto(g, b)
        np.multiply(g, h.lr, out=t)
        np.subtract(p, t, out=p)


def lion(arrays, hyper, flags):
    a, h, _ = LAYOUTS["lion"].named(arrays, hyper, flags)
    param = a.param
    for s, (g, c, t) in _passes(param.size, param.dtype, 3):
        p, m = param[s], a.exp_avg[s]
        np.multiply(a.grad[s], h.sign, out=g)
        np.multiply(m, h.beta1, out=c)
        np.multiply(g, h.one_minus_beta1, out=t)
        np.add(c, t, out=c)
        np.sign(c, out=c)
        np.multiply(c, h.lr, out=c)
        np.multiply(p, h.decay, out=p)
        np.subtract(p, c, out=p)
        np.multiply(m, h.beta2, out=m)
        np.multiply(g, h.one_minus_beta2, out=t)
        np.add(m, t, out=m)


def adamax(arrays, hyper, flags):
    a, h, _ = LAYOUTS["adamax"].named(arrays, hyper, flags)
    param = a.param
    for s, (g, t) in _passes(param.size, param.dtype, 2):
        p, m, u = param[s], a.exp_avg[s], a.exp_inf[s]
        _gradient(g, a.grad[s], p, h.sign, h.weight_decay, t)
        np.multiply(g, h.one_minus_beta1, out=t)
        np.multiply(m, h.beta1, out=m)
        np.add(m, t, out=m)
        np.abs(g, out=g)
        np.add(g, h.eps, out=g)
        np.multiply(u, h.beta2, out=u)
        np.maximum(u, g, out=u)  # NaN from either side propagates
        np.multiply(m, h.clr, out=t)
        np.divide(t, u, out=t)
        np.subtract(p, t, out=p)


def adadelta(arrays, hyper, flags):
    a, h, _ = LAYOUTS["adadelta"].named(arrays, hyper, flags)
    param = a.param
    for s, (g, d, t) in _passes(param.size, param.dtype, 3):
        p, v, u = param[s], a.square_avg[s], a.acc_delta[s]
        _gradient(g, a.grad[s], p, h.sign, h.weight_decay, t)
        np.multiply(g, h.one_minus_rho, out=t)
        np.multiply(t, g, out=t)
        np.multiply(v, h.rho, out=v)
        np.add(v, t, out=v)
        np.add(u, h.eps, out=d)
        np.sqrt(d, out=d)
        np.multiply(d, g, out=d)
        np.add(v, h.eps, out=t)
        np.sqrt(t, out=t)
        np.divide(d, t, out=d)  # delta
        np.multiply(d, h.one_minus_rho, out=t)
        np.multiply(t, d, out=t)
        np.multiply(u, h.rho, out=u)
        np.add(u, t, out=u)
        np.multiply(d, h.lr, out=t)
        np.subtract(p, t, out=p)


def radam(arrays, hyper, flags):
    a, h, f = LAYOUTS["radam"].named(arrays, hyper, flags)
    param = a.param
    for s, (g, d, t) in _passes(param.size, param.dtype, 3):
        p, m, v = param[s], a.exp_avg[s], a.exp_avg_sq[s]
        np.multiply(p, h.decay, out=p)
        _gradient(g, a.grad[s], p, h.sign, h.weight_decay, t)
        np.multiply(g, h.one_minus_beta1, out=t)
        np.multiply(m, h.beta1, out=m)
        np.add(m, t, out=m)
        np.multiply(g, h.one_minus_beta2, out=t)
        np.multiply(t, g, out=t)
        np.multiply(v, h.beta2, out=v)
        np.add(v, t, out=v)
        np.multiply(m, h.step_size, out=t)
        if f.rectify:  # the adaptive factor sqrt(1 - beta2**t) / (sqrt(v) + eps)
            np.sqrt(v, out=d)
            np.add(d, h.eps, out=d)
            np.divide(h.bias_correction2_sqrt, d, out=d)
            np.multiply(t, d, out=t)
        np.subtract(p, t, out=p)


def nadam(arrays, hyper, flags):
    a, h, f = LAYOUTS["nadam"].named(arrays, hyper, flags)
    param = a.param
    for s, (g, d, t) in _passes(param.size, param.dtype, 3):
        p, m, v = param[s], a.exp_avg[s], a.exp_avg_sq[s]
        np.multiply(p, h.decay, out=p)
        if f.maximize:
            np.negative(a.grad[s], out=g)
        else:
            np.copyto(g, a.grad[s])
        if h.weight_decay != 0:
            np.multiply(p, h.weight_decay, out=t)
            np.add(g, t, out=g)
        np.multiply(g, h.one_minus_beta1, out=t)
        np.multiply(m, h.beta1, out=m)
        np.add(m, t, out=m)
        np.multiply(g, h.one_minus_beta2, out=t)
        np.multiply(t, g, out=t)
        np.multiply(v, h.beta2, out=v)
        np.add(v, t, out=v)
        np.divide(v, h.bias_correction2, out=d)
        np.sqrt(d, out=d)
        np.add(d, h.eps, out=d)
        np.multiply(g, h.grad_step, out=t)
        np.divide(t, d, out=t)
        np.subtract(p, t, out=p)
        np.multiply(m, h.exp_avg_step, out=t)
        np.divide(t, d, out=t)
        np.subtract(p, t, out=p)


RULES = {"rmsprop": rmsprop, "adagrad": adagrad, "adam": adam, "sgd": sgd, "lion": lion,
         "adamax": adamax, "adadelta": adadelta, "radam": radam, "nadam": nadam}  # fmt: skip


# --- Naive textbook versions (for the benchmarks: what users write by hand) ---------------


def naive_rmsprop(param, grad, square_avg, lr=1e-2, alpha=0.99, eps=1e-8):
    """Textbook RMSProp with temporaries: v = a*v + (1-a)*g^2; p -= lr*g/(sqrt(v)+eps)."""
    square_avg[:] = alpha * square_avg + (1 - alpha) * grad**2
    param[:] = param - lr * grad / (np.sqrt(square_avg) + eps)


def naive_rmsprop_centered_momentum(
    param, grad, square_avg, grad_avg, momentum_buffer, lr=1e-2, alpha=0.99, eps=1e-8, mu=0.9
):
    """Textbook centered RMSProp with momentum (PyTorch's form), with temporaries."""
    square_avg[:] = alpha * square_avg + (1 - alpha) * grad**2
    grad_avg[:] = alpha * grad_avg + (1 - alpha) * grad
    momentum_buffer[:] = mu * momentum_buffer + grad / (np.sqrt(square_avg - grad_avg**2) + eps)
    param[:] = param - lr * momentum_buffer


def naive_adagrad(param, grad, state_sum, lr=1e-2, eps=1e-10):
    """Textbook AdaGrad: s += g^2; p -= lr*g/(sqrt(s)+eps)."""
    state_sum[:] = state_sum + grad**2
    param[:] = param - lr * grad / (np.sqrt(state_sum) + eps)


def naive_adam(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """Textbook Adam with bias-corrected moments m_hat, v_hat."""
    b1, b2 = betas
    exp_avg[:] = b1 * exp_avg + (1 - b1) * grad
    exp_avg_sq[:] = b2 * exp_avg_sq + (1 - b2) * grad**2
    m_hat = exp_avg / (1 - b1**step)
    v_hat = exp_avg_sq / (1 - b2**step)
    param[:] = param - lr * m_hat / (np.sqrt(v_hat) + eps)


def naive_amsgrad(
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8
):
    """Textbook AMSGrad: Adam with the running maximum of v."""
    b1, b2 = betas
    exp_avg[:] = b1 * exp_avg + (1 - b1) * grad
    exp_avg_sq[:] = b2 * exp_avg_sq + (1 - b2) * grad**2
    max_exp_avg_sq[:] = np.maximum(max_exp_avg_sq, exp_avg_sq)
    m_hat = exp_avg / (1 - b1**step)
    v_hat = max_exp_avg_sq / (1 - b2**step)
    param[:] = param - lr * m_hat / (np.sqrt(v_hat) + eps)


def naive_sgd_momentum(param, grad, momentum_buffer, lr=1e-3, mu=0.9):
    """Textbook SGD with momentum: buf = mu*buf + g; p -= lr*buf."""
    momentum_buffer[:] = mu * momentum_buffer + grad
    param[:] = param - lr * momentum_buffer
