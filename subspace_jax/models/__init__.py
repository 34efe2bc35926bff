"""Reference Flax NNX models built from :class:`subspace_jax.nn.Linear`."""
