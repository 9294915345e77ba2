"""imagen_jax: a JAX/Flax implementation of the Imagen text-to-image cascade."""

__version__ = "0.1.0"
