"""Why LinearPatch breaks Gemma 3 270M on the block-perplexity block [6,10) (experiments/README.md, Gemma 3).

On 2 calibration blocks: the calibration NLL with the block skipped (identity), replaced by the patch
P = H diag(c) H^T, by diag(P) alone, and by P with the three largest input channels passed through unchanged;
plus the massive-activation channels at the block's input and output and the size of P's off-diagonal leak.
Needs the converted model (any `model=gemma3-270m` run fetches it). ~2 min on one core:

    PYTHONPATH=src OMP_NUM_THREADS=1 python experiments/gemma3-270m-cpu/diag_linear_patch_blockppl.py
"""
import os

import torch
import transformers

from llm_streamline.config import DataConfig
from llm_streamline.data import load_blocks
from llm_streamline.linear_map import linear_patch_matrix
from llm_streamline.models.layers import find_decoder_stack, run_layers

START, N = 6, 4
path = os.path.expanduser("~/.cache/llm-streamline/models/gemma3-270m")
tok = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
blocks = load_blocks(DataConfig(calib_samples=32, train_samples=128, val_samples=16), tok).calib[:4]
stack = find_decoder_stack(model)
d = stack.config.hidden_size

P, _ = linear_patch_matrix(model, blocks, START, N, 4)
P = P.float()
P_diag = torch.diag(torch.diagonal(P))
with torch.no_grad():
    cap = run_layers(model, blocks[:2], inputs_at=(START,), outputs_at=(START + N - 1,), stack=stack)
x_in, x_out = cap.inputs[START].reshape(-1, d), cap.outputs[START + N - 1].reshape(-1, d)
big = x_in.abs().mean(0).topk(3).indices
print("massive channels", big.tolist(), "x_in mean", x_in[:, big].mean(0).tolist(),
      "x_out mean", x_out[:, big].mean(0).tolist())
print("relative L2 error of the block output: skipped", ((x_out - x_in).norm() / x_out.norm()).item(),
      "patch", ((x_out - x_in @ P).norm() / x_out.norm()).item())
print("mean |x_in @ offdiag(P)| per channel", (x_in @ (P - P_diag)).abs().mean().item(),
      "mean |x_in| per channel", x_in.abs().mean().item())
P_pass = P.clone()
for i in big:
    P_pass[i, :], P_pass[:, i], P_pass[i, i] = 0, 0, 1.0

saved = {}


def keep_input(module, args, kwargs):
    saved["x"] = kwargs.get("hidden_states", args[0] if args else None)


def output_from(t):
    """The block's last layer returns the block's input times t (None: the input itself, i.e. skipped)."""
    def hook(module, args, kwargs, out):
        y = saved["x"] if t is None else saved["x"] @ t
        return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
    return hook


pre = stack.layers[START].register_forward_pre_hook(keep_input, with_kwargs=True)
for name, t in [("skipped", None), ("patch", P), ("diag(P) only", P_diag),
                ("patch, massive channels passed through", P_pass)]:
    post = stack.layers[START + N - 1].register_forward_hook(output_from(t), with_kwargs=True)
    with torch.no_grad():
        logits = model(blocks[:2]).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:2, 1:].reshape(-1))
    print(f"{name}: calibration NLL {nll.item():.2f}")
    post.remove()
pre.remove()
