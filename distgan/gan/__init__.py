"""GAN training math: objectives and regularizers (``losses``), DiffAugment (``augment``) and the
EMA generator (``ema``). Pure functions of tensors and modules, no distributed or I/O code."""
