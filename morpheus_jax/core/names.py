"""The names every layer agrees on."""

# The omics modalities, in the authors' model order.
MODALITIES = ("rna", "dnam", "cnv")
# Dataset splits (the metadata ``split`` column).
SPLITS = ("pretrain", "val-pretrain", "fine-tune")
