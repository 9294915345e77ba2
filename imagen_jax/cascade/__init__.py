"""The Imagen cascade: text -> base stage -> super-resolution stages, sampled as one pipeline."""
