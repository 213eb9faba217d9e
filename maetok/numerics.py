"""The pinned numerics: rules and constants both backends follow operation for operation.

``maetok_jax`` and ``maetok_torch`` import the constants below and implement each rule the
same way; where the two frameworks differ by default the choice is written out here once.
The parity tests hold the results to the tolerances of ``maetok.parity.TOL``.

Layers (``layers``): LayerNorm statistics in float32 with ``eps = model.ln_eps`` and the
biased variance, ``(x − mean)·rsqrt(var + eps)·scale + bias``; GELU in its exact erf form.

Auxiliary targets (``targets``), computed from the clean image and never differentiated:

- reflect padding = numpy ``'reflect'`` (edge pixel not repeated) for Sobel and Gabor;
- HOG magnitude ``sqrt(gx² + gy²)`` with no eps;
- HOG orientation ``atan2(gx, gy)``; soft voting to the two nearest of 9 bin centres
  ``(k + ½)·π/9`` with weight ``relu(1 − circular distance in bins)``, circular modulo
  9 bins, which also folds the signed angle onto unsigned [0, π);
- HOG cell normalisation ``h / sqrt(Σ_bins h² + HOG_EPS)``;
- Gabor magnitude ``sqrt(even² + odd² + GABOR_EPS)``;
- normalised pixels ``(x − mean) / sqrt(var + PIXEL_EPS)``, population variance
  computed two-pass as ``mean((x − mean)²)``.

With bf16 compute, ``model.fast_filters`` runs the fixed convolutions of the targets and the
perceptual pyramid in bf16 at default precision (float32 compute: HIGHEST precision
always); ``model.lowp_norm`` changes what LayerNorm and GELU save for the backward pass,
not their values (docs/design.md §10).

Perceptual pyramid (``perceptual``):

- reflect padding (numpy ``'reflect'``) of 2 pixels for the 5×5 bank;
- 2×2 average pooling as a reshape then ``mean`` over the two 2-axes (not a pooling op);
- smooth energy ``φ = sqrt(f² + PERCEP_EPS)``, so the gradient is finite where a filter
  response is zero;
- loss = ``Σ_l mean((φ_l(I) − φ_l(Î))²)``, levels summed in order l = 0, 1, ….

Patch-GAN (``discriminator``):

- explicit zero padding: (1, 1) per spatial axis for the stride-2 convs and (1, 2) — one
  before, two after — for the ``out`` conv, so the logit map is (H/2^d, W/2^d); 'SAME'
  is never used because the two frameworks split odd padding differently;
- LeakyReLU slope ``LEAKY_SLOPE``;
- hinge loss WITHOUT a ½ factor: ``mean(relu(1 − real)) + mean(relu(1 + fake))``;
- LeCAM (Tseng et al. 2021): ``mean(relu(real − ema_fake)²) + mean(relu(ema_real − fake)²)``;
- EMA update ``decay·ema + (1 − decay)·mean(logits)``, logits taken as constants.

Adaptive adversarial weight (``losses``): ``‖∇_W L_nll‖ / (‖∇_W L_adv‖ + ADV_WEIGHT_EPS)``
clipped to [0, ADV_WEIGHT_MAX]. Global-norm clipping (``optim``): gradients scaled by
``min(1, max_norm / (‖g‖ + CLIP_EPS))``.
"""

HOG_EPS = 1e-6
GABOR_EPS = 1e-6
PIXEL_EPS = 1e-6
PERCEP_EPS = 1e-6
LEAKY_SLOPE = 0.2
ADV_WEIGHT_EPS = 1e-4
ADV_WEIGHT_MAX = 1e4
CLIP_EPS = 1e-6
# EMA warm-up (train.ema_warmup): after s updates the decay is
# min(ema_decay, (1 + s)/(EMA_WARMUP + s))
EMA_WARMUP = 10.0
