# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # DALL-E 1, run by hand
#
# This notebook trains a tiny DALL-E 1 (Ramesh et al. 2021, *Zero-Shot Text-to-Image
# Generation*, arXiv:2102.12092) on dalle1's built-in shapes data, on a CPU, and looks at
# every step: the tensors, and the pictures `dalle1 explain` draws. Each step quotes the
# sentence of the paper it illustrates. [tour.md](tour.md) is the same walk as a page.
#
# It takes a few minutes on two CPU cores. `DALLE1_TOUR_QUICK=1` trains for tens of steps
# only (the test suite runs the notebook that way); `DALLE1_TOUR_DIR` says where the models
# go (default `outputs/tour_notebook`). Edit `docs/tour.py` (the jupytext source) and run
# `make explain-docs` to rebuild `docs/tour.ipynb`.

# %%
import os
from pathlib import Path

import numpy as np
import torch
from IPython.display import display

from dalle1.apps.explain import attention, curves, generation, stream, tokens
from dalle1.apps.explain.figures import mosaic, to_rgb_array
from dalle1.checkpoint import load_vae
from dalle1.config import load_config
from dalle1.data import find_pairs
from dalle1.data.captions import read_captions
from dalle1.images import load_image
from dalle1.masks import layer_kinds, stream_mask
from dalle1.pipeline import DALLEPipeline
from dalle1.training import fit

QUICK = os.environ.get("DALLE1_TOUR_QUICK", "") not in ("", "0")
ROOT = Path.cwd() if (Path.cwd() / "configs").is_dir() else Path.cwd().parent  # the repository
WORK = Path(os.environ.get("DALLE1_TOUR_DIR", ROOT / "outputs" / "tour_notebook"))
torch.set_num_threads(2)
torch.manual_seed(0)
print("quick run" if QUICK else "learner's run", "->", WORK)

# %% [markdown]
# ## 0. The two stages
#
# > "We train a discrete variational autoencoder (dVAE) to compress each 256×256 RGB image
# > into a 32 × 32 grid of image tokens, each element of which can assume 8192 possible
# > values." (paper §2, stage 1)
#
# > "We concatenate up to 256 BPE-encoded text tokens with the 32 × 32 = 1024 image tokens,
# > and train an autoregressive transformer to model the joint distribution over the text
# > and image tokens." (paper §2, stage 2)
#
# Here everything is smaller: 32-px images (16 px in a quick run), an 8×8 grid of codes
# from a codebook of 128 (4×4 of 32), and 16 text slots (8). The settings are the demo's
# (`configs/demo_*.yaml`) with fewer steps, and the transformer uses the paper's sparse
# attention (`dalle.attention=dalle`).

# %%
data_dir = WORK / "shapes"
if QUICK:
    vae_config, dalle_config = "configs/tiny_vae.yaml", "configs/tiny_dalle.yaml"
    common = [f"data.path={data_dir}", "data.synthetic_count=64", "train.progress_bar=false"]
    vae_steps, dalle_steps = 20, 20
else:
    vae_config, dalle_config = "configs/demo_vae.yaml", "configs/demo_dalle.yaml"
    common = [f"data.path={data_dir}", "data.synthetic_count=2000", "train.log_every=5"]
    vae_steps, dalle_steps = 300, 400

# %% [markdown]
# ## 1. The data: captioned images
#
# The built-in set is generated on first use: one shape per image, and a caption that
# names its colour, shape, size and place.

# %%
vae_cfg = load_config(
    ROOT / vae_config,
    [
        *common,
        f"train.out_dir={WORK / 'vae'}",
        f"train.max_steps={vae_steps}",
        "train.sample_every=0",
    ],
)
vae_folder = fit(vae_cfg, overwrite=True)  # makes the data set, then trains stage 1
pairs = find_pairs(data_dir)
size = vae_cfg.vae.image_size
examples = torch.stack([load_image(p, size) for p, _ in pairs[:8]])
captions = [read_captions(c)[0] for _, c in pairs[:8]]
print(len(pairs), "captioned images;", "a batch of them:", tuple(examples.shape), "in [0, 1]")
display(
    mosaic(
        [[to_rgb_array(x) for x in examples]],
        "eight training images and their captions",
        scale=4,
        captions=[[c.replace(" at the", "\nat the") for c in captions]],
    ).image
)

# %% [markdown]
# ## 2. Stage 1: the image tokenizer
#
# > "The image tokens are obtained using argmax sampling from the dVAE encoder logits,
# > without adding any gumbel noise." (paper §2.2)
#
# The demo's tokenizer is a VQ-VAE (`vae.quantizer: vq`): at this scale it uses far more
# of its codebook than the paper's gumbel-softmax dVAE (`vae.quantizer: gumbel`, also
# in `dalle1/vae.py`). Either way, `encode` gives one code per 4×4-pixel cell, in raster
# order, and `decode` paints pixels from codes.

# %%
vae = load_vae(vae_folder).eval()
codes = vae.encode(examples)
print("codes:", tuple(codes.shape), "(images, grid²), each in [0,", vae.codebook_size, ")")
print(codes[0].view(vae.grid_size, vae.grid_size))
display(tokens.reconstructions_picture(vae, examples).image)

# %% [markdown]
# What does one code *mean*? Decode a grid filled with it: each tile below is the centre
# cell of such a grid, sorted by how often the code is used on the data.

# %%
all_images = torch.stack([load_image(p, size) for p, _ in pairs[:256]])
all_codes = vae.encode(all_images)
picture, order = tokens.codebook_picture(vae, all_codes, len(all_images))
print("the five most used codes:", order[:5].tolist())
display(picture.image)
display(tokens.codes_picture(vae, examples[0], captions[0]))
display(tokens.codebook_usage_picture(all_codes, vae.codebook_size, len(all_images)))

# %% [markdown]
# ## 3. Stage 2: the transformer over one stream
#
# > "We BPE-encode the lowercased caption using at most 256 tokens with a vocabulary size
# > of 16,384, and encode the image using 32 × 32 = 1024 tokens with a vocabulary size of
# > 8192." (paper §2.2)
#
# Training stage 2 learns the BPE tokenizer on the captions, encodes every image once with
# the frozen tokenizer, then trains the transformer by maximum likelihood.

# %%
dalle_cfg = load_config(
    ROOT / dalle_config,
    [
        *common,
        f"train.out_dir={WORK / 'dalle'}",
        f"train.max_steps={dalle_steps}",
        f"dalle.vae={vae_folder}",
        "dalle.attention=dalle",
    ],
)
model_folder = fit(dalle_cfg, overwrite=True)
pipe = DALLEPipeline.from_pretrained(model_folder)
shape = pipe.dalle.shape
print(shape)

# %% [markdown]
# > "Instead, we opt to learn a special padding token separately for each of the 256 text
# > positions. This token is used only when no text token is available." (paper §2.2)

# %%
prompt = captions[0]
ids = pipe.tokenizer.encode(prompt)[0]
print(repr(prompt), "->", ids.tolist())
print("pads:", [int(i) for i in ids if pipe.tokenizer.is_pad(i)], "(one id per position)")
display(stream.stream_layout(pipe.tokenizer, shape, prompt))

# %% [markdown]
# One forward pass over a batch: the text positions predict text, the image positions
# predict image codes, and the loss mixes the two.
#
# > "Since we are primarily interested in image modeling, we multiply the cross-entropy
# > loss for the text by 1/8 and the cross-entropy loss for the image by 7/8."
# > (paper §2.2)

# %%
text = pipe.tokenizer.encode(captions)
with torch.no_grad():
    loss, logs = pipe.dalle.loss(text, codes)
print("text", tuple(text.shape), "codes", tuple(codes.shape))
print({k: round(float(v), 4) for k, v in logs.items()}, "loss", round(float(loss), 4))
series = curves.read_metrics(WORK / "dalle" / "logs" / "metrics.csv")
held = curves.read_held_out(WORK / "dalle" / "metrics.json")
display(curves.loss_curves_picture(series, "transformer training loss", [], held))

# %% [markdown]
# ## 4. Sparse attention
#
# > "The part of the attention masks corresponding to the text-to-text attention is the
# > standard causal mask, and the part for the image-to-image attention uses either a row,
# > column, or convolutional attention mask." (paper §2.2)
#
# A mask is a boolean `[query, key]` matrix over the input stream `[<bos>, text, codes]`.
# At the size of the paper's Figure 11 (6 text tokens, a 4×4 grid) it fits on screen:

# %%
print("row mask, 6 text tokens, 4×4 grid (1 = may attend):")
print(stream_mask("row", 6, 4, 3).int())
display(attention.figure11_picture().image)

# %% [markdown]
# The schedule: which mask each layer uses, at the paper's 32×32 grid and at this model's
# grid (and what one code in the middle of the grid may attend under each).

# %%
model_stream = attention.model_stream(shape, pipe.dalle.cfg.conv_kernel)
depth = pipe.dalle.cfg.depth
print("layer kinds:", layer_kinds(depth, "dalle"))
display(attention.schedule_picture(depth, "dalle", model_stream).image)
display(attention.fields_picture(model_stream).image)
display(attention.layer_picture(1, depth, "dalle", model_stream).image)

# %% [markdown]
# ## 5. Sampling, one code at a time
#
# Generation reads the caption, then draws the codes in raster order, each from the
# model's distribution given the caption and every code before it (paper §2.2, §2.6).

# %%
sample = pipe(prompt, num_images=1, seed=0)
print("sampled codes:")
print(sample.codes[0].view(vae.grid_size, vae.grid_size))
frames = generation.raster_frames(pipe.vae, sample.codes[0], caption=prompt)
generation.save_gif(frames, WORK / "raster_order.gif")
n = len(frames) - 1
shown = [frames[0], frames[n // 4], frames[n // 2], frames[-1]]
display(
    mosaic(
        [[np.asarray(f) for f in shown]],
        "four frames of the raster-order animation (the whole of it: raster_order.gif)",
    ).image
)

# %% [markdown]
# Two knobs change what is drawn. Classifier-free guidance (not in the paper) mixes the
# caption's logits with the empty caption's; temperature and top-k reshape each code's
# distribution (the paper samples at temperature 1).

# %%
display(generation.guidance_sweep(pipe, prompt, seed=0, num_images=4).image)
display(generation.sampling_sweep(pipe, prompt, seed=0, num_images=4).image)

# %% [markdown]
# ## 6. Reranking
#
# > "Given a caption and a candidate image, the contrastive model assigns a score based
# > on how well the image matches the caption." (paper §2.6)
#
# This model folder has no contrastive scorer (`configs/demo_clip.yaml` trains one), so
# candidates are ranked by the transformer's own likelihood of their codes.

# %%
display(generation.rerank_picture(pipe, prompt, seed=0, candidates=16, keep=4).image)

# %% [markdown]
# ## 7. Editing
#
# Image completion in the paper keeps the top rows of a real image's codes and samples the
# rest (§3.3). dalle1 repaints any box: codes before the box condition the sampler, and the
# kept codes after it — which raster sampling cannot see — score each candidate.

# %%
display(generation.edit_picture(pipe, examples[1], "a blue circle", seed=0, candidates=4).image)

# %% [markdown]
# ## 8. All of it at once
#
# `dalle1 explain --model <folder> --out <dir>` draws every picture above (and each layer's
# mask) for any model folder; `make explain-docs` draws them for the demo model into
# `docs/images/tour/`, where [tour.md](tour.md) shows them.
