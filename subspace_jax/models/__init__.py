"""Reference Flax NNX models built from :class:`subspace_jax.nn.Linear`.

* :mod:`~subspace_jax.models.bert`: BERT encoder that loads Hugging Face safetensors
  (all-MiniLM-L6-v2 by default), sentence embeddings and a classifier.
* :mod:`~subspace_jax.models.vit`: a pre-LN ViT that runs on 8x8 digits.
* :mod:`~subspace_jax.models.llama`: a Llama-style decoder from about 1M to 100M parameters.
"""

from subspace_jax.models import bert as bert
from subspace_jax.models import llama as llama
from subspace_jax.models import vit as vit

__all__ = ("bert", "llama", "vit")
