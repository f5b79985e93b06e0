"""Pictures of DALL-E 1's mechanics, drawn from a trained model folder (``dalle1 explain``).

``explain(model_folder, out_dir)`` writes one picture per mechanic of the paper
(Ramesh et al. 2021); docs/tour.md shows them in order. The modules, in import order:

* ``figures`` — colours, matplotlib figures on the Agg canvas, exact rasters, mosaics;
* ``stream`` — the token stream of section 2.2 (``stream_layout.png``);
* ``attention`` — the masks of appendix B.1 at the paper's shape and the model's
  (``mask_figure11.png``, ``mask_layerNN_KIND.png``, ``mask_kind_KIND.png``,
  ``mask_schedule.png``, ``mask_fields.png``);
* ``tokens`` — the discrete VAE of section 2.1 (``vae_reconstructions.png``,
  ``codebook.png``, ``codes.png``, ``codebook_usage.png``);
* ``generation`` — raster-order sampling (``raster_order.gif``), guidance and
  temperature / top-k sweeps, reranking (section 2.6) and editing (section 3.3)
  (``guidance_sweep.png``, ``sampling_sweep.png``, ``rerank.png``, ``edit.png``);
* ``curves`` — training curves with held-out values (``loss_curves.png``,
  ``vae_loss_curves.png``);
* ``tour`` — :func:`explain`, which draws them all for a model folder.

Every picture is also a function returning a PIL image (or a picture object that
records where its cells lie), so the tests and docs/tour.ipynb can use them.
"""

from .tour import Explained, explain

__all__ = ["Explained", "explain"]
