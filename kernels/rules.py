"""Per-element update rules: each optimizer's math, written once for every backend.

A rule updates element ``i`` of its arrays in place::

    rule(i, arrays, hyper, flags)

- ``arrays``: a tuple of 1-D arrays, the parameter and gradient first, then the state, in the
  order of the rule's :class:`fastrms.specs.Layout`, which names every argument; a test checks
  that each rule indexes its tuples in that order.
  A state array the flags leave unused is still passed (as the parameter itself) so that
  the tuple's type does not depend on the flags; the rule never touches it.
- ``hyper``: a tuple of scalars (named by the layout) already cast to the arrays' dtype and
  already combined on the host for this step (bias corrections, ``1 - alpha``, the decayed
  learning rate). The rules hold no numeric literals, so a float32 kernel computes in float32
  only.
- ``flags``: a tuple of booleans. The loop generators in :mod:`fastrms.kernels.cpu` and
  :mod:`fastrms.kernels.cuda` bind it as a compile-time constant, so the branches on it are
  folded away and the loop still vectorizes.

The rules are ``register_jitable(inline="always")`` functions: Numba inlines them into the loop
in its own IR, where it can drop the reference counting of the arrays taken from the tuple (a
plain ``@njit`` callee is not inlined, so the loop does not vectorize; an LLVM-inlined one keeps
an atomic incref/decref per element, 20x slower in a serial loop). They index their tuples
(``arrays[0]``) rather than unpack them: under ``inline="always"``, Numba 0.68 drops the writes
made through unpacked tuple elements. :mod:`fastrms.kernels.cuda` compiles the same functions
as CUDA device functions.

The NumPy reference in :mod:`fastrms.reference` implements the same updates independently with
array operations; it is the oracle these rules are tested against.
"""

import math

from numba.extending import register_jitable


@register_jitable(inline="always")
def rmsprop(i, arrays, hyper, flags):
    """RMSProp, PyTorch's form, with eps inside or outside the sqrt.

    g = sign*grad + wd*p;  v = alpha*v + (1-alpha)*g^2
    centered:  m = alpha*m + (1-alpha)*g;  v_hat = v - m^2  (else v_hat = v)
    d = sqrt(v_hat) + eps   or, with eps_in_sqrt, d = sqrt(v_hat + eps)
    momentum:  buf = mu*buf + g/d;  p = p - lr*buf      else  p = p - lr*g/d
    """
    param = arrays[0]
    grad = arrays[1]
    square_avg = arrays[2]
    momentum_buffer = arrays[3]
    grad_avg = arrays[4]
    lr = hyper[0]
    alpha = hyper[1]
    one_minus_alpha = hyper[2]
    eps = hyper[3]
    weight_decay = hyper[4]
    sign = hyper[5]
    momentum = hyper[6]
    centered = flags[0]
    use_momentum = flags[1]
    eps_in_sqrt = flags[2]
    p = param[i]
    g = sign * grad[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    v = alpha * square_avg[i] + one_minus_alpha * g * g
    square_avg[i] = v
    if centered:
        m = alpha * grad_avg[i] + one_minus_alpha * g
        grad_avg[i] = m
        v = v - m * m
    if eps_in_sqrt:
        d = math.sqrt(v + eps)
    else:
        d = math.sqrt(v) + eps
    if use_momentum:
        b = momentum * momentum_buffer[i] + g / d
        momentum_buffer[i] = b
        param[i] = p - lr * b
    else:
        param[i] = p - lr * g / d


@register_jitable(inline="always")
def adagrad(i, arrays, hyper, flags):
    """AdaGrad, PyTorch's form (clr = lr / (1 + (t-1)*lr_decay), computed on the host).

    g = sign*grad + wd*p;  s = s + g^2
    p = p - clr*g/(sqrt(s) + eps)   or, with eps_in_sqrt,  p = p - clr*g/sqrt(s + eps)
    """
    param = arrays[0]
    grad = arrays[1]
    state_sum = arrays[2]
    clr = hyper[0]
    eps = hyper[1]
    weight_decay = hyper[2]
    sign = hyper[3]
    eps_in_sqrt = flags[0]
    p = param[i]
    g = sign * grad[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    s = state_sum[i] + g * g
    state_sum[i] = s
    if eps_in_sqrt:
        d = math.sqrt(s + eps)
    else:
        d = math.sqrt(s) + eps
    param[i] = p - clr * g / d


@register_jitable(inline="always")
def adam(i, arrays, hyper, flags):
    """Adam / AdamW / AMSGrad, PyTorch's form.

    p = decay*p (AdamW: decay = 1 - lr*wd, else 1);  g = sign*grad + wd*p (Adam's L2 only)
    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;  amsgrad: vmax = max(vmax, v), use vmax
    p = p - step_size*m / (sqrt(v)/sqrt(1-b2^t) + eps),  step_size = lr/(1-b1^t)

    The host passes 1/sqrt(1-b2^t): a multiplication instead of PyTorch's division, which
    differs from it by an ulp at most and saves a fifth of the step where Adam is bound by
    arithmetic (arrays that fit in cache).
    """
    param = arrays[0]
    grad = arrays[1]
    exp_avg = arrays[2]
    exp_avg_sq = arrays[3]
    max_exp_avg_sq = arrays[4]
    step_size = hyper[0]
    inv_bias_correction2_sqrt = hyper[1]
    beta1 = hyper[2]
    one_minus_beta1 = hyper[3]
    beta2 = hyper[4]
    one_minus_beta2 = hyper[5]
    eps = hyper[6]
    weight_decay = hyper[7]
    decay = hyper[8]
    sign = hyper[9]
    amsgrad = flags[0]
    p = decay * param[i]
    g = sign * grad[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    m = beta1 * exp_avg[i] + one_minus_beta1 * g
    exp_avg[i] = m
    v = beta2 * exp_avg_sq[i] + one_minus_beta2 * g * g
    exp_avg_sq[i] = v
    if amsgrad:
        vmax = max_exp_avg_sq[i]
        # max() that keeps a NaN from either side, as np.maximum and torch.maximum do.
        if v != v or vmax < v:
            vmax = v
        max_exp_avg_sq[i] = vmax
        v = vmax
    param[i] = p - step_size * m / (math.sqrt(v) * inv_bias_correction2_sqrt + eps)


@register_jitable(inline="always")
def sgd(i, arrays, hyper, flags):
    """SGD with optional momentum / Nesterov, PyTorch's form.

    g = sign*grad + wd*p
    momentum:  buf = mu*buf + (1-dampening)*g   (first step: mu = 0, scale 1, so buf = g)
               g = g + mu*buf (Nesterov)  or  g = buf
    p = p - lr*g
    """
    param = arrays[0]
    grad = arrays[1]
    momentum_buffer = arrays[2]
    lr = hyper[0]
    weight_decay = hyper[1]
    sign = hyper[2]
    momentum = hyper[3]
    grad_scale = hyper[4]
    nesterov_momentum = hyper[5]
    use_momentum = flags[0]
    nesterov = flags[1]
    p = param[i]
    g = sign * grad[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    if use_momentum:
        b = momentum * momentum_buffer[i] + grad_scale * g
        momentum_buffer[i] = b
        if nesterov:
            g = g + nesterov_momentum * b
        else:
            g = b
    param[i] = p - lr * g


@register_jitable(inline="always")
def lion(i, arrays, hyper, flags):
    """Lion (Chen et al. 2023), with decoupled weight decay as in the paper.

    g = sign*grad;  c = beta1*m + (1-beta1)*g
    p = decay*p - lr*sign(c)   (decay = 1 - lr*wd; sign(0) = 0, sign(NaN) = NaN)
    m = beta2*m + (1-beta2)*g
    """
    param = arrays[0]
    grad = arrays[1]
    exp_avg = arrays[2]
    lr = hyper[0]
    beta1 = hyper[1]
    one_minus_beta1 = hyper[2]
    beta2 = hyper[3]
    one_minus_beta2 = hyper[4]
    decay = hyper[5]
    sign = hyper[6]
    g = sign * grad[i]
    m = exp_avg[i]
    c = beta1 * m + one_minus_beta1 * g
    # lr*sign(c) without a literal (a 1.0 would be float64): lr, -lr, or c*lr for 0 and NaN.
    if c > 0:
        u = lr
    elif c < 0:
        u = -lr
    else:
        u = c * lr
    param[i] = decay * param[i] - u
    exp_avg[i] = beta2 * m + one_minus_beta2 * g


@register_jitable(inline="always")
def adamax(i, arrays, hyper, flags):
    """Adamax (Kingma & Ba 2015, section 7.1), PyTorch's form.

    g = sign*grad + wd*p;  m = b1*m + (1-b1)*g;  u = max(b2*u, |g| + eps)
    p = p - clr*m/u,  clr = lr/(1-b1^t)
    """
    param = arrays[0]
    grad = arrays[1]
    exp_avg = arrays[2]
    exp_inf = arrays[3]
    clr = hyper[0]
    beta1 = hyper[1]
    one_minus_beta1 = hyper[2]
    beta2 = hyper[3]
    eps = hyper[4]
    weight_decay = hyper[5]
    sign = hyper[6]
    p = param[i]
    g = sign * grad[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    m = beta1 * exp_avg[i] + one_minus_beta1 * g
    exp_avg[i] = m
    u = beta2 * exp_inf[i]
    a = abs(g) + eps
    # max() that keeps a NaN from either side, as torch.maximum does.
    if a != a or u < a:
        u = a
    exp_inf[i] = u
    param[i] = p - clr * m / u


@register_jitable(inline="always")
def adadelta(i, arrays, hyper, flags):
    """Adadelta (Zeiler 2012), PyTorch's form.

    g = sign*grad + wd*p;  v = rho*v + (1-rho)*g^2
    delta = sqrt(u + eps)*g/sqrt(v + eps);  u = rho*u + (1-rho)*delta^2
    p = p - lr*delta
    """
    param = arrays[0]
    grad = arrays[1]
    square_avg = arrays[2]
    acc_delta = arrays[3]
    lr = hyper[0]
    rho = hyper[1]
    one_minus_rho = hyper[2]
    eps = hyper[3]
    weight_decay = hyper[4]
    sign = hyper[5]
    p = param[i]
    g = sign * grad[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    v = rho * square_avg[i] + one_minus_rho * g * g
    square_avg[i] = v
    u = acc_delta[i]
    # torch computes sqrt(u + eps) / sqrt(v + eps) * g. Multiplying first keeps every
    # operation in the arrays' dtype under the CUDA simulator too, where math.sqrt returns a
    # Python float (a quotient of two of them would be taken in float64).
    d = math.sqrt(u + eps) * g / math.sqrt(v + eps)
    acc_delta[i] = rho * u + one_minus_rho * d * d
    param[i] = p - lr * d


@register_jitable(inline="always")
def radam(i, arrays, hyper, flags):
    """RAdam (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond"),
    PyTorch's form.

    p = decay*p (decoupled: decay = 1 - lr*wd, else 1);  g = sign*grad + wd*p (L2 only)
    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
    rectify (rho_t > 5, a host flag):  p = p - m*step_size*(sqrt(1-b2^t)/(sqrt(v) + eps)),
        step_size = lr*rect/(1-b1^t)
    else:  p = p - m*step_size,  step_size = lr/(1-b1^t)
    """
    param = arrays[0]
    grad = arrays[1]
    exp_avg = arrays[2]
    exp_avg_sq = arrays[3]
    step_size = hyper[0]
    bias_correction2_sqrt = hyper[1]
    beta1 = hyper[2]
    one_minus_beta1 = hyper[3]
    beta2 = hyper[4]
    one_minus_beta2 = hyper[5]
    eps = hyper[6]
    weight_decay = hyper[7]
    decay = hyper[8]
    sign = hyper[9]
    rectify = flags[0]
    p = decay * param[i]
    g = sign * grad[i]
    if weight_decay != 0:
        g = g + weight_decay * p
    m = beta1 * exp_avg[i] + one_minus_beta1 * g
    exp_avg[i] = m
    v = beta2 * exp_avg_sq[i] + one_minus_beta2 * g * g
    exp_avg_sq[i] = v
    if rectify:
        param[i] = p - m * step_size * (bias_correction2_sqrt / (math.sqrt(v) + eps))
    else:
        param[i] = p - m * step_size


@register_jitable(inline="always")
def nadam(i, arrays, hyper, flags):
    """NAdam (Dozat 2016, "Incorporating Nesterov Momentum into Adam"), PyTorch's form.

    p = decay*p (decoupled: decay = 1 - lr*wd, else 1);  g = -grad if maximize else grad
    g = g + wd*p (L2 only);  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
    d = sqrt(v/(1-b2^t)) + eps
    p = p - grad_step*g/d;  p = p - exp_avg_step*m/d
    (grad_step = lr*(1-mu_t)/(1-prod mu), exp_avg_step = lr*mu_{t+1}/(1-prod mu * mu_{t+1}))

    ``maximize`` is a flag, not a ``sign`` scalar as in the other rules: the rule takes ten
    scalars already (negation is exact, so the two forms give the same bits).
    """
    param = arrays[0]
    grad = arrays[1]
    exp_avg = arrays[2]
    exp_avg_sq = arrays[3]
    grad_step = hyper[0]
    exp_avg_step = hyper[1]
    bias_correction2 = hyper[2]
    beta1 = hyper[3]
    one_minus_beta1 = hyper[4]
    beta2 = hyper[5]
    one_minus_beta2 = hyper[6]
    eps = hyper[7]
    weight_decay = hyper[8]
    decay = hyper[9]
    maximize = flags[0]
    p = decay * param[i]
    g = grad[i]
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * p
    m = beta1 * exp_avg[i] + one_minus_beta1 * g
    exp_avg[i] = m
    v = beta2 * exp_avg_sq[i] + one_minus_beta2 * g * g
    exp_avg_sq[i] = v
    d = math.sqrt(v / bias_correction2) + eps
    p = p - grad_step * g / d
    param[i] = p - exp_avg_step * m / d


RULES = {"rmsprop": rmsprop, "adagrad": adagrad, "adam": adam, "sgd": sgd, "lion": lion,
         "adamax": adamax, "adadelta": adadelta, "radam": radam, "nadam": nadam}  # fmt: skip
