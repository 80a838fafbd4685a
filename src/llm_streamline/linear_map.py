"""Training-free linear replacements of a pruned block, and the linear initialisation of trained ones.

All statistics are streamed: calibration blocks go through the dense model batch by batch (only as far as the
block's end, `models.layers.run_layers`) and are reduced at once, so memory does not grow with the number of
calibration tokens. Least-squares systems are accumulated as X^T X and X^T Y and solved in float64.

ReplaceMe (Shopkhoev et al., arXiv 2505.02819; facts from the paper and mts-ai/ReplaceMe). With layers
[s, s+n) removed and M the MLP branch output of the last kept layer s-1 (what its MLP adds to the residual
stream), the hidden state leaving layer s-1 is x_s = Z + M (Z: the rest, attention output plus residual).
ReplaceMe looks for a d x d map T so that Z + M T ~ x_(s+n), the hidden state the block produced:
  lstsq   T = argmin ||M T - (x_(s+n) - Z)||^2 = (M^T M + ridge I)^-1 M^T (x_(s+n) - Z)   (closed form)
  cosine  T = argmin mean_t (1 - cos(Z_t + M_t T, x_(s+n),t)), by Adam from the identity over shuffled
          minibatches of tokens, `fit_epochs` passes (the authors: 10 passes, 1024 tokens, lr 1e-4). The
          activations are recomputed from the calibration blocks every pass rather than stored (the authors hold
          them all in host memory; at 7B and 8K samples they do not fit anywhere).
T is then fused into layer s-1's MLP output map: y = W h + b becomes (W h + b) T, i.e. W <- T^T W, b <- T^T b,
so the pruned model is a stock checkpoint with the parameter count of plain pruning. Layers whose MLP output is
normalised before the residual add (Gemma's post-feed-forward norm) cannot take T exactly and are refused.
`ridge` is relative: the added diagonal is ridge x mean(diag(M^T M)), so the same value fits any activation scale.
`first_token=exclude` leaves position 0 (the attention sink, whose massive activations dominate a squared
error) out of the statistics; the authors include every token (`include`, the default).

LinearPatch (Chen et al., NeurIPS 2025; facts from the paper and chenxinrui-tsinghua/LinearPatch). The hidden
state entering the pruned slot, x_s, is multiplied by P = H diag(c) H^T (H an orthonormal Hadamard matrix:
massive outliers of single channels are spread over all channels before scaling), with the channel scales
c = mean_t |(x_(s+n) H)| / mean_t |(x_s H)|, averaged over calibration batches as the authors do. P is a
d x d matrix in the slot (`PatchReplacement`); its optional offline distillation is the slot's training
(`replacement.finetune=true` with train=distill). For d not a power of two, H = H_K (x) H_(2^m) (Kronecker),
with H_K from Paley's construction (K - 1 a prime = 3 mod 4), as QuaRot's Hadamard utilities, which the authors
use, build sizes 12 x 2^m, 20 x 2^m, ...: SmolLM2's 576 = 72 x 8, Gemma 3 270M's 640 = 20 x 32.

Linear initialisation of trained replacements (`replacement.init=linear`).
  ffn     the slot input x (or norm(x) with pre_norm) is mapped to the target by least squares, A (plus bias b):
          x_(s+n) - x ~ x A + b (residual) or x_(s+n) ~ x A + b. Since silu(z) - silu(-z) = z exactly (likewise
          gelu and relu), the FFN's first 2d units are set to +x and -x and its output map to [A^T, -A^T]: at
          step 0 the FFN equals the linear map exactly; the other units keep their random input weights and get
          zero output weights (they still receive gradients). Needs width >= 2d, else refused.
  layer   the copy of the first pruned layer keeps its attention and MLP input maps; its MLP output map is refit
          by least squares so that the layer's output best matches x_(s+n) on the calibration tokens (the layer
          cannot represent an arbitrary linear map: its MLP is gated; this is the closest the form allows with
          one closed-form solve, and it is never worse than the copied layer on the calibration tokens).
          With a norm after the MLP (Gemma: RMS norm N(v) = s * v / rms(v)), the branch can only add a vector of
          fixed scale: per token, the target is the rms-1 vector w whose normalised output s * w is closest to
          r = x_(s+n) minus the rest of the layer (`through_rms_norm`), the output map is fit to it, then
          rescaled as a whole to the copied map's mean output norm (N ignores the scale, the optimiser's step
          size does not). The scales s are read from the norm module (N(1)), so w and 1 + w forms both work.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from llm_streamline.config import ConfigError, ReplacementConfig
from llm_streamline.models.anatomy import anatomy_of
from llm_streamline.models.devices import is_sharded, module_device, to_device
from llm_streamline.models.layers import find_decoder_stack, run_layers
from llm_streamline.parallel import ranks, shares, sum_over_ranks


class LinearMapError(ConfigError):
    """A linear map this model or block cannot take (ReplaceMe, LinearPatch): bad input (exit 2)."""


# ------------------------------------------------------------------------------------------- least squares
class Gram:
    """Streamed normal equations of min ||X B - Y||^2: X^T X and X^T Y in float64, O(d_in^2 + d_in d_out)
    memory whatever the number of rows. `bias`: a constant column is appended to X (B's last row is a bias).
    The sums live on the device of the first batch: the products are the fit's whole cost (2 d^2 FLOPs per
    token: at d=4096 and 16M calibration tokens 5.6e14, hours on a host, seconds on a GPU), so the activations
    are never copied to the host; only the d x d solution is (`solve`)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        self.bias = bias
        self.shape = (d_in + int(bias), d_out)
        self.xtx: torch.Tensor | None = None
        self.xty: torch.Tensor | None = None
        self.yty: torch.Tensor | None = None  # trace of Y^T Y: with the two above, any B's error, no second pass
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.xtx is None:
            k, d_out = self.shape
            self.xtx = torch.zeros(k, k, dtype=torch.float64, device=x.device)
            self.xty = torch.zeros(k, d_out, dtype=torch.float64, device=x.device)
            self.yty = torch.zeros((), dtype=torch.float64, device=x.device)  # a tensor: no sync per batch
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.device, torch.float64)
        y = y.reshape(-1, y.shape[-1]).to(self.xtx.device, torch.float64)
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yty += (y * y).sum()
        self.rows += x.shape[0]

    def reduce(self, accelerator) -> None:
        """Under torchrun: every rank's sums added up (each rank added its own batches), in float64 on the sums'
        device, so every rank solves the one-process system (up to the order of the additions). A rank with no
        batch joins with zeros."""
        if ranks(accelerator)[0] == 1:
            return
        import torch.distributed as dist

        if self.xtx is None:
            k, d_out = self.shape
            dev = accelerator.device
            self.xtx = torch.zeros(k, k, dtype=torch.float64, device=dev)
            self.xty = torch.zeros(k, d_out, dtype=torch.float64, device=dev)
            self.yty = torch.zeros((), dtype=torch.float64, device=dev)
        rows = torch.tensor(float(self.rows), dtype=torch.float64, device=self.xtx.device)
        for t in (self.xtx, self.xty, self.yty, rows):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)  # in place: no second d x d copy
        self.rows = int(rows.item())

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.xtx is None:
            raise LinearMapError("no calibration tokens reached the least-squares fit")
        return self.xtx, self.xty

    def mse(self, b: torch.Tensor) -> float:
        """Mean over rows and output columns of (X B - Y)^2, from the accumulated statistics."""
        xtx, xty = self._sums()
        b = b.to(xtx.device, torch.float64)
        sse = float((b * (xtx @ b)).sum() - 2 * (b * xty).sum() + self.yty)
        return max(sse, 0.0) / (self.rows * xty.shape[1])

    def mean_sq(self, b: torch.Tensor) -> float:
        """Mean over rows of ||x B||^2, from the accumulated statistics."""
        xtx, _ = self._sums()
        b = b.to(xtx.device, torch.float64)
        return float((b * (xtx @ b)).sum()) / self.rows

    def solve(self, ridge: float = 0.0) -> torch.Tensor:
        """B (float64, on the host: d x d, what the fusion reads): ridge is relative to the mean diagonal of
        X^T X; a singular system gets the minimum-norm least-squares solution."""
        xtx, xty = self._sums()
        a, xty = xtx.cpu(), xty.cpu()  # a d x d solve: the host's LAPACK (gelsd has no CUDA driver)
        if ridge > 0:
            a = a + ridge * a.diagonal().mean() * torch.eye(a.shape[0], dtype=a.dtype)
        try:
            return torch.linalg.solve(a, xty)
        except torch.linalg.LinAlgError:
            return torch.linalg.lstsq(a, xty, driver="gelsd").solution


@torch.no_grad()
def rms_scale(norm: nn.Module, d: int) -> torch.Tensor:
    """The per-channel scale s of an RMS norm, N(v) = s * v / rms(v), read from the module (N(1) = s: any
    parameterisation, w or Gemma's 1 + w); refused when `norm` is not of that form (a LayerNorm centres v)."""
    p = next(norm.parameters())
    probe = torch.randn(4, d, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    s = norm(torch.ones(1, d, device=p.device, dtype=p.dtype))[0]
    want = s * probe / probe.pow(2).mean(-1, keepdim=True).sqrt()
    if not torch.allclose(norm(probe), want, rtol=1e-3, atol=1e-4 * float(s.abs().max())):
        raise LinearMapError(f"{type(norm).__name__} after the MLP is not an RMS norm (N(v) = s * v / rms(v)): "
                             "the linear init cannot map its target back through it")
    return s


def through_rms_norm(r: torch.Tensor, s: torch.Tensor, steps: int = 60) -> torch.Tensor:
    """Per token (last dim d), the input w of rms 1 whose RMS-norm output s * w is closest to r: the minimiser of
    ||s w - r||^2 on the sphere ||w||^2 = d, w = s r / (s^2 + lam), lam >= -min s^2 set by bisection so that
    rms(w) = 1 (the trust-region condition: rms(w) falls as lam grows). Float64 [..., d] result."""
    r, s = r.double(), s.double()
    s2, sr = s * s, s * r
    lo = torch.full(r.shape[:-1] + (1,), -float(s2.min()), dtype=torch.float64, device=r.device)
    hi = sr.pow(2).mean(-1, keepdim=True).sqrt() + 1e-30  # rms(w) <= rms(s r) / lam <= 1 from here on
    for _ in range(steps):
        mid = (lo + hi) / 2
        big = (sr / (s2 + mid)).pow(2).mean(-1, keepdim=True) > 1
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    w = sr / (s2 + hi)
    return w / w.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)  # exactly rms 1 (a zero r: zero)


def _batches(blocks: torch.Tensor, batch_size: int, desc: str, accelerator=None, model: nn.Module | None = None
             ) -> Iterator[tuple[torch.Tensor, bool]]:
    """(batch, counted) of the calibration blocks; under torchrun only this rank's (batch k on rank k mod P,
    `parallel.shares`; a sharded `model` runs as many batches on every rank, a filler not counted)."""
    count = -(-len(blocks) // batch_size)
    lockstep = model is not None and is_sharded(model)
    for k, counted in tqdm(shares(count, accelerator, lockstep), desc=desc, unit="batch", leave=False,
                           disable=ranks(accelerator)[1] != 0):
        yield blocks[k * batch_size:(k + 1) * batch_size], counted


# ------------------------------------------------------------------------------------------------ ReplaceMe
def mlp_output_map(model: nn.Module, index: int, post_norm_ok: bool = False) -> nn.Linear:
    """Layer `index`'s MLP output map (down_proj, fc2, ...), found by its anatomy; refused when a norm follows it
    (a map fused into it would be undone by the norm) unless `post_norm_ok`."""
    stack = find_decoder_stack(model)
    anatomy = anatomy_of(model, index)
    if anatomy.mlp_post_norm and not post_norm_ok:
        raise LinearMapError(f"{type(stack.layers[index]).__name__} normalises its MLP output "
                             f"({anatomy.mlp_post_norm}) before the residual add: a linear map cannot be fused "
                             "into its MLP output map")
    out = stack.layers[index].get_submodule(anatomy.mlp_output)
    if not isinstance(out, nn.Linear):
        raise LinearMapError(f"{anatomy.mlp_output} is a {type(out).__name__}: fusing needs an nn.Linear")
    return out


class _Boundary:
    """Per calibration batch: M (layer s-1's MLP branch output), Z (the rest of x_s) and x_(s+n), as token rows."""

    def __init__(self, model: nn.Module, start: int, n: int, first_token: str = "include"):
        if start < 1:
            raise LinearMapError(f"the block starts at layer {start}: ReplaceMe fuses its map into the MLP of the "
                                 "layer before the block, and there is none")
        self.model, self.start, self.n = model, start, n
        self.skip = 1 if first_token == "exclude" else 0  # position 0: the attention sink's massive activations
        self.stack = find_decoder_stack(model)
        self.out_map = mlp_output_map(model, start - 1)

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _boundary_rows([self], ids)[0]

    def rows(self, m: torch.Tensor, outputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """M, Z and x_(s+n) as token rows, from the captured MLP output of layer s-1 and the layer outputs."""
        d, k = m.shape[-1], self.skip
        m = m[:, k:].reshape(-1, d).float()
        z = outputs[self.start - 1][:, k:].reshape(-1, d).float() - m
        # all three on the card of the map's layer (s-1): under a device_map x^(s+n) may come from another one
        return m, z, outputs[self.start + self.n - 1][:, k:].reshape(-1, d).float().to(m.device)


@torch.no_grad()
def _boundary_rows(boundaries: list[_Boundary], ids: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(M, Z, x_(s+n)) of every boundary for one calibration batch, from ONE forward of the dense model as far as
    the deepest block's end: the maps of several removed runs (a non-contiguous choice) are each estimated on
    the dense model's activations, so one pass gives all their statistics (one pass per run repeated the
    shared shallow layers: ShortGPT's runs [12,18) and [25,27) cost 18 + 27 layer passes instead of 27)."""
    caught: dict[int, torch.Tensor] = {}
    handles = [b.out_map.register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(i, out))
               for i, b in enumerate(boundaries)]
    outputs_at = tuple(sorted({i for b in boundaries for i in (b.start - 1, b.start + b.n - 1)}))
    try:
        cap = run_layers(boundaries[0].model, ids, outputs_at=outputs_at, stack=boundaries[0].stack)
    finally:
        for h in handles:
            h.remove()
    return [b.rows(caught[i], cap.outputs) for i, b in enumerate(boundaries)]


def replaceme_map(model: nn.Module, blocks: torch.Tensor, start: int, n: int, cfg: ReplacementConfig,
                  batch_size: int, seed: int = 0, accelerator=None) -> tuple[torch.Tensor, dict]:
    """T (d x d, float64) for removing layers [start, start+n) of `model`, by `cfg.objective`, and a fit log
    (the calibration MSE / cosine distance of plain pruning and of the map)."""
    return replaceme_maps(model, blocks, [(start, n)], cfg, batch_size, seed, accelerator)[0]


def replaceme_maps(model: nn.Module, blocks: torch.Tensor, runs: list[tuple[int, int]], cfg: ReplacementConfig,
                   batch_size: int, seed: int = 0, accelerator=None) -> list[tuple[torch.Tensor, dict]]:
    """`replaceme_map` for each removed run (start, n), every map estimated on the dense model's activations.
    Least squares: one pass of the calibration blocks for all runs (`_boundary_rows`), shared by torchrun's ranks
    (`accelerator`: the sums added up over them, `Gram.reduce`); the cosine objective optimises each map over its
    own passes, a sequence of Adam steps that every rank runs whole (the same seeded steps, the same map)."""
    boundaries = [_Boundary(model, start, n, cfg.first_token) for start, n in runs]
    if cfg.objective == "lstsq":
        grams = [Gram(b.out_map.out_features, b.out_map.out_features) for b in boundaries]
        for ids, counted in _batches(blocks, batch_size, "ReplaceMe: X^T X, X^T Y", accelerator, model):
            for gram, (m, z, y) in zip(grams, _boundary_rows(boundaries, ids)):
                if counted:
                    gram.add(m, y - z)
        maps = []
        for gram in grams:
            gram.reduce(accelerator)
            t = gram.solve(cfg.ridge)
            eye = torch.eye(t.shape[0], dtype=torch.float64)
            # one pass only: the calibration error before (T = I: plain pruning) and after, from the statistics
            maps.append((t, {"mse_pruned": gram.mse(eye), "mse_map": gram.mse(t), "calibration_tokens": gram.rows}))
    elif cfg.objective == "cosine":
        maps = []
        for b in boundaries:
            t, fit = _cosine_map(b, blocks, b.out_map.out_features, cfg, batch_size, seed)
            maps.append((t.double(), fit))
    else:
        raise LinearMapError(f"replacement.objective={cfg.objective!r}: lstsq | cosine")
    return [(t, fit | {"objective": cfg.objective, "ridge": cfg.ridge}) for t, fit in maps]


def _cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 1 - nn.functional.cosine_similarity(pred, target, dim=-1)


def _cosine_map(boundary: _Boundary, blocks: torch.Tensor, d: int, cfg: ReplacementConfig, batch_size: int,
                seed: int) -> tuple[torch.Tensor, dict]:
    """Adam on the mean cosine distance from T = I; the log has plain pruning's distance (measured on each
    minibatch before its step in the first pass) and the mean distance over the last pass."""
    dev = module_device(boundary.out_map)  # where _Boundary gives M, Z and Y
    t = torch.eye(d, device=dev, requires_grad=True)
    opt = torch.optim.Adam([t], lr=cfg.fit_lr)
    gen = torch.Generator().manual_seed(seed)
    first = last = 0.0
    rows = 0
    for epoch in range(cfg.fit_epochs):
        last, rows = 0.0, 0
        for ids, _ in _batches(blocks, batch_size, f"ReplaceMe cosine, pass {epoch + 1}/{cfg.fit_epochs}"):
            m, z, y = boundary(ids)
            if epoch == 0:
                first += float(_cosine_distance(z + m, y).sum())
            order = torch.randperm(m.shape[0], generator=gen).to(dev)
            for chunk in order.split(cfg.fit_batch_tokens):
                opt.zero_grad()
                dist = _cosine_distance(z[chunk] + m[chunk] @ t, y[chunk])
                dist.mean().backward()
                opt.step()
                last += float(dist.detach().sum())
            rows += m.shape[0]
    return t.detach(), {"cos_pruned": first / rows, "cos_last_pass": last / rows, "calibration_tokens": rows}


@torch.no_grad()
def fuse_into_mlp_output(model: nn.Module, index: int, t: torch.Tensor) -> None:
    """In place: layer `index`'s MLP output map y = W h + b becomes y T (W <- T^T W, b <- T^T b), in float64.
    New tensors, not written into the old ones: a pruned model shares its weights with the dense one
    (`models.layers.share_weights`)."""
    out = mlp_output_map(model, index)
    tt = t.to(out.weight.device, torch.float64).T
    out.weight = nn.Parameter((tt @ out.weight.double()).to(out.weight.dtype), requires_grad=out.weight.requires_grad)
    if out.bias is not None:
        out.bias = nn.Parameter((tt @ out.bias.double()).to(out.bias.dtype), requires_grad=out.bias.requires_grad)


class MapAfter:
    """The unfused map, for checking a fusion: a forward hook multiplying a module's output by T."""

    def __init__(self, module: nn.Module, t: torch.Tensor):
        w = module.weight
        self.t = t.to(w.device, w.dtype)
        self.handle = module.register_forward_hook(lambda m, a, out: out @ self.t)

    def remove(self) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------------------------- LinearPatch
def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(math.isqrt(q)) + 1))


def _paley(k: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order k = q + 1, q a prime = 3 mod 4."""
    q = k - 1
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in squares else -1 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]              # Jacobsthal matrix, skew since q = 3 mod 4
    s = torch.zeros(k, k, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return s + torch.eye(k, dtype=torch.float64)


def hadamard(d: int) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order d (float64): Sylvester's for d = 2^m, else H_K (x) H_(2^m) with
    H_K by Paley (K - 1 prime, = 3 mod 4). Refused when d has no such factorisation."""
    m = (d & -d)                                                 # the largest power of two dividing d
    k = d // m
    while k < d and not (k == 1 or (k % 4 == 0 and _is_prime(k - 1) and (k - 1) % 4 == 3)):
        k, m = k * 2, m // 2
    if k == 1:
        hk = torch.ones(1, 1, dtype=torch.float64)
    elif k % 4 == 0 and _is_prime(k - 1) and (k - 1) % 4 == 3:
        hk = _paley(k)
    else:
        raise LinearMapError(f"hidden size {d}: no Hadamard matrix of the form K x 2^m with Paley's K is built here")
    h = hk
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.kron(h, h2)
    h = h / math.sqrt(d)
    if not torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-9):
        raise LinearMapError(f"hidden size {d}: the Hadamard construction is not orthogonal")  # a bug, not input
    return h


@torch.no_grad()
def linear_patch_matrix(model: nn.Module, blocks: torch.Tensor, start: int, n: int,
                        batch_size: int, accelerator=None) -> tuple[torch.Tensor, dict]:
    """P = H diag(c) H^T (float64) for the slot of layers [start, start+n), and a fit log. Under torchrun
    (`accelerator`) the batches' scales are shared by the ranks and summed over them in float64."""
    stack = find_decoder_stack(model)
    d = stack.config.hidden_size
    h = hadamard(d)
    dev = module_device(stack.layers[start])  # the slot's card: x_in and x_out are brought there
    hf = h.float().to(dev)
    scale, batches = torch.zeros(d, dtype=torch.float64), 0
    for ids, counted in _batches(blocks, batch_size, "LinearPatch: channel scales", accelerator, model):
        cap = run_layers(model, ids, inputs_at=(start,), outputs_at=(start + n - 1,), stack=stack)
        if not counted:
            continue
        x_in = cap.inputs[start].reshape(-1, d).float().to(dev) @ hf
        x_out = cap.outputs[start + n - 1].reshape(-1, d).float().to(dev) @ hf
        scale += (x_out.abs().mean(0) / x_in.abs().mean(0).clamp_min(1e-12)).double().cpu()
        batches += 1
    summed = sum_over_ranks(accelerator)
    if summed is not None:
        total = summed(torch.cat([scale, torch.tensor([batches], dtype=torch.float64)]))
        scale, batches = total[:-1], total[-1].item()
    c = scale / batches
    p = h @ torch.diag(c) @ h.T
    return p, {"scale_min": float(c.min()), "scale_max": float(c.max()), "scale_mean": float(c.mean())}


# ------------------------------------------------------------------------- linear init of trained replacements
class _SlotTargets:
    """Per calibration batch: the slot's input x_s with its call arguments, and the block's output x_(s+n)."""

    def __init__(self, model: nn.Module, start: int, n: int):
        self.model, self.start, self.n = model, start, n
        self.stack = find_decoder_stack(model)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, device: torch.device):
        """x_s, its call arguments and x_(s+n), all on `device` (the replacement's card)."""
        cap = run_layers(self.model, ids, inputs_at=(self.start,), kwargs_at=(self.start,),
                         outputs_at=(self.start + self.n - 1,), stack=self.stack)
        return to_device((cap.inputs[self.start], cap.call_kwargs[self.start], cap.outputs[self.start + self.n - 1]),
                         device)


def _call(module: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    y = module(x, **kwargs)
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def init_ffn_linear(ffn: nn.Module, model: nn.Module, blocks: torch.Tensor, start: int, n: int,
                    batch_size: int, ridge: float = 0.0, accelerator=None) -> dict:
    """In place: the FFN replacement equals, at step 0, the least-squares linear map from what it reads to its
    target (module docstring). Returns a fit log. Under torchrun the batches are shared (`Gram.reduce`)."""
    d, width = ffn.fc_in.in_features, ffn.fc_in.out_features
    if width < 2 * d:
        raise LinearMapError(f"replacement.init=linear needs an FFN width >= 2 x hidden ({2 * d}), got {width}")
    targets = _SlotTargets(model, start, n)
    gram = Gram(d, d, bias=True)
    for ids, counted in _batches(blocks, batch_size, "linear init: X^T X, X^T Y", accelerator, model):
        x, _, y = targets(ids, module_device(ffn))
        if counted:
            gram.add(ffn.norm(x), y - x if ffn.residual else y)
    gram.reduce(accelerator)
    sol = gram.solve(ridge)
    a, b = sol[:d], sol[d]
    w_in, b_in = ffn.fc_in.weight, ffn.fc_in.bias
    eye = torch.eye(d, dtype=w_in.dtype, device=w_in.device)
    w_in[:d], w_in[d:2 * d] = eye, -eye
    b_in[:2 * d] = 0
    w_out = torch.zeros_like(ffn.fc_out.weight)
    w_out[:, :d], w_out[:, d:2 * d] = a.T, -a.T
    ffn.fc_out.weight.copy_(w_out)
    ffn.fc_out.bias.copy_(b.to(ffn.fc_out.bias.dtype))
    return {"init": "linear", "calibration_tokens": gram.rows}


@torch.no_grad()
def init_layer_linear(layer: nn.Module, model: nn.Module, blocks: torch.Tensor, start: int, n: int,
                      batch_size: int, ridge: float = 0.0, accelerator=None) -> dict:
    """In place: the replacement layer's MLP output map refit by least squares so that the layer's output best
    matches x_(s+n) on the calibration tokens, everything else as copied; through a post-MLP RMS norm, its
    direction (module docstring). Under torchrun the batches are shared (`Gram.reduce`)."""
    out_map = mlp_output_map(model, start, post_norm_ok=True)
    path = next(name for name, m in find_decoder_stack(model).layers[start].named_modules() if m is out_map)
    target_map = layer.get_submodule(path)
    post_path = anatomy_of(model, start).mlp_post_norm
    post = layer.get_submodule(post_path) if post_path else None
    branch_end = post if post is not None else target_map  # what the layer adds to its residual stream
    scale = rms_scale(post, target_map.out_features).float() if post is not None else None
    targets = _SlotTargets(model, start, n)
    gram = Gram(target_map.in_features, target_map.out_features, bias=target_map.bias is not None)
    copied_sq = 0.0  # sum over tokens of ||W h||^2 of the copied map: the scale the refit is brought back to
    for ids, counted in _batches(blocks, batch_size, "linear init: X^T X, X^T Y", accelerator, model):
        x, kwargs, y = targets(ids, module_device(layer))
        if not counted:
            continue
        caught = {}
        hooks = [target_map.register_forward_hook(lambda m, a, out, caught=caught: caught.update(h=a[0], v=out)),
                 branch_end.register_forward_hook(lambda m, a, out, caught=caught: caught.update(o=out))]
        try:
            out = _call(layer, x, kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        r = y - (out - caught["o"])  # what the branch should add: the target minus the rest of the layer
        if scale is not None:
            r = through_rms_norm(r, scale.to(r.device))
            copied_sq += float(caught["v"].float().pow(2).sum())
        gram.add(caught["h"], r)
    gram.reduce(accelerator)
    summed = sum_over_ranks(accelerator)
    if summed is not None:
        copied_sq = summed(torch.tensor([copied_sq], dtype=torch.float64)).item()
    sol = gram.solve(ridge)
    if scale is not None:  # the norm ignores a common factor: the copied map's mean output norm, for the optimiser
        sol = sol * math.sqrt(copied_sq / max(gram.mean_sq(sol) * gram.rows, 1e-30))
    k = target_map.in_features
    target_map.weight.copy_(sol[:k].T.to(target_map.weight.dtype))
    if target_map.bias is not None:
        target_map.bias.copy_(sol[k].to(target_map.bias.dtype))
    return {"init": "linear", "calibration_tokens": gram.rows, "refit": path} | (
        {"through_norm": post_path} if post_path else {})
