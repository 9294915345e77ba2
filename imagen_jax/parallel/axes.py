"""Logical axis names used to annotate parameters and activations.

Model code names axes with these constants only; `imagen_jax.parallel.mesh` maps them to mesh axes
through the rules table in the config, so sharding changes never touch model code.
"""

BATCH = "batch"  # activations: the example dimension
LENGTH = "length"  # activations: text sequence positions
EMBED = "embed"  # model width (d_model, U-Net time/cond embedding width)
MLP = "mlp"  # hidden width of feed-forward layers
HEADS = "heads"  # attention heads
KV = "kv"  # per-head width
VOCAB = "vocab"  # token embedding rows
CONV_IN = "conv_in"  # input channels of a convolution kernel
CONV_OUT = "conv_out"  # output channels of a convolution kernel
NORM = "norm"  # scale/bias vectors of normalisation layers
REL_BUCKETS = "relpos_buckets"  # T5 relative position buckets
LAYERS = "layers"  # the stacking axis of the parameters of blocks run as one scan
