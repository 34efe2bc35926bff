"""Reference Flax NNX models built from :class:`subspace_jax.nn.Linear`.

* :mod:`~subspace_jax.models.bert`: BERT encoder that loads Hugging Face safetensors
  (all-MiniLM-L6-v2 by default), sentence embeddings and a classifier.
* :mod:`~subspace_jax.models.vit`: a pre-LN ViT that runs on 8x8 digits.
* :mod:`~subspace_jax.models.llama`: a Llama-style decoder from about 1M to 100M parameters.
* :mod:`~subspace_jax.models.gemma`: Gemma 3 (270M from its GGUF packages, offline;
  loading in :mod:`~subspace_jax.models.gemma_loading`, the tokenizer in
  :mod:`~subspace_jax.models.gemma_tokenizer`, KV-cache generation in
  :mod:`~subspace_jax.models.gemma_generate`).
"""

from subspace_jax.models import bert as bert
from subspace_jax.models import gemma as gemma
from subspace_jax.models import llama as llama
from subspace_jax.models import vit as vit

__all__ = ("bert", "gemma", "llama", "vit")
